"""What the end-to-end guide tests share: a guide's commands as deepserve argv, the in-process
engine their answers are compared with, and the servers' client and clean stop."""
from __future__ import annotations

import openai

from deepserve import LLM, SamplingParams
from tests.cli.guides import commands, to_deepserve

GREEDY = dict(temperature=0)


def guide(reference, name):
    return [to_deepserve(c) for c in commands(reference / name)]


def engine(model, **kw) -> LLM:
    """The in-process engine, one process, that the servers' answers are compared with."""
    return LLM(str(model), max_model_len=256, max_num_batched_tokens=256, **kw)


def greedy_text(llm: LLM, prompt, max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    out = llm.chat(prompt, params) if isinstance(prompt, list) else llm.generate(prompt, params)
    return out[0].outputs[0].text


def stop_cleanly(server):
    assert server.stop(timeout=30) == 0, "".join(server.lines)[-2000:]


def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
