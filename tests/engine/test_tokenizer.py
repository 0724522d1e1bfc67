"""Tokenizer, chat template and incremental detokenization with the real R1 tokenizers."""
import random

import pytest

from deepserve.engine.tokenizer import Tokenizer, TextStream, load_tokenizer

TEXT = "Hello 世界 🎉🎉 naïve <think>x</think> done — ünïcödé 你好吗？"
# multi-byte characters cut across byte-level tokens: rare CJK, emoji with modifiers and ZWJ
# sequences, combining marks, right-to-left text
MULTIBYTE = ["鑫龘齉爨 𠀋𡈽𢌞 🇯🇵👩🏽‍💻👨‍👩‍👧‍👦🫠", "e\u0301 a\u0308 ﬁ Ⅻ ㊙ 〰 ｶﾀｶﾅ", "مرحبا بالعالم שלום עולם",
             "  two  spaces\nand\ttabs\n\n"]
NAMES = ["deepseek-r1", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"]


@pytest.fixture(scope="module", params=NAMES)
def tok(request, shared_dir):
    return load_tokenizer(str(shared_dir / "tokenizers" / request.param))


def stream_text(tok: Tokenizer, context: list[int], ids: list[int], skip: bool = True) -> tuple[str, list[str]]:
    stream = tok.decode_stream(context, skip)
    pieces = [stream.add(t) for t in ids]
    assert stream.text == "".join(pieces)
    return stream.text, pieces


def test_incremental_detokenization_multibyte(tok):
    ids = tok.encode(TEXT)
    assert tok.bos_token_id not in ids   # their tokenizer.json adds no BOS (transformers 5 neither)
    ids = [tok.bos_token_id] + ids
    text, pieces = stream_text(tok, ids[:1], ids[1:])
    assert text == TEXT == tok.decode(ids[1:])
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_full_decode(tok, skip):
    """The streamed text after a prompt equals the full decode of prompt + output less the
    prompt's own decode, for text and for random ids (byte pieces that may never complete a
    character, special tokens), with every piece free of U+FFFD."""
    rng = random.Random(7)
    prompt = tok.encode("Translate: ")
    cases = [tok.encode(t, add_special_tokens=False) for t in MULTIBYTE + [TEXT]]
    specials = sorted(tok.tok.get_added_tokens_decoder())[:20]
    vocab = tok.tok.get_vocab_size(with_added_tokens=False)
    cases += [[rng.randrange(vocab) for _ in range(60)] for _ in range(3)]
    cases.append([rng.choice(specials + [rng.randrange(vocab) for _ in range(10)]) for _ in range(40)])
    for ids in cases:
        text, pieces = stream_text(tok, prompt, ids, skip)
        context = prompt[-TextStream.CONTEXT:]
        full = tok.decode(context + ids, skip)
        before = tok.decode(context, skip)
        assert full.startswith(before)
        want = full[len(before):]
        # a trailing incomplete character is held back, never emitted
        assert text == want or (want.endswith("\ufffd") and want.startswith(text)), (text, want)
        assert all(not p.endswith("\ufffd") for p in pieces)


def test_jinja_environment_has_loopcontrols_and_tojson(tok):
    """One environment for every template: {% break %} (loopcontrols) and tojson work."""
    tok = Tokenizer(tok.folder, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'stop' %}{% break %}{% endif %}"
        "{{ m['content'] | tojson }};{% endfor %}{% if add_generation_prompt %}>{% endif %}"))
    messages = [{"role": "user", "content": "a\"b"}, {"role": "stop", "content": "x"},
                {"role": "user", "content": "never"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == '"a\\"b";>'


def test_tokenizer_file_and_counts(tok):
    same = Tokenizer(tok.folder / "tokenizer.json")
    assert same.vocab_size == tok.vocab_size and same.chat_template == tok.chat_template
    assert tok.count("") == 0 and tok.count(TEXT) == len(tok.encode(TEXT, add_special_tokens=False))
    special = set(tok.tok.get_added_tokens_decoder())
    assert tok.text_token_ids and not special.intersection(tok.text_token_ids)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tok.folder / "missing")


def test_r1_chat_template(shared_dir):
    tok = Tokenizer(shared_dir / "tokenizers" / "deepseek-r1")
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "<think>\nadd\n</think>\n4"},
                                    {"role": "user", "content": "3+3?"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>")
    assert text.endswith("<｜User｜>3+3?<｜Assistant｜><think>\n")
    assert "add" not in text  # R1's template drops earlier reasoning
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=False)
    assert ids.count(tok.bos_token_id) == 1


def test_transformers_names_give_transformers_answers(tok):
    """LLM.get_tokenizer() stands in for vLLM's transformers tokenizer: len, get_vocab and the
    token / id conversions answer as transformers' do."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tok.folder))
    assert len(tok) == len(ref) and tok.get_vocab() == ref.get_vocab()
    ids = tok.encode(TEXT) + [tok.eos_token_id]
    tokens = ref.convert_ids_to_tokens(ids)
    assert tok.convert_ids_to_tokens(ids) == tokens and tok.convert_ids_to_tokens(ids[0]) == tokens[0]
    assert tok.convert_tokens_to_ids(tokens) == ids and tok.convert_tokens_to_ids(tokens[-1]) == ids[-1]


@pytest.mark.parametrize("which", ["demo", "r1"])
def test_vllm_tokenizer_protocol_answers_as_transformers(shared_dir, which):
    """LLM.get_tokenizer() answers the rest of vLLM's TokenizerLike (vllm/tokenizers/protocol.py)
    and transformers' common names as AutoTokenizer does: special tokens and ids, pad / unk ids,
    tokenize, convert_tokens_to_string, truncation, text pairs, skip_special_tokens on
    convert_ids_to_tokens, the added vocabulary, model_max_length."""
    transformers = pytest.importorskip("transformers")
    from deepserve.config import DEMO_MODEL
    folder = DEMO_MODEL if which == "demo" else shared_dir / "tokenizers" / "deepseek-r1"
    ref, tok = transformers.AutoTokenizer.from_pretrained(str(folder)), Tokenizer(folder)
    assert tok.all_special_tokens == ref.all_special_tokens and tok.all_special_ids == ref.all_special_ids
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (ref.pad_token_id, ref.unk_token_id,
                                                                       ref.bos_token_id)
    assert (tok.model_max_length, tok.truncation_side, tok.is_fast) == (ref.model_max_length, "right", True)
    assert tok.num_special_tokens_to_add() == ref.num_special_tokens_to_add()
    assert tok.get_added_vocab() == ref.get_added_vocab() and tok.name_or_path == ref.name_or_path
    assert tok.max_token_id == max(ref.get_vocab().values())
    text = "Once upon a time, there was a little girl"
    assert tok.tokenize(text) == ref.tokenize(text)
    assert tok.tokenize(text, add_special_tokens=True) == ref.tokenize(text, add_special_tokens=True)
    assert tok.convert_tokens_to_string(ref.tokenize(text)) == ref.convert_tokens_to_string(ref.tokenize(text))
    for n in (3, 5):
        assert tok.encode(text, truncation=True, max_length=n) == ref.encode(text, truncation=True, max_length=n)
        assert tok(text, truncation=True, max_length=n).input_ids == ref(text, truncation=True, max_length=n).input_ids
        assert tok([text, "a b"], truncation=True, max_length=n).input_ids == \
            ref([text, "a b"], truncation=True, max_length=n).input_ids
    assert tok(text, "a pair").input_ids == ref(text, "a pair").input_ids
    ids = ref.encode(text) + list(range(4))
    assert tok.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
        ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
