"""The tokenizer of a Hugging Face folder (tokenizer.json + tokenizer_config.json), shared by
the engine and the benchmarks, with the model's own chat template rendered by a sandboxed
Jinja2 configured once (transformers' settings: trim_blocks, lstrip_blocks, loopcontrols,
tojson, raise_exception, strftime_now). Read with the `tokenizers` library: no transformers,
no remote code.

Benchmarks count tokens the way the model does (`count`: no special tokens added), never by
splitting on spaces. Special tokens (a BOS) are added as tokenizer.json's post-processor says,
not per tokenizer_config.json's add_bos_token: transformers >= 5 (what vLLM 0.26 loads the
tokenizer with) drops add_bos_token / add_eos_token when a tokenizer.json exists, so the R1
tokenizers (add_bos_token true, a ByteLevel post-processor that adds nothing) give a completion
prompt no BOS there, while their chat templates write one.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from deepserve.config import DEMO_MODEL


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _json_object(path: Path) -> dict:
    """The JSON object in `path`, or a ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _llama_pipeline(tok: HFTokenizer, cfg: dict) -> None:
    """The pre-tokenizer and decoder transformers >= 5 give a sentencepiece-style tokenizer.json
    whose tokenizer_config.json names LlamaTokenizer(Fast) (Llama 2, the demo model): its
    LlamaTokenizer keeps the file's vocab, merges and post-processor but replaces the file's
    normalizer (a "▁" prepended to every text segment, the legacy behaviour) with a Metaspace
    pre-tokenizer that prepends one to the first segment only. So " hi" and the text after a
    special token ("<s>hi") encode as vLLM 0.26's. A ByteLevel tokenizer.json (Llama 3, R1)
    is read as written, as AutoTokenizer does."""
    from tokenizers import decoders, pre_tokenizers

    if str(cfg.get("tokenizer_class") or "").removesuffix("Fast") != "LlamaTokenizer":
        return
    if any("ByteLevel" in str(part) for part in (tok.normalizer, tok.pre_tokenizer, tok.decoder, tok.post_processor)):
        return
    add_prefix_space = cfg.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    scheme = ("always" if cfg.get("legacy", False) else "first") if add_prefix_space else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))


