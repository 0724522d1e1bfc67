"""Tokenizer, chat template and incremental detokenization with the real R1 tokenizers."""
import pytest

from deepserve.engine.detokenizer import IncrementalDetokenizer
from deepserve.engine.tokenizer import Tokenizer

TEXT = "Hello 世界 🎉🎉 naïve <think>x</think> done — ünïcödé 你好吗？"


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"])
def test_incremental_detokenization_multibyte(shared_dir, name):
    tok = Tokenizer(shared_dir / "tokenizers" / name)
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_token_id
    detok = IncrementalDetokenizer(tok, ids[:1])
    pieces = [detok.add(t) for t in ids[1:]]
    assert "".join(pieces) == TEXT == tok.decode(ids[1:])
    assert all("\ufffd" not in p for p in pieces)


def test_r1_chat_template(shared_dir):
    tok = Tokenizer(shared_dir / "tokenizers" / "deepseek-r1")
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "<think>\nadd\n</think>\n4"},
                                    {"role": "user", "content": "3+3?"}])
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>")
    assert text.endswith("<｜User｜>3+3?<｜Assistant｜><think>\n")
    assert "add" not in text  # R1's template drops earlier reasoning
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert ids.count(tok.bos_token_id) == 1
