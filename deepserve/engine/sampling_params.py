"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's fields)."""
from __future__ import annotations

import enum
import json
import logging
import math
import numbers
from copy import copy, deepcopy
from dataclasses import InitVar, dataclass, field, replace
from typing import Any, Mapping, Optional, Union

logger = logging.getLogger("deepserve")


class RequestOutputKind(enum.Enum):
    """vLLM's: what each RequestOutput of a request holds. The offline LLM hands back only
    the final one whatever is asked (as vLLM's LLM does); the API server streams deltas."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingType(enum.IntEnum):
    """vLLM's: how a request's tokens are drawn."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _integer_text(key) -> bool:
    """Whether int(key) gives a token id (vLLM's test of a logit_bias key)."""
    try:
        int(key)
    except (ValueError, TypeError):
        return False
    return True


def whole_vocabulary(k: Optional[int], vocab_size: int) -> Optional[int]:
    """A logprobs / prompt_logprobs count with vLLM's -1 ("the whole vocabulary") as `vocab_size`."""
    return vocab_size if k == -1 else k


def logit_bias_by_token(bias: Optional[Mapping]) -> Optional[dict[int, float]]:
    """vLLM's reading of an API logit_bias: keys become token ids (ValueError in vLLM's words
    naming those that do not), values are clipped to [-100, 100]; None when empty."""
    if not bias:
        return None
    bad = [token for token in bias if not _integer_text(token)]
    if bad:
        raise ValueError(f"logit_bias contains key(s) that cannot be converted to integer token IDs: {bad!r}")
    return {int(token): min(100.0, max(-100.0, b)) for token, b in bias.items()}


@dataclass
class GuidedDecoding:
    """Structured output: exactly one of json / regex / choice / grammar / json_object
    (vLLM's StructuredOutputsParams). The grammar engine compiles it into `compiled`."""

    json: Optional[Union[str, dict]] = None
    """A JSON schema (object or its text) the output must satisfy."""
    regex: Optional[str] = None
    """A regular expression the whole output must match."""
    choice: Optional[list[str]] = None
    """The output is exactly one of these strings."""
    grammar: Optional[str] = None
    """An EBNF (GBNF) grammar the output must follow."""
    json_object: bool = False
    """Any JSON object (response_format json_object)."""
    structural_tag: Optional[str] = None
    """An xgrammar structural tag (JSON text): free text whose tagged parts are constrained, e.g.
    tool calls whose arguments follow their schemas (strict tools under tool_choice auto)."""
    disable_any_whitespace: bool = False
    """vLLM's; either value is served: the JSON grammars here are always compact (no whitespace
    between tokens)."""
    disable_additional_properties: bool = False
    """vLLM's; either value is served: a JSON schema's objects take only the properties it lists."""
    whitespace_pattern: Optional[str] = None
    """vLLM's (outlines'); refused: xgrammar has no whitespace pattern."""
    start_after_token: Optional[int] = None
    """Leave the output free until this token is generated (a reasoning model's </think>)."""
    compiled: Any = field(default=None, repr=False, compare=False)
    """The compiled grammar (engine/grammar.py), set before the request runs."""

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output needs exactly one of json, regex, choice, grammar, "
                             f"json_object, structural_tag; got {', '.join(given) or 'none'}")
        if self.whitespace_pattern is not None:
            raise ValueError("structured outputs: whitespace_pattern is not supported (xgrammar has none; its JSON "
                             "is compact)")
        for name in ("grammar", "json"):   # vLLM's checks, before anything compiles
            if isinstance(getattr(self, name), str) and not getattr(self, name).strip():
                raise ValueError(f"structured_outputs.{name} cannot be an empty string")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"guided_choice must be a non-empty list of strings, got {self.choice!r}")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"guided_json is not valid JSON: {exc}") from None

    def __getstate__(self) -> dict:
        # a compiled grammar cannot be pickled: an engine in another process compiles its own
        return {**self.__dict__, "compiled": None}

    def key(self) -> tuple:
        """What identifies the compiled grammar (cache key)."""
        schema = self.json if isinstance(self.json, str) or self.json is None else json.dumps(self.json, sort_keys=True)
        return (schema, self.regex, tuple(self.choice) if self.choice else None, self.grammar, self.json_object,
                self.structural_tag)


