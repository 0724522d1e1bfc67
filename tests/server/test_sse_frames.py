"""SSE frames with the chunk's repeated head encoded once (serving_common.ChunkFrames) are
byte for byte the frames of the whole chunk (sse_data), line separators escaped in both parts."""
import json

from deepserve.server.serving_common import ChunkFrames, sse_data

HEADS = [dict(id="cmpl-1", object="text_completion", created=1733450000, model="stories260k"),
         dict(id="chatcmpl-x", object="chat.completion.chunk", created=0, model="m\u2028odel \u00e9")]
RESTS = [dict(choices=[{"index": 0, "text": " the", "logprobs": None, "finish_reason": None, "stop_reason": None}]),
         dict(choices=[{"index": 1, "text": "a\x85b\u2029 \u4f60\"\\", "logprobs": {"tokens": ["a"]},
                        "finish_reason": "stop", "stop_reason": 2}],
              usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
         dict(choices=[], usage=None, prompt_logprobs=[None, {"5": {"logprob": -1.5, "rank": 1}}])]


def test_frames_equal_the_whole_chunk_s():
    for head in HEADS:
        frame = ChunkFrames(**head)
        for rest in RESTS:
            got = frame(**rest)
            assert got == sse_data({**head, **rest})
            assert got.startswith("data: ") and got.endswith("\n\n") and len(got[:-2].splitlines()) == 1
            assert json.loads(got[len("data: "):]) == {**head, **rest}
