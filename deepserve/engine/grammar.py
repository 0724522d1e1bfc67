"""Structured outputs through xgrammar: a request's JSON schema, regex, choice list or EBNF
grammar is compiled once per tokenizer (xgrammar caches compiled grammars), each sequence
walks it with its own matcher, and the sampler masks the logits of the constrained rows with
the matchers' token bitmasks (32 tokens per int32 word).

xgrammar (Apache-2.0, the engine vLLM and SGLang default to) was picked over llguidance and
outlines-core because its wheel installs on CPU-only machines and works with the CPU torch
build, it compiles JSON schemas with a persistent cache, and its bitmask kernels cover CPU
(C++) and CUDA (Triton/CUDA) alike. JSON is generated compact (no free whitespace between
tokens), so a model cannot pad its answer with endless blanks.
"""
from __future__ import annotations

import json
import re
import threading
import torch

from deepserve.engine.input_staging import to_device_async
from deepserve.engine.sampling_params import GuidedDecoding


def _xgr():
    import xgrammar  # imported on the first structured request: it pulls in transformers (~2 s)
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are the given strings."""
    def literal(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return "root ::= " + " | ".join(literal(c) for c in choices)


def structural_tag_args(text: str) -> tuple:
    """xgrammar's compile_structural_tag arguments for a structural tag's JSON text: the
    legacy form {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (vLLM's
    response_format form before xgrammar's own) as (tags, triggers), any other as itself."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(tag, dict) or "structures" not in tag:
        return (text,)
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list):
        raise ValueError("the legacy form needs lists structures and triggers")
    xgr = _xgr()
    try:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                 for s in structures]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"each of structures needs begin, schema and end ({exc!r})") from None
    return items, triggers


# xgrammar compilers by the tokenizer's files (path, size, mtime), logits width and stop ids: the
# table of a 129K vocabulary takes seconds to build, and every engine of a process (LLM objects,
# the beam-search compiler) would build its own
_SHARED: dict[tuple, object] = {}
_SHARED_LOCK = threading.Lock()


def _files_key(tokenizer) -> tuple:
    """The tokenizer's files as they are on disk, or () for one without (never shared)."""
    files = getattr(tokenizer, "files", ())
    try:
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()


class GrammarCompiler:
    """Compiles GuidedDecoding specs for one tokenizer and one logits width (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _build(self):
        xgr = _xgr()
        tok = self.tokenizer.tok  # the `tokenizers` object
        vocab = [""] * self.vocab_size
        for text, idx in tok.get_vocab(with_added_tokens=True).items():
            if idx < self.vocab_size:
                vocab[idx] = text
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
        info = xgr.TokenizerInfo(vocab, vocab_type=meta["vocab_type"], vocab_size=self.vocab_size,
                                 stop_token_ids=self.eos_token_ids,
                                 add_prefix_space=meta["add_prefix_space"])
        return xgr.GrammarCompiler(info, max_threads=2)

    def _get(self):
        with self._lock:
            if self._compiler is None:
                files = _files_key(self.tokenizer)
                if not files:
                    self._compiler = self._build()
                else:
                    with _SHARED_LOCK:
                        key = (files, self.vocab_size, tuple(self.eos_token_ids))
                        if key not in _SHARED:
                            _SHARED[key] = self._build()
                        self._compiler = _SHARED[key]
            return self._compiler

    def compile(self, spec: GuidedDecoding):
        """The compiled grammar of `spec` (also stored on it); ValueError for a bad spec."""
        compiler = self._get()
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                compiled = compiler.compile_json_schema(schema, any_whitespace=False)
            elif spec.json_object:  # OpenAI's json_object: an object, not any JSON value
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec.regex is not None:
                compiled = compiler.compile_regex(spec.regex)
            elif spec.choice is not None:
                compiled = compiler.compile_grammar(choice_grammar(spec.choice))
            elif spec.structural_tag is not None:
                compiled = compiler.compile_structural_tag(*structural_tag_args(spec.structural_tag))
            else:
                compiled = compiler.compile_grammar(spec.grammar)
        except (RuntimeError, TypeError, ValueError) as exc:
            # xgrammar reports bad schemas / grammars as RuntimeError, a structural tag of the wrong
            # shape as TypeError or pydantic's ValidationError (a ValueError)
            kind = next(k for k in ("json", "regex", "choice", "grammar", "structural_tag", "json_object")
                        if getattr(spec, k) not in (None, False))   # "" too: an empty structural tag
            # its message opens with a log prefix, "[15:59:11] /project/cpp/regex_converter.cc:94: ",
            # and may go on with the failed check, "Check failed: (...) is false: "
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip()
            reason = re.sub(r"^Check failed: \(.*?\) is false: ", "", reason)
            raise ValueError(f"the {kind} structured-output spec does not compile: {reason}") from None
        spec.compiled = compiled
        return compiled


class GrammarState:
    """One sequence's position in its grammar; inactive until `start_after_token` is seen.

    Sampled tokens are queued by `accept` and fed to the matcher by `catch_up`, which the
    bitmask filler calls at the next step, while the device runs that step's forward: the
    matcher's work then stays off the path between one step's tokens and the next launch."""

    def __init__(self, spec: GuidedDecoding):
        self.matcher = _xgr().GrammarMatcher(spec.compiled)
        self.start_after = spec.start_after_token
        self.active = spec.start_after_token is None
        self.pending: list[int] = []

    def accept(self, token: int) -> None:
        self.pending.append(token)

    def catch_up(self) -> None:
        for token in self.pending:
            if not self.active:
                self.active = token == self.start_after
            elif not self.matcher.is_terminated():
                self.matcher.accept_token(token)
        self.pending.clear()


class BitmaskFiller:
    """Fills the bitmask rows of a step's active grammars, several rows over CPU threads
    (xgrammar's BatchGrammarMatcher), one row directly."""

    def __init__(self):
        self._batch = None

    def __call__(self, logits: torch.Tensor, states: list[tuple[int, GrammarState]]) -> None:
        """Mask, in place, the rows of `logits` [N, V] whose grammar is active. Rows without
        one are untouched and cost nothing; the bitmask goes to the device without a sync."""
        for _, st in states:
            st.catch_up()
        rows = [(i, st) for i, st in states if st.active and not st.matcher.is_terminated()]
        if not rows:
            return
        xgr = _xgr()
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
        if len(rows) == 1:
            rows[0][1].matcher.fill_next_token_bitmask(bitmask, rows[0][0])
        else:
            if self._batch is None:
                self._batch = xgr.BatchGrammarMatcher()
            self._batch.batch_fill_next_token_bitmask([st.matcher for _, st in rows], bitmask,
                                                      indices=[i for i, _ in rows])
        apply_bitmask(logits, bitmask, [i for i, _ in rows])


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """-inf, in place, where the host bitmask [N, ceil(V / 32)] has a 0 bit, on `rows` only."""
    bitmask = to_device_async(bitmask, torch.int32, logits.device)
    # on a GPU the row list goes over pinned too: xgrammar would copy a list from pageable
    # memory, which waits for the stream
    indices = rows if logits.device.type == "cpu" else to_device_async(rows, torch.int32, logits.device)
    _xgr().apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=indices)
