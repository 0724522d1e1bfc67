"""LLM.generate / chat / wait_for_completion show vLLM's progress bars by default (use_tqdm=True):
"Rendering prompts" and "Processed prompts" (one count per sample, with the token rates) on
stderr, nothing on stdout; use_tqdm=False shows none; a callable makes the bars."""
from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    with LLM(num_gpu_blocks_override=64) as llm:
        yield llm


def test_bars_on_stderr_by_default(llm, capsys):
    llm.generate(["Once upon a time", "One day"], SamplingParams(n=2, temperature=0.8, seed=0, max_tokens=3))
    out, err = capsys.readouterr()
    assert out == ""
    assert "Rendering prompts: 100%" in err and "2/2" in err
    assert "Processed prompts: 100%" in err and "4/4" in err and "est. speed input:" in err
    llm.enqueue(["a", "b"], SamplingParams(max_tokens=2))
    assert len(llm.wait_for_completion()) == 2
    assert "Processed prompts: 100%" in capsys.readouterr().err
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2), chat_template="{{ messages }}")
    assert "Processed prompts: 100%" in capsys.readouterr().err


def test_no_bar_when_off_and_a_callable_makes_them(llm, capsys):
    llm.generate("Once upon a time", SamplingParams(max_tokens=2), use_tqdm=False)
    assert capsys.readouterr() == ("", "")
    made = []

    def bar(*args, **kwargs):
        from tqdm import tqdm

        made.append(kwargs["desc"])
        return tqdm(*args, **kwargs, disable=True)

    llm.generate("Once upon a time", SamplingParams(max_tokens=2), use_tqdm=bar)
    assert made == ["Rendering prompts", "Processed prompts"]
    assert capsys.readouterr() == ("", "")
