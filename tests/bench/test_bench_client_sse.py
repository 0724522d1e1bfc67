"""The bench client reads SSE lines split at newlines only: a server may send U+0085 / U+2028 /
U+2029 unescaped inside a JSON string (valid JSON), where httpx's aiter_lines() would cut the
data line in two and the request would count as failed."""
import asyncio
import json

import httpx

from deepserve.bench.client import RequestInput, send_request
from deepserve.server.serving_common import sse_data

TEXTS = ["Once", " up\u2028on", " a\x85 time", "\u2029!"]


def _stream(frames: list[str], chunk: int) -> httpx.MockTransport:
    body = "".join(frames).encode()

    async def chunks():
        for i in range(0, len(body), chunk):   # chunk edges fall inside multi-byte characters too
            yield body[i:i + chunk]

    return httpx.MockTransport(lambda request: httpx.Response(200, content=chunks(),
                                                              headers={"content-type": "text/event-stream"}))


def _run(frames: list[str], chunk: int):
    req = RequestInput(prompt="p", prompt_len=1, output_len=4, model="m",
                       api_url="http://test/v1/completions", chat=False)

    async def go():
        async with httpx.AsyncClient(transport=_stream(frames, chunk)) as client:
            return await send_request(client, req)
    return asyncio.run(go())


def test_raw_unicode_line_separators_stay_in_one_data_line():
    frames = [f"data: {json.dumps({'choices': [{'text': t}]}, ensure_ascii=False)}\n\n" for t in TEXTS]
    frames += ['data: {"choices": [], "usage": {"completion_tokens": 4}}\n\n', "data: [DONE]\n\n"]
    assert any("\u2028" in f for f in frames)          # the raw character is on the wire
    for chunk in (1, 3, 7, 4096):
        out = _run(frames, chunk)
        assert out.success and out.error == "", out.error
        assert out.generated_text == "".join(TEXTS) and out.output_tokens == 4
        assert len(out.itl) == len(TEXTS) - 1


def test_server_frames_keep_each_event_on_one_line_for_any_splitter():
    event = {"choices": [{"text": "".join(TEXTS) + "\x1c\x0b"}]}
    frame = sse_data(event)
    lines = [ln for ln in frame.splitlines() if ln]     # str.splitlines: httpx's aiter_lines rules
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: "):]) == event
