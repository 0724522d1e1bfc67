"""Prompt scoring in chunks of --max-num-batched-tokens under TP=2, PP=2 and DP=2 (gloo on
CPU): the logits and prompt logprobs equal the one-process, one-step ones (up to float
summation order)."""
import pytest
import torch

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL

PROMPT = {"prompt_token_ids": list(range(3, 30))}   # 27 tokens: chunks of 6, across blocks of 4
SCORE = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)


def _scores(**kw):
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=128, **kw)
    try:
        logits = llm.prompt_logits([PROMPT])[0]
        entries = llm.generate(PROMPT, SCORE)[0].prompt_logprobs
        return logits, [e and e[t].logprob for e, t in zip(entries, PROMPT["prompt_token_ids"])]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def whole():
    return _scores()


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2},
                                    {"data_parallel_size": 2}], ids=["tp2", "pp2", "dp2"])
def test_chunked_scores_match_one_step(whole, layout):
    logits, logprobs = _scores(max_num_batched_tokens=6, **layout)
    torch.testing.assert_close(logits, whole[0], rtol=1e-4, atol=1e-4)
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(whole[1][1:], abs=1e-4)
