"""vLLM 0.26's system_fingerprint (--fingerprint-mode, --fingerprint-value): its format, the
config hash it ends with, and where chat completions, completions and their streams carry it
(vLLM's chat_completion/serving.py and completion/serving.py), read with the openai SDK."""
from __future__ import annotations

import asyncio
import dataclasses

import openai
import pytest
from starlette.testclient import TestClient
from test_qa14_chat_agents import serve

from deepserve import __version__
from deepserve.config import (CacheConfig, EngineArgs, EngineConfig, HFConfig, ModelConfig, ParallelConfig,
                              SchedulerConfig, SpeculativeConfig)
from deepserve.engine.llm_engine import LLMEngine
from deepserve.server.api_server import build_state
from deepserve.server.app import build_app
from deepserve.server.args import ServerArgs
from deepserve.server.fingerprint import system_fingerprint


def engine_config(**parallel) -> EngineConfig:
    model = ModelConfig(model="deepseek-ai/DeepSeek-R1", hf_config=HFConfig({"architectures": ["DeepseekV3ForCausalLM"]}),
                        dtype="bfloat16", max_model_len=4096, tokenizer="deepseek-ai/DeepSeek-R1")
    return EngineConfig(model=model, cache=CacheConfig(), scheduler=SchedulerConfig(),
                        parallel=ParallelConfig(**parallel), device="cuda", ops="auto", enforce_eager=False,
                        cuda_graph_sizes=[1, 2, 4])


# the hash of engine_config(): a fixed value, so that it is the same at every start and on every machine
HASH8 = "30cd2283"


@pytest.mark.parametrize("parallel, mode, value, expected", [
    ({}, "full", None, f"deepserve-{__version__}-{HASH8}"),
    ({"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "data_parallel_size": 4, "enable_expert_parallel": True},
     "full", None, f"deepserve-{__version__}-tp8-pp2-dp4-ep-"),
    ({"tensor_parallel_size": 8}, "full", None, f"deepserve-{__version__}-tp8-"),
    ({"data_parallel_size": 2, "enable_expert_parallel": True}, "full", None, f"deepserve-{__version__}-dp2-ep-"),
    ({"tensor_parallel_size": 8}, "hash", None, f"deepserve-{__version__}-"),
    ({}, "custom", "fp_44709d6fcb", "fp_44709d6fcb"),
    ({}, "custom", None, None),       # vLLM's: custom without a value is null
    ({"tensor_parallel_size": 8}, "none", "ignored", None),
])
def test_fingerprint_format_as_vllms(parallel, mode, value, expected):
    """vLLM's build_system_fingerprint with deepserve's name and version: parallel degrees above 1
    and ep in full, none in hash; both end with 8 hex digits of the config hash."""
    got = system_fingerprint(engine_config(**parallel), mode, value)
    if expected is not None and expected.endswith("-"):
        assert got[:len(expected)] == expected and len(got) == len(expected) + 8, got
        int(got[-8:], 16)
    else:
        assert got == expected


def change(config: EngineConfig, part: str, **values) -> EngineConfig:
    return dataclasses.replace(config, **{part: dataclasses.replace(getattr(config, part), **values)})


@pytest.mark.parametrize("changed, differs", [
    (lambda c: change(c, "model", model="deepseek-ai/DeepSeek-V3"), True),
    (lambda c: change(c, "model", quantization="fp8"), True),
    (lambda c: change(c, "model", dtype="float16"), True),
    (lambda c: change(c, "model", max_model_len=8192), True),
    (lambda c: change(c, "cache", kv_cache_dtype="fp8"), True),
    (lambda c: change(c, "parallel", tensor_parallel_size=8), True),
    (lambda c: change(c, "parallel", enable_expert_parallel=True), True),
    (lambda c: dataclasses.replace(c, speculative=SpeculativeConfig(method="mtp", num_speculative_tokens=1)), True),
    (lambda c: change(c, "model", seed=7), False),
    (lambda c: change(c, "cache", gpu_memory_utilization=0.5), False),
    (lambda c: change(c, "scheduler", max_num_seqs=8), False),
    (lambda c: dataclasses.replace(engine_config()), False),   # a second start of the same command
])
def test_hash_follows_what_the_model_computes(changed, differs):
    base = system_fingerprint(engine_config(), "hash")
    assert (system_fingerprint(changed(engine_config()), "hash") != base) == differs


async def fingerprints(client: openai.AsyncOpenAI) -> dict:
    """Where each response and stream carries system_fingerprint: (value, sent) per response,
    (value, finish_reason, usage sent) per chunk that sends it."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    text = {"model": "m", "prompt": "Hi", "max_tokens": 3}
    out = {"chat": (await client.chat.completions.create(**chat)).system_fingerprint,
           "completion": (await client.completions.create(**text)).system_fingerprint}
    for name, create, kwargs in (("chat", client.chat.completions.create, chat),
                                 ("completion", client.completions.create, text)):
        for usage in (False, True):
            options = {"stream_options": {"include_usage": True}} if usage else {}
            chunks = [c async for c in await create(**kwargs, stream=True, **options)]
            out[f"{name} stream{' usage' if usage else ''}"] = [
                (c.system_fingerprint, c.choices[0].finish_reason if c.choices else None, c.usage is not None)
                for c in chunks if "system_fingerprint" in c.model_fields_set]
    return out


@pytest.mark.parametrize("fingerprint", ["deepserve-0.1.0-tp8-0123abcd", None])
def test_responses_and_streams_carry_it_as_vllms(fingerprint):
    """A whole response carries the field (null under none); a stream only on a choice's
    finishing chunk, or with include_usage on the usage chunk alone (vLLM's; was never sent)."""
    client = serve("deepseek-r1", "Fine, thanks.", system_fingerprint=fingerprint)
    got = asyncio.run(fingerprints(client))
    stamped = [] if fingerprint is None else [(fingerprint, "length", False)]
    usage = [] if fingerprint is None else [(fingerprint, None, True)]
    assert got == {"chat": fingerprint, "completion": fingerprint, "chat stream": stamped,
                   "completion stream": stamped, "chat stream usage": usage, "completion stream usage": usage}


@pytest.mark.parametrize("server, expected", [
    (ServerArgs(), lambda config: system_fingerprint(config)),
    (ServerArgs(fingerprint_mode="hash"), lambda config: system_fingerprint(config, "hash")),
    (ServerArgs(fingerprint_mode="custom", fingerprint_value="fp_x"), lambda config: "fp_x"),
    (ServerArgs(fingerprint_mode="none"), lambda config: None)])
def test_served_model_sends_its_fingerprint(server, expected):
    """The demo model served: the fingerprint of its engine config, full by default (vLLM's)."""
    engine_args = EngineArgs(num_gpu_blocks_override=32)
    engine = LLMEngine(engine_args)
    with TestClient(build_app(build_state(engine_args, server, engine=engine))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        got = client.completions.create(model=client.models.list().data[0].id, prompt="Once", max_tokens=2)
    assert got.system_fingerprint == expected(engine.config)
    assert server.fingerprint_mode != "full" or got.system_fingerprint.startswith(f"deepserve-{__version__}-")
