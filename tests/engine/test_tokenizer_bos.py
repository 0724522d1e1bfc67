"""Prompt token ids as vLLM 0.26 makes them: it loads the tokenizer with transformers'
AutoTokenizer (>= 5.5.3), which drops tokenizer_config.json's add_bos_token when a
tokenizer.json exists, so special tokens come only from tokenizer.json's post-processor. The R1
tokenizers' post-processors add none: a /v1/completions prompt has no BOS; the chat templates
write one, and the rendered text is encoded without special tokens (one BOS)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deepserve.engine.tokenizer import Tokenizer

B = "<｜begin▁of▁sentence｜>"
PROMPTS = ["Hello world", " leading space", B + "Hello", "<｜User｜>hi", "Hello" + B, "你好 🎉"]
# (tokenizer folder, preset whose config.json AutoTokenizer reads beside it, "Hello world" as vLLM encodes it)
CASES = [("deepseek-r1", "deepseek-r1", [19923, 2058]),
         ("deepseek-r1-distill-qwen-7b", "r1-distill-qwen-7b", [9707, 1879]),
         ("deepseek-r1-distill-llama-8b", "r1-distill-llama-8b", [9906, 1917])]
PRESETS = Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "presets"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.mark.parametrize("name, preset, hello", CASES)
def test_completion_prompts_get_no_bos_and_chat_one(shared_dir, name, preset, hello):
    tok = Tokenizer(shared_dir / "tokenizers" / name)
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False) == hello
    assert tok.encode(B + "Hello")[:1] == [tok.bos_token_id] and tok.encode(B + "Hello").count(tok.bos_token_id) == 1
    assert not tok.add_bos_token
    ids = tok.apply_chat_template(MESSAGES).input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name, preset, hello", CASES)
def test_ids_equal_transformers_autotokenizer(shared_dir, tmp_path, name, preset, hello):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"vLLM 0.26 loads tokenizers with transformers >= 5.5.3, not {transformers.__version__}")
    folder = tmp_path / name   # the tokenizer beside its model's config.json, as in a checkpoint
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / name / file, folder / file)
    config = json.loads((PRESETS / f"{preset}.json").read_text())
    (folder / "config.json").write_text(json.dumps(config.get("config", config)))
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(folder)
    for prompt in PROMPTS:   # vLLM's completions: add_special_tokens=True
        assert tok.encode(prompt) == hf(prompt, add_special_tokens=True).input_ids, prompt
    text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    # vLLM's chat completions: the rendered text, add_special_tokens=False
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert ids == hf(text, add_special_tokens=False).input_ids
    # transformers' defaults, for scripts holding LLM.get_tokenizer(): no generation prompt, a
    # BatchEncoding of the ids; decode keeps special tokens
    assert dict(tok.apply_chat_template(MESSAGES)) == dict(hf.apply_chat_template(MESSAGES))
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == hf.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.apply_chat_template(MESSAGES).input_ids == hf.apply_chat_template(MESSAGES).input_ids
    assert tok.decode(ids) == hf.decode(ids) and tok.decode(ids[0]) == hf.decode(ids[0])
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) != hf.decode(ids)
    assert tok.batch_decode([ids, ids[1:]]) == hf.batch_decode([ids, ids[1:]])
    assert dict(tok(PROMPTS[0])) == dict(hf(PROMPTS[0])) and tok(PROMPTS[0]).input_ids == hf(PROMPTS[0]).input_ids
    assert dict(tok(PROMPTS)) == dict(hf(PROMPTS))


def test_demo_model_ids_equal_transformers_autotokenizer():
    """The demo model's tokenizer.json is sentencepiece-style and its tokenizer_config.json names
    LlamaTokenizerFast: transformers >= 5 prepends "▁" to the first text segment only, so a
    leading space and the text after a special token encode as vLLM 0.26's (the file's
    normalizer prepends one to every segment)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"vLLM 0.26 loads tokenizers with transformers >= 5.5.3, not {transformers.__version__}")
    from deepserve.config import DEMO_MODEL
    hf = transformers.AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    tok = Tokenizer(DEMO_MODEL)
    prompts = ["Once upon a time", " leading space", "  two", "<s>Hello there", "a</s>b", "x  y\n z", "end "]
    for prompt in prompts:
        for special in (True, False):
            assert tok.encode(prompt, add_special_tokens=special) == \
                hf(prompt, add_special_tokens=special).input_ids, (prompt, special)
    for prompt in prompts:
        ids = hf(prompt).input_ids
        assert tok.decode(ids) == hf.decode(ids) and tok.decode(ids, True) == hf.decode(ids, skip_special_tokens=True)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
