"""Echoed prompt logprobs (lm-eval's loglikelihood requests) and vLLM's prompt_logprobs of a
prompt longer than --max-num-batched-tokens, through the official openai client: the engine
core scores it in chunks as a chunked prefill does, equal to the one-step scores (it was a
500), and a prompt past the context is a 400 with OpenAI's error JSON."""
from __future__ import annotations

import openai
import pytest
from conftest import API_KEY, launch

PROMPT = [1] + [300 + (i * 7) % 180 for i in range(80)]


def scores(server, api_key: str) -> tuple[list, list]:
    client = openai.OpenAI(base_url=server.v1, api_key=api_key, max_retries=0)
    echo = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1,
                                     temperature=0)
    vllm = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, temperature=0,
                                     extra_body={"prompt_logprobs": 1})
    entries = vllm.choices[0].model_extra["prompt_logprobs"]
    return echo.choices[0].logprobs.token_logprobs, [e and e[str(t)]["logprob"] for e, t in zip(entries, PROMPT)]


def test_scores_of_a_prompt_longer_than_a_step(demo_server):
    whole = scores(demo_server, API_KEY)
    server = launch("--max-num-batched-tokens", "32", "--max-model-len", "128", "--num-gpu-blocks-override", "64")
    try:
        echo, vllm = scores(server, "none")
        client = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="stories260k", prompt=PROMPT * 2, max_tokens=1, echo=True, logprobs=1)
    finally:
        server.stop()
    assert len(echo) == len(whole[0]) == len(PROMPT) + 1 and echo[0] is None
    assert echo[1:len(PROMPT)] == pytest.approx(whole[0][1:len(PROMPT)], abs=1e-4)
    assert vllm[0] is None and vllm[1:] == pytest.approx(whole[1][1:], abs=1e-4)
    assert refused.value.status_code == 400 and "maximum context length is 128" in refused.value.message