# vLLM's name for it (vllm.sampling_params.StructuredOutputsParams)
StructuredOutputsParams = GuidedDecoding

# most token ids one request's logprob_token_ids may name (vLLM's MAX_LOGPROB_TOKEN_IDS)
MAX_LOGPROB_TOKEN_IDS = 128
GREEDY_EPS = 1e-5   # vLLM's _SAMPLING_EPS: vLLM samples greedily below this temperature
MAX_N = 16384   # vLLM's default VLLM_MAX_N_SEQUENCES: more samples of one prompt are refused
MIN_TEMPERATURE = 1e-2   # vLLM's _MAX_TEMP: a lower non-zero temperature is raised to it


@dataclass
class SamplingParams:
    n: int = 1
    """Number of completions to return for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 turns it off."""
    min_p: float = 0.0
    """Drop tokens below min_p times the most likely token's probability."""
    seed: Optional[int] = None
    """Per-request seed: the same seed gives the same tokens, whatever else is batched."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of prompt and generated tokens divided (if > 0) or multiplied by it."""
    max_tokens: Optional[int] = 16
    """Most tokens to generate; None: up to the model's context length."""
    min_tokens: int = 0
    """Tokens to generate before EOS or a stop token may end the request."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are not part of the returned text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (besides EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS."""
    logprobs: Optional[int] = None
    """Return the log-probabilities of the sampled token and of this many most likely tokens
    (with logprob_token_ids: their number)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    include_stop_str_in_output: bool = False
    """Keep the stop string that ended generation in the text."""
    logprob_token_ids: Optional[list[int]] = None
    """vLLM's: at each generated position return the log-probabilities of exactly these token
    ids (at most 128), besides the sampled token's, in place of the most likely tokens."""
    prompt_logprobs: Optional[int] = None
    """Return the log-probability of every prompt token (the first has none) and of this many
    most likely tokens at each prompt position."""
    logit_bias: Optional[dict[int, float]] = None
    """Added to the logits of these token ids before sampling (any finite value; the API clips
    OpenAI's logit_bias to [-100, 100])."""
    guided: Optional[GuidedDecoding] = None
    """Structured output: the tokens are constrained by a grammar."""
    allowed_token_ids: Optional[list[int]] = None
    """Only these token ids may be sampled (vLLM's allowed_token_ids)."""
    priority: int = 0
    """With scheduling_policy priority: lower runs first (then arrival order), as in vLLM."""
    thinking_token_budget: Optional[int] = None
    """Most reasoning tokens before the end of reasoning is forced (engine/thinking_budget.py);
    -1 or None: no limit. Needs reasoning_token_ids (the server sets them from --reasoning-parser)."""
    reasoning_token_ids: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None
    """(the token ids that open reasoning, those that close it), e.g. R1's `<think>`, `</think>`."""
    bad_words: Optional[list[str]] = None
    """Words never generated (vLLM's): a word's last token is banned wherever the tokens
    generated so far end with its other tokens; each word counts with and without a leading space."""
    detokenize: bool = True
    """vLLM's: False leaves text "" and logprob entries' decoded_token None (the offline LLM's
    outputs); stop strings need it."""
    spaces_between_special_tokens: bool = True
    """vLLM's; either value gives the same text: the text is decoded as a stream (tokenizers'
    DecodeStream, vLLM's fast detokenizer), which writes no space between special tokens."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """vLLM's; the offline LLM returns each request's final output whatever it says."""
    extra_args: Optional[dict[str, Any]] = None
    """vLLM's: free-form data kept with the request (no built-in sampling reads it)."""
    flat_logprobs: bool = False
    """vLLM's FlatLogprobs container; True is refused (logprobs are a list of dicts)."""
    skip_clone: bool = False
    """vLLM's copy-avoidance switch; the engine never changes a caller's SamplingParams."""
    repetition_detection: Optional[Any] = None
    """vLLM's repetition stop; refused (not implemented)."""
    routed_experts_prompt_start: int = 0
    """vLLM's, for the routed experts it returns with --enable-return-routed-experts; those are not
    returned here, so only 0 is taken."""
    skip_reading_prefix_cache: Optional[bool] = None
    """vLLM's: True computes the whole prompt, reading no prefix-cache block (its blocks are
    still cached for later requests). None reads the cache: vLLM resolves None to True with
    prompt_logprobs, whose rows it takes from the prefill; here they come from a pass of their
    own over the whole prompt, so a cached prefix costs them nothing."""
    structured_outputs: InitVar[Optional[GuidedDecoding]] = None
    """vLLM's name for `guided` (StructuredOutputsParams), used where `guided` is not given;
    reading it reads `guided`."""
    _bad_words_token_ids: Optional[list[list[int]]] = field(default=None, init=False, repr=False, compare=False)
    _bad_words_index: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, structured_outputs: Optional[GuidedDecoding] = None):
        if self.guided is None:   # `guided` wins: dataclasses.replace(p, guided=...) passes the old one here
            self.guided = structured_outputs
        if self.seed == -1:   # vLLM's "no seed"
            self.seed = None
        for name in ("logprobs", "prompt_logprobs"):   # vLLM's: True asks for 1
            if getattr(self, name) is True:
                setattr(self, name, 1)
        self._check_vllm_switches()
        self._check_integers()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(self.stop):
            raise ValueError("stop cannot contain an empty string.")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None:
            self.top_k = 0
        self._check_ranges()
        if 0 < self.temperature < MIN_TEMPERATURE:   # vLLM's floor: below it the softmax may overflow
            logger.warning("temperature %s is below %s, which may give nan or inf; %s is used", self.temperature,
                           MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if self.temperature < GREEDY_EPS:   # greedy: vLLM turns the filters off
            if self.n > 1:   # vLLM's rule: n copies of one greedy answer
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self._check_logprob_token_ids()
        if self.logit_bias:
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
            # any finite value, as vLLM's SamplingParams (its API clips to OpenAI's [-100, 100] first)
            bad = next(((t, b) for t, b in self.logit_bias.items() if t < 0 or not math.isfinite(b)), None)
            if bad is not None:
                raise ValueError(f"logit_bias must map token ids >= 0 to finite values, got {bad[0]}: {bad[1]}")
        else:
            self.logit_bias = None
        if self.allowed_token_ids is not None and (not self.allowed_token_ids
                                                   or min(self.allowed_token_ids) < 0):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids}")
        self._check_thinking_budget()
        self._check_bad_words()

    def _check_ranges(self) -> None:
        """vLLM's _verify_args, in its words."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                             f"got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):   # -1: the whole vocabulary (the LLM resolves it)
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name} must be non-negative or -1, got {value}.")
        if self.stop_token_ids and min(self.stop_token_ids) < 0:
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")

    def _check_integers(self) -> None:
        """Counts and ids must be integers (a float failed deep in the sampler, or was truncated)."""
        def integer(value) -> bool:   # numpy's integers too
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        for name in ("n", "top_k", "max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs", "priority"):
            value = getattr(self, name)
            if value is not None or name in ("n", "min_tokens"):   # those two have no "unset"
                if not integer(value):
                    raise ValueError(f"{name} must be an integer, got {value!r}")
                setattr(self, name, int(value))
        ids = self.stop_token_ids or []
        if isinstance(ids, (str, bytes)) or not all(integer(t) for t in ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {ids!r}")

    def _check_vllm_switches(self) -> None:
        """vLLM's fields without a sampling effect here: the values served, or a refusal."""
        if self.flat_logprobs:
            raise ValueError("flat_logprobs=True is not supported: logprobs come as a list of {token_id: Logprob}")
        if self.repetition_detection is not None:
            raise ValueError("repetition_detection is not supported")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if not self.detokenize and self.stop:
            raise ValueError("stop strings are only supported when detokenize is True")
        if self.routed_experts_prompt_start != 0:
            raise ValueError(f"routed_experts_prompt_start={self.routed_experts_prompt_start!r} is not supported: "
                             "routed experts are not returned (--enable-return-routed-experts is refused)")
        if self.skip_reading_prefix_cache not in (None, True, False):
            raise ValueError(f"skip_reading_prefix_cache must be a bool or None, got {self.skip_reading_prefix_cache!r}")

    def _check_logprob_token_ids(self) -> None:
        """vLLM's rules (the vocabulary's end is the engine's check); logprobs becomes their
        number, so everything that hands logprobs back hands these back."""
        ids = self.logprob_token_ids
        if not ids:   # [] asks for nothing, as in vLLM
            self.logprob_token_ids = None
            return
        if isinstance(ids, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"logprob_token_ids must be a list of token ids, got {ids!r}")
        self.logprob_token_ids = ids = list(ids)
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise ValueError(f"logprob_token_ids may hold at most {MAX_LOGPROB_TOKEN_IDS} token ids, got {len(ids)}")
        if min(ids) < 0:
            raise ValueError(f"logprob_token_ids must be token ids >= 0, got {min(ids)}")
        if self.logprobs is not None and self.logprobs != len(ids):
            raise ValueError(f"logprob_token_ids: when both logprobs and logprob_token_ids are set, logprobs must "
                             f"equal len(logprob_token_ids); got logprobs={self.logprobs}, "
                             f"len(logprob_token_ids)={len(ids)}")
        self.logprobs = len(ids)

    def _check_thinking_budget(self) -> None:
        """vLLM's rule: a non-negative integer, or -1 for no limit (kept as None)."""
        budget = self.thinking_token_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < -1):
            raise ValueError(f"thinking_token_budget must be a non-negative integer or -1 for unlimited, got {budget!r}")
        if budget == -1:
            self.thinking_token_budget = None
        if self.reasoning_token_ids is not None:
            start, end = (tuple(int(t) for t in ids) for ids in self.reasoning_token_ids)
            if not start or not end:
                raise ValueError(f"reasoning_token_ids must be two non-empty lists of token ids, got "
                                 f"{self.reasoning_token_ids!r}")
            self.reasoning_token_ids = (start, end)

    def _check_bad_words(self) -> None:
        if isinstance(self.bad_words, str) or not all(isinstance(w, str) for w in self.bad_words or ()):
            raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}")
        self.bad_words = list(self.bad_words or [])
        if "" in self.bad_words:
            raise ValueError(f"bad_words cannot contain an empty string, got {self.bad_words!r}")

    def update_from_tokenizer(self, tokenizer) -> None:
        """Token ids of bad_words (vLLM's rule): each word stripped of leading spaces, then with one
        space before it when that gives other tokens (a word inside a text) of the same number."""
        ids: list[list[int]] = []
        for word in self.bad_words or ():
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValueError(f"bad_words: {word!r} has no tokens")
            ids.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                ids.append(spaced)
        self._bad_words_token_ids = ids or None
        self._bad_words_index = None

    @property
    def bad_words_token_ids(self) -> Optional[list[list[int]]]:
        """bad_words as token ids, set by the engine when it takes the request."""
        return self._bad_words_token_ids

    @staticmethod
    def from_optional(**kwargs) -> "SamplingParams":
        """vLLM's: None for n, a penalty, temperature or top_p means its default; logit_bias keys
        become token ids and its values are clipped to [-100, 100]."""
        for name, default in (("n", 1), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0), ("temperature", 1.0), ("top_p", 1.0)):
            if kwargs.get(name) is None:
                kwargs[name] = default
        kwargs["logit_bias"] = logit_bias_by_token(kwargs.get("logit_bias"))
        return SamplingParams(**kwargs)

    @property
    def sampling_type(self) -> SamplingType:
        """vLLM's: greedy, random, or random from the request's seed."""
        if self.temperature < GREEDY_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def num_logprobs(self) -> Optional[int]:
        """vLLM's: the logprobs returned per generated token besides the sampled one's (None: none)."""
        return self.logprobs

    def clone(self) -> "SamplingParams":
        """vLLM's: a deep copy (without a compiled grammar: the engine compiles it when it takes the
        copy); with skip_clone, a shallow one."""
        return copy(self) if self.skip_clone else deepcopy(self)

    def __repr__(self) -> str:
        """vLLM's text: the fields it prints, in its order."""
        names = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
                 "min_p", "seed", "stop", "stop_token_ids", "bad_words", "thinking_token_budget",
                 "include_stop_str_in_output", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                 "skip_special_tokens", "spaces_between_special_tokens", "structured_outputs", "extra_args")
        return f"SamplingParams({', '.join(f'{name}={getattr(self, name)}' for name in names)})"

    def with_max_tokens(self, max_tokens: int) -> "SamplingParams":
        """A copy with another max_tokens (min_tokens lowered to it where above), its bad_words'
        token ids kept."""
        return self._replaced(max_tokens=max_tokens, min_tokens=min(self.min_tokens, max_tokens))

    def with_grammar_after(self, token: int) -> "SamplingParams":
        """A copy whose grammar holds only once `token` is generated (a reasoning model's
        </think>), its bad_words' token ids kept."""
        return self._replaced(guided=replace(self.guided, start_after_token=token))

    def with_vocab_logprobs(self, vocab_size: int) -> "SamplingParams":
        """These params with logprobs / prompt_logprobs -1 (vLLM's "the whole vocabulary") as
        `vocab_size`; themselves where neither is -1."""
        whole = {name: whole_vocabulary(getattr(self, name), vocab_size) for name in ("logprobs", "prompt_logprobs")}
        changed = {name: k for name, k in whole.items() if k != getattr(self, name)}
        return self._replaced(**changed) if changed else self

    def _replaced(self, **changes) -> "SamplingParams":
        copy = replace(self, **changes)
        copy._bad_words_token_ids = self._bad_words_token_ids
        return copy

    def bad_words_index(self) -> tuple[list[int], dict[tuple[int, ...], list[int]], list[int]]:
        """bad_words_token_ids as a step reads them: the one-token words' ids, each longer word's
        last token under its other tokens, and those prefixes' lengths. Built once, so a step
        costs a lookup per prefix length, not a pass over thousands of words."""
        if self._bad_words_index is None:
            singles, by_prefix = [], {}
            for word in self._bad_words_token_ids or ():
                if len(word) == 1:
                    singles.append(word[0])
                else:
                    by_prefix.setdefault(tuple(word[:-1]), []).append(word[-1])
            self._bad_words_index = (singles, by_prefix, sorted({len(k) for k in by_prefix}))
        return self._bad_words_index

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def needs_host_history(self) -> bool:
        """Sampling reads the tokens generated so far on the host (penalties, min_tokens, the
        grammar's state, the thinking budget's count, bad_words) or hands logprobs back: async
        scheduling runs such steps synchronously."""
        return (self.logprobs is not None or self.has_penalties or self.min_tokens > 0
                or self.guided is not None or self.thinking_token_budget is not None or bool(self.bad_words))


# read as vLLM's SamplingParams.structured_outputs (the InitVar above only names the argument)
SamplingParams.structured_outputs = property(lambda self: self.guided, doc="vLLM's name for `guided`.")
