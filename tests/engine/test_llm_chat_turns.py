"""LLM.chat's turns as templates read them (engine/llm_inputs.template_turn), rendered with the
real DeepSeek-R1 template, against vLLM 0.26's offline rendering."""
from __future__ import annotations

from pathlib import Path

import pytest

from deepserve.engine.llm_inputs import template_turn
from deepserve.engine.tokenizer import Tokenizer

R1 = Path(__file__).resolve().parents[2].parent / "shared" / "tokenizers" / "deepseek-r1"


@pytest.mark.parametrize("calls", [None, []])
def test_an_assistant_turn_without_calls_renders_its_text(calls):
    """An assistant turn with tool_calls None or [] (what the openai SDK's message.model_dump()
    gives for a reply without calls): vLLM drops the key, so R1's template, which tests
    `'tool_calls' in message`, writes the reply. Offline it wrote an empty calls block in place of
    the text ([]) or failed with "'NoneType' object is not iterable" (None)."""
    if not R1.is_dir():
        pytest.skip(f"{R1} not found")
    tok = Tokenizer(R1)
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
             {"role": "user", "content": "Go"}]
    sent = [plain[0], {**plain[1], "tool_calls": calls}, plain[2]]
    ours = tok.apply_chat_template([template_turn(m, "auto") for m in sent], add_generation_prompt=True,
                                   tokenize=False)
    assert ours == tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert "<｜Assistant｜>Hello there<｜end▁of▁sentence｜>" in ours and "tool▁calls" not in ours