VERY_LARGE_INTEGER = int(1e30)   # transformers' model_max_length where tokenizer_config.json gives none
SPECIAL_TOKEN_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class Tokenizer:
    """`path`: a folder with tokenizer.json (and tokenizer_config.json), or the tokenizer.json
    itself. `chat_template`: a template (or a file holding one) replacing the folder's."""

    def __init__(self, path: str | Path, chat_template: Optional[str] = None):
        self.name = str(path)
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: deepserve reads fast tokenizers (tokenizer.json; "
                                    "pass --tokenizer FOLDER)")
        folder = self.folder = file.parent
        # what the vocabulary is read from (engine/grammar.py shares its tables by them)
        self.files = tuple(f for f in (file, folder / "tokenizer_config.json") if f.is_file())
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as exc:    # the tokenizers library raises a plain Exception for a file it cannot read
            raise ValueError(f"{file} is not a tokenizer the tokenizers library reads: {exc}") from None
        self._token_texts: dict[int, str] = {}    # token_text's answers, by id
        cfg_path = folder / "tokenizer_config.json"
        cfg = _json_object(cfg_path) if cfg_path.is_file() else {}
        _llama_pipeline(self.tok, cfg)
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.unk_token = _token_text(cfg.get("unk_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.model_max_length = int(cfg.get("model_max_length") or VERY_LARGE_INTEGER)
        self.truncation_side = cfg.get("truncation_side") or "right"
        named = [_token_text(cfg.get(f"{kind}_token")) for kind in SPECIAL_TOKEN_KINDS]
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extra = [_token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        # transformers' all_special_tokens: the named ones in its order, then the extra ones, once each
        self.all_special_tokens = list(dict.fromkeys(t for t in named + extra if t))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_ids: set[int] = set()
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            self.eos_token_ids.add(self.tok.token_to_id(self.eos_token))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            eos = _json_object(gen_path).get("eos_token_id")
            self.eos_token_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if chat_template is not None:
            path = template_file(chat_template)
            template = path.read_text() if path is not None else chat_template
        self.chat_template: Optional[str] = template

    @property
    def eos_token_id(self) -> Optional[int]:
        return min(self.eos_token_ids) if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True, *, truncation: Optional[bool] = None,
               max_length: Optional[int] = None) -> list[int]:
        """The ids of `text`; `truncation`: at most `max_length` (default model_max_length) ids,
        special tokens included, cut on the truncation_side (transformers' and vLLM's)."""
        if not truncation:
            return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        limit = self.model_max_length if max_length is None else max_length
        enc = self.tok.encode(text, add_special_tokens=False)
        enc.truncate(max(0, limit - (self.num_special_tokens_to_add() if add_special_tokens else 0)),
                     direction=self.truncation_side)
        return self.tok.post_process(enc, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text, in one call of the Rust tokenizer, which releases the GIL and
        spreads the texts over the cores (a single `encode` holds the GIL throughout)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    @functools.cached_property
    def add_bos_token(self) -> bool:
        """Whether encoding with special tokens puts the BOS first (tokenizer.json's post-processor)."""
        return self.bos_token_id is not None and self.encode("")[:1] == [self.bos_token_id]

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (or of one id); special tokens are kept unless skipped, as in transformers."""
        ids = [ids] if isinstance(ids, int) else ids
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def token_text(self, token_id: int, at_start: bool = False) -> str:
        """The text one token adds (a logprob entry's token): inside a text, decoded after an
        ordinary token with that token's text taken off, so a SentencePiece word start keeps its
        space; `at_start` (only special tokens before it), decoded alone, where that space is
        dropped as the text's own decoding drops it."""
        if at_start:
            return self.decode([token_id], False)
        text = self._token_texts.get(token_id)
        if text is None:
            lead = self._lead_text
            pair = self.tok.decode([self._lead_id, int(token_id)], skip_special_tokens=False)
            text = pair[len(lead):] if lead and pair.startswith(lead) else self.decode([token_id], False)
            self._token_texts[token_id] = text
        return text

    @functools.cached_property
    def _lead_id(self) -> int:
        """An ordinary token that `token_text` decodes ahead of the token."""
        ids = self.tok.encode("a", add_special_tokens=False).ids
        return ids[-1] if ids else 0

    @functools.cached_property
    def _lead_text(self) -> str:
        return self.tok.decode([self._lead_id], skip_special_tokens=False)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids of special tokens (BOS, EOS, chat markers): dropped from decoded text."""
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def count(self, text: str) -> int:
        """Tokens of `text` as the model sees it inside a prompt (no special tokens added)."""
        return len(self.encode(text, add_special_tokens=False)) if text else 0

    @functools.cached_property
    def text_token_ids(self) -> list[int]:
        """Ids that decode to ordinary text (no added or special tokens): random benchmark
        prompts must not contain special tokens, which detokenization would drop."""
        special = set(self.tok.get_added_tokens_decoder())
        return [i for i in range(self.tok.get_vocab_size(with_added_tokens=False)) if i not in special]

    def decode_stream(self, context_ids: list[int] = (), skip_special_tokens: bool = True) -> "TextStream":
        """Incremental detokenization of the ids that follow `context_ids` (tokenizers' DecodeStream)."""
        return TextStream(self, context_ids, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id) or ""

    # transformers' names and defaults, for scripts that take LLM.get_tokenizer() for vLLM's (a
    # transformers tokenizer); deepserve's own code passes every option it relies on
    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str | list[str], text_pair: Optional[str] = None, add_special_tokens: bool = True,
                 truncation: bool = False, max_length: Optional[int] = None) -> "BatchEncoding":
        """input_ids and attention_mask of a text (or a text and its pair), or of each text (no
        padding); truncation as `encode`'s."""
        if text_pair is not None:
            if truncation:
                raise ValueError("truncation of a text pair is not supported")
            return BatchEncoding(self.tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids)
        if isinstance(text, str):
            return BatchEncoding(self.encode(text, add_special_tokens, truncation=truncation, max_length=max_length))
        if truncation:
            ids = [self.encode(t, add_special_tokens, truncation=True, max_length=max_length) for t in text]
        else:
            ids = self.encode_batch(text, add_special_tokens)
        return BatchEncoding(ids, [[1] * len(i) for i in ids])

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self.tok.decoder
        return decoder.decode(list(tokens)) if decoder is not None else "".join(tokens)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self.tok.num_special_tokens_to_add(pair)

    @functools.cached_property
    def all_special_ids(self) -> list[int]:
        return [self.tok.token_to_id(t) for t in self.all_special_tokens]

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.tok.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def unk_token_id(self) -> Optional[int]:
        return self.tok.token_to_id(self.unk_token) if self.unk_token else None

    @property
    def is_fast(self) -> bool:
        return True

    @property
    def name_or_path(self) -> str:
        return str(self.folder)

    @functools.cached_property
    def max_token_id(self) -> int:
        return max(self.get_vocab().values())

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        return max(len(t) for t in self.get_vocab())

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        """A token's id (None if it has none), or each token's."""
        return self.tok.token_to_id(tokens) if isinstance(tokens, str) else [self.tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        """An id's token, or each id's (less all_special_ids with `skip_special_tokens`)."""
        if isinstance(ids, int):
            return self.tok.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self.tok.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, continue_final_message: bool = False,
                            return_dict: bool = True, **extra):
        """Render `messages` with the model's chat template, with transformers' defaults: the
        ids, as a BatchEncoding unless return_dict=False; the text with tokenize=False.
        `continue_final_message`: the text ends right after the last message's content (what
        the template writes after it, end-of-turn tokens included, is cut), so the model goes
        on with that message: an assistant prefill."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.folder} has no chat_template; pass --chat-template")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: one "
                             "continues the last message, the other opens a new one")
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        if continue_final_message:
            final = messages[-1].get("content") or ""
            if not isinstance(final, str):  # content parts
                final = "".join(part.get("text") or "" for part in final)
            text = _cut_after_final_message(text, final)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)   # the template writes the BOS itself
        return BatchEncoding(ids) if return_dict else ids


class BatchEncoding(dict):
    """transformers' BatchEncoding as far as scripts read it: input_ids and attention_mask, as
    keys or attributes."""

    def __init__(self, input_ids: list, attention_mask: Optional[list] = None):
        super().__init__(input_ids=input_ids,
                         attention_mask=[1] * len(input_ids) if attention_mask is None else attention_mask)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def template_file(value: str) -> Optional[Path]:
    """`value` as the path of a chat template file; None where it names none (it is the template's
    text: vLLM's --chat-template takes either)."""
    try:
        path = Path(value)
        return path if path.is_file() else None
    except OSError:   # ENAMETOOLONG: a template longer than a file name can be
        return None


def _cut_after_final_message(text: str, final: str) -> str:
    """`text` up to the end of the last occurrence of `final` (or of `final` stripped: templates
    often strip a message's content)."""
    for wanted in (final, final.strip()):
        if wanted and wanted in text:
            return text[:text.rindex(wanted) + len(wanted)]
    raise ValueError("continue_final_message: the last message's content does not appear in the chat "
                     "as the template renders it (is it empty, or does the template rewrite it?)")


class TextStream:
    """Text of a growing list of token ids, one token at a time, correct across multi-byte
    characters split over tokens (one CJK character or emoji can span several byte-level
    tokens, each alone decoding to U+FFFD): tokenizers' DecodeStream, which decodes a short
    window and emits only what extends the window's previous text, holding back while it
    ends in an incomplete character. A few context ids (the prompt's last) go first and
    print nothing, so the first output token keeps its leading space."""

    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context_ids)[-self.CONTEXT:]
        self._read = len(self.ids)          # ids up to here have been turned into text
        self._restart(self.ids)
        self.text = ""

    def _restart(self, window: list[int]) -> None:
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        for token_id in window:
            try:
                self._stream.step(self.tokenizer.tok, int(token_id))
            except Exception:   # tokenizers raises its own exception type; the window only primes
                self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        try:
            delta = self._stream.step(self.tokenizer.tok, int(token_id)) or ""
        except Exception:
            # DecodeStream refuses some byte-fallback sequences ("Invalid prefix"): the text the
            # tokens since the last output add to a short window before them, held back while it
            # ends mid-character (the prefix/read-offset rule of HF's TextStreamer)
            start = max(0, self._read - self.CONTEXT)
            decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
            before, now = decode(self.ids[start:self._read]), decode(self.ids[start:])
            delta = "" if now.endswith("\ufffd") else now[len(before):]
            self._restart(self.ids[-self.CONTEXT:])
        if delta:
            self._read = len(self.ids)
        self.text += delta
        return delta


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Tokenizer:
    """A shared Tokenizer per path: a large vocabulary takes a second or more to load."""
    return Tokenizer(path)


def resolve_tokenizer(tokenizer: Optional[str], model: Optional[str]) -> Tokenizer:
    """`--tokenizer` if given, else `--model` when it is a local folder with a tokenizer.json, else
    the built-in demo's when `--model` is the name it is served under (`deepserve serve` with no
    model), so a bench against the demo server needs no flag."""
    if tokenizer:
        return load_tokenizer(str(tokenizer))
    if model and (Path(model) / "tokenizer.json").is_file():
        return load_tokenizer(str(model))
    if model == Path(DEMO_MODEL).name:
        return load_tokenizer(DEMO_MODEL)
    raise ValueError(f"no tokenizer to count tokens with: --model {model!r} is not a folder with a "
                     "tokenizer.json; pass --tokenizer FOLDER")


class JSONArguments(str):
    """A tool call's arguments as a chat template sees them: their JSON text, which R1's and the
    distills' templates join into the prompt, whose `tojson` is the value the text holds (as
    transformers documents arguments, a dict, and vLLM renders them), not a JSON string of it."""

    def __new__(cls, text: str, value):
        obj = super().__new__(cls, text)
        obj.value = value
        return obj


def tool_call_arguments(arguments):
    """A past tool call's arguments as a chat template sees them, by vLLM's rule: JSON text as
    JSONArguments, empty text or JSON null as {} (JSONArguments too), any other value as given.
    Text that is not JSON is a ValueError, as vLLM's json.loads of it is (a 400 on its API)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        value = json.loads(arguments) if arguments else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc}): {arguments[:60]!r}") from None
    return JSONArguments("{}", {}) if value is None else JSONArguments(arguments, value)


def _plain(x):
    """`x` with JSONArguments replaced by their values."""
    if isinstance(x, JSONArguments):
        return x.value
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _tojson(x, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    """transformers' tojson filter."""
    return json.dumps(_plain(x), indent=indent, ensure_ascii=ensure_ascii, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise ValueError(f"chat template error: {message}")


@functools.lru_cache(maxsize=1)
def _jinja_env():
    """The one Jinja environment chat templates render in (sandboxed, as transformers')."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    return _jinja_env().from_string(template)
