"""n > 1 with temperature 0 (greedy) is refused as vLLM 0.26 refuses it (SamplingParams:
"n must be 1 when using greedy sampling"): a 400 on /v1/completions and /v1/chat/completions, a
ValueError offline; sampled n > 1 and greedy beam search (n beams) are served."""
from __future__ import annotations

import openai
import pytest

from deepserve.engine.sampling_params import SamplingParams
from tests.server.conftest import API_KEY


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize("temperature", [0, 0.0])
def test_greedy_n_refused_offline(temperature):
    with pytest.raises(ValueError, match="n must be 1 when using greedy sampling, got 3"):
        SamplingParams(n=3, temperature=temperature)
    # vLLM raises a temperature in (0, 0.01) to 0.01 before its greedy test: it samples
    assert (SamplingParams(n=3, temperature=1e-6).n, SamplingParams(n=3, temperature=1e-6).temperature) == (3, 0.01)
    assert SamplingParams(n=1, temperature=0).n == 1


def test_greedy_n_refused_on_the_api(client):
    chat = dict(model="stories260k", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=4)
    completion = dict(model="stories260k", prompt="Once upon a time", max_tokens=4)
    for create, kw in ((client.completions.create, completion), (client.chat.completions.create, chat)):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                create(**kw, n=2, temperature=0, stream=stream)
            assert err.value.status_code == 400
            assert "n must be 1 when using greedy sampling, got 2" in err.value.message
        assert len(create(**kw, n=2, temperature=0.7, seed=1).choices) == 2
        assert len(create(**kw, n=2).choices) == 2   # no temperature: the default 1.0 samples
    beams = client.completions.create(**completion, n=2, temperature=0, extra_body={"use_beam_search": True})
    assert len(beams.choices) == 2


def test_llm_generate_refuses_greedy_n():
    from deepserve import LLM

    llm = LLM(num_gpu_blocks_override=64)
    try:
        with pytest.raises(ValueError, match="n must be 1 when using greedy sampling"):
            llm.generate("Once upon a time", SamplingParams(n=2, temperature=0, max_tokens=4), use_tqdm=False)
        out = llm.generate("Once upon a time", SamplingParams(n=2, temperature=0.9, seed=0, max_tokens=4),
                           use_tqdm=False)
        assert len(out[0].outputs) == 2
    finally:
        llm.shutdown()


def test_cli_generate_names_the_flags(capsys):
    from deepserve.cli.main import main

    assert main(["generate", "--prompt", "Once", "--n", "2", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--n 2 needs --temperature > 0" in err
