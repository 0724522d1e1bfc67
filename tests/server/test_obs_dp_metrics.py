"""/metrics under data parallelism, as vLLM serves it: every series per DP rank, labelled
engine="<rank>" beside model_name; each rank's request histograms hold exactly the requests that
rank served (its own engine counters agree), and together they hold every request sent."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from deepserve.server.metrics import parse_metrics
from tests.server.conftest import launch

PROMPTS = ["Once upon a time", "The little dog", "Tom saw a big", "Lily", "One day", "The sun", "A cat", "Ben"]
# long enough that the eight requests overlap, so the least-loaded placement spreads them over both
# ranks (a request that ended before the next one came leaves both ranks idle: rank 0 takes the tie)
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def dp_server():
    server = launch("--data-parallel-size", "2", "--served-model-name", "demo", "--num-gpu-blocks-override", "64")
    yield server
    server.stop()


def test_per_rank_series_exact_against_the_requests(dp_server):
    before = parse_metrics(httpx.get(dp_server.url + "/metrics").text)
    for rank in "01":   # every rank's series from the start, at 0
        lab = f'model_name="demo",engine="{rank}"'
        assert before[f'vllm:request_success_total{{{lab},finished_reason="length"}}'] == 0
        assert before[f"vllm:e2e_request_latency_seconds_count{{{lab}}}"] == 0
        assert before[f"vllm:num_requests_running{{{lab}}}"] == 0
        assert f"vllm:kv_cache_usage_perc{{{lab}}}" in before

    async def send():
        client = openai.AsyncOpenAI(base_url=dp_server.v1, api_key="x", max_retries=0)
        return await asyncio.gather(*[client.completions.create(
            model="demo", prompt=p, max_tokens=MAX_TOKENS + i, temperature=0, extra_body={"ignore_eos": True})
            for i, p in enumerate(PROMPTS)])   # at once: the ranks share them

    replies = asyncio.run(send())
    values = parse_metrics(httpx.get(dp_server.url + "/metrics").text)
    assert not any('engine="2"' in key for key in values)
    served = {}
    for rank in "01":
        lab = f'model_name="demo",engine="{rank}"'

        def v(name: str, extra: str = "") -> float:
            return values[f"vllm:{name}{{{lab}{extra}}}"]

        served[rank] = v("request_success_total", ',finished_reason="length"')
        assert v("e2e_request_latency_seconds_count") == v("time_to_first_token_seconds_count") == served[rank]
        # the rank's own engine counters and the API server's histograms of the requests it served
        assert v("generation_tokens_total") == v("request_generation_tokens_sum")
        assert v("prompt_tokens_total") == v("request_prompt_tokens_sum")
        assert v("inter_token_latency_seconds_count") == v("generation_tokens_total") - served[rank]
        assert v("request_params_n_count") == v("request_params_max_tokens_count") == served[rank]
        assert v("num_requests_running") == 0
        assert values[f"deepserve:generation_tokens_total{{{lab}}}"] == v("generation_tokens_total")
    assert served["0"] > 0 and served["1"] > 0, served
    assert served["0"] + served["1"] == len(PROMPTS)

    def total(name: str) -> float:
        return sum(values[f'vllm:{name}{{model_name="demo",engine="{rank}"}}'] for rank in "01")

    assert total("generation_tokens_total") == sum(r.usage.completion_tokens for r in replies) == \
        sum(MAX_TOKENS + i for i in range(len(PROMPTS)))
    assert total("prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    assert total("request_params_max_tokens_sum") == sum(MAX_TOKENS + i for i in range(len(PROMPTS)))
