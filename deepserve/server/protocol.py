"""The wire protocol: pydantic models for OpenAI's completions and chat requests (plus vLLM's
extra sampling and structured-output fields) and the converters to SamplingParams.

Types are checked by pydantic in its lax mode, as vLLM's models are (5.0 and "5" are the
integer 5, "true" is true; "five" or 5.5 where an integer belongs is a 400), but for NaN and
Infinity, which JSON parsers accept and no sampling value may be: a 400. Value ranges are
checked once, by SamplingParams, whose messages name the field and the value. Nothing is
ignored silently: a field OpenAI's or vLLM's API defines that this server does not implement
(OpenAI's `audio`, vLLM's `mm_processor_kwargs`, ...) is a 400 naming it (`unsupported_field`); a
field neither API defines is ignored with one warning line per request naming it
(`ignored_fields`, vLLM's behaviour). A field sent as null, false or empty ("", [], {}) asks for
nothing and passes, as does a value asking for what the server does anyway (`modalities`
["text"], `service_tier` auto or default, vLLM's defaults `length_penalty` 1 and
`truncation_side` left).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from deepserve.engine.sampling_params import GuidedDecoding, SamplingParams, logit_bias_by_token
from deepserve.server.errors import APIError


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_ids(prefix: str, request_id: Optional[str]) -> tuple[str, str]:
    """(the response's id, the engine request's id). A client's request_id names the response
    (vLLM's); the engine's id stays unique when clients reuse one (at once, or in a retry of a
    request they left, whose last outputs may still be on their way)."""
    if not request_id:
        rid = random_id(prefix)
        return rid, rid
    rid = f"{prefix}-{request_id}"
    return rid, random_id(rid)


class _Wire(BaseModel):
    """vLLM's type coercion (pydantic's lax mode) without NaN or Infinity; fields not declared
    are kept for `unsupported_field`."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# why some well-known fields are refused (the rest get a generic message)
_WHY_NOT = {
    "functions": "use tools", "function_call": "use tool_choice",
    "use_beam_search": "chat completions and completions only: vLLM's Responses API has none",
    "length_penalty": "chat completions and completions only: vLLM's Responses API has none",
    "audio": "text only", "modalities": "text only", "prediction": "predicted outputs are not implemented",
    "bad_words": "chat completions and completions only: vLLM's Responses API has none",
    "guided_decoding_backend": "the grammar engine is xgrammar, chosen by the server",
    "chat_template": "chat completions and /tokenize only, with the server's --trust-request-chat-template",
    "truncation_side": "truncate_prompt_tokens keeps the prompt's last tokens (\"left\")",
    "logprob_token_ids": "chat completions and completions only: vLLM's Responses API has none",
    "media_io_kwargs": "text only",
    "thinking_token_budget": "chat completions and completions only; vLLM's Responses API does not take it either",
    "reasoning_effort": "chat completions only: the chat template applies it",
    "return_prompt_text": "chat completions only (vLLM's): the chat template's rendered prompt",
    "whitespace_pattern": "xgrammar, the grammar engine, takes no whitespace pattern: JSON is generated compact",
    "guided_whitespace_pattern": "xgrammar, the grammar engine, takes no whitespace pattern: JSON is generated "
                                 "compact",
    "structural_tag": "give it as structured_outputs.structural_tag or response_format type structural_tag",
    "enable_response_messages": "vLLM's, for its harmony models: the response does not list its messages",
    "previous_input_messages": "vLLM's harmony-format history: send the conversation in input",
}


# request fields OpenAI's or vLLM's API defines that this server does not implement (those it
# implements are declared on the models below, so they never reach this check)
KNOWN_UNSUPPORTED = set(_WHY_NOT) | {
    "store", "service_tier", "reasoning_effort", "web_search_options", "verbosity",
    "prompt_cache_key", "suffix", "input_audio", "image_url", "file", "refusal",
    "guided_whitespace_pattern", "mm_processor_kwargs",
    "kv_transfer_params", "vllm_xargs", "logits_processors",
    "structural_tag", "guided_json_object", "prompt_embeds", "return_token_offsets", "return_prompt_text",
    "return_assistant_tokens_mask", "ec_transfer_params", "repetition_detection",
    # structured_outputs' options (vLLM's StructuredOutputsParams)
    "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern",
    "include_obfuscation",   # OpenAI's stream_options: padding of stream events against side channels
}


# values of those fields that ask for what this server does anyway: accepted
_SATISFIED = {"modalities": (["text"],), "service_tier": ("auto", "default"), "truncation_side": ("left",),
              "length_penalty": (1.0,)}
_EMPTY = ("", [], {})


def _sent_extras(model: BaseModel, path: str = ""):
    """(path, name) of each undeclared field sent with a value, nested models included."""
    for name, value in (model.model_extra or {}).items():
        if value is not None and value is not False and value not in _EMPTY and value not in _SATISFIED.get(name, ()):
            yield f"{path}{name}", name
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                yield from _sent_extras(item, f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}.")


def unsupported_field(model: BaseModel) -> Optional[tuple[str, str]]:
    """(field path, message) of the first field sent that OpenAI's or vLLM's API defines and this
    server does not implement; None when there is none."""
    for where, name in _sent_extras(model):
        if name in KNOWN_UNSUPPORTED:
            why = _WHY_NOT.get(name, "")
            return where, f"{where} is not supported by this server" + (f" ({why})" if why else "")
    return None


def ignored_fields(model: BaseModel) -> list[str]:
    """Paths of the fields sent that neither API defines: the server ignores them (and says so)."""
    return [where for where, name in _sent_extras(model) if name not in KNOWN_UNSUPPORTED]


class JsonSchemaFormat(_Wire):
    name: str   # required, as by OpenAI and vLLM
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class StructuralTagItem(_Wire):
    """One structure of the legacy structural_tag response_format: text opening with `begin`
    (after a trigger), then JSON following `schema`, then `end`."""

    begin: str
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    end: str


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    # structural_tag: xgrammar's structural tag in `format`, or vLLM's legacy structures + triggers
    format: Optional[Any] = None
    structures: Optional[list[StructuralTagItem]] = None
    triggers: Optional[list[str]] = None

    def structural_tag(self) -> str:
        """The structural tag's JSON text (vLLM's: the response_format itself)."""
        if self.format is not None:
            return json.dumps({"type": "structural_tag", "format": self.format})
        if self.structures is None or self.triggers is None:
            raise ValueError("response_format structural_tag needs format (or structures and triggers)")
        return json.dumps({"type": "structural_tag", "triggers": self.triggers,
                           "structures": [s.model_dump(by_alias=True) for s in self.structures]})


class StructuredOutputs(_Wire):
    """vLLM's `structured_outputs` field (StructuredOutputsParams)."""

    json_: Optional[Union[str, dict[str, Any]]] = Field(default=None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None   # xgrammar's structural tag, JSON text
    # what xgrammar does anyway: JSON compact (no whitespace between tokens), an object's keys
    # only those its schema names where it says nothing of additionalProperties (strict mode)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


class StreamOptions(_Wire):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# fields OpenAI's API declares nullable that have a default here: null asks for the default (vLLM's
# n, penalties, stream, logprobs and echo take null too; clients that fill every field they know send it).
# A completion's max_tokens null is its default 16, as vLLM reads it (not "up to the context").
_NULL_IS_DEFAULT = frozenset({"n", "presence_penalty", "frequency_penalty", "stream", "logprobs", "echo",
                              "max_tokens"})


class _SamplingFields(_Wire):
    """Fields both endpoints share (OpenAI's, then vLLM's extras)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in _NULL_IS_DEFAULT):
            return {k: v for k, v in data.items() if v is not None or k not in _NULL_IS_DEFAULT}
        return data

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    user: Optional[str] = None
    safety_identifier: Optional[str] = None   # OpenAI's successor of `user`: a label, as user is
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[dict[str, float]] = None
    prompt_logprobs: Optional[int] = None
    # vLLM's: the logprobs of exactly these ids at each generated position (with logprobs)
    logprob_token_ids: Optional[list[int]] = None
    priority: int = 0
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt (or, without
    # one, with others without); vLLM refuses an empty salt
    cache_salt: Optional[Annotated[str, StringConstraints(min_length=1)]] = None
    truncate_prompt_tokens: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[StructuredOutputs] = None
    request_id: Optional[str] = None   # the response's id ends with it (vLLM's)
    # vLLM's: the prompt's and each choice's token ids in the response (streamed: the prompt's
    # with the first chunk, each chunk's new tokens with it)
    return_token_ids: Optional[bool] = None
    return_tokens_as_token_ids: Optional[bool] = None   # vLLM's: logprobs name tokens `token_id:N`
    best_of: Optional[int] = None      # only = n (no extra samples to rank)
    # vLLM's: a space between special tokens in the text. Its fast-tokenizer detokenizer (the
    # only kind deepserve has) writes none either way, nor does deepserve's.
    spaces_between_special_tokens: bool = True
    # vLLM's: most reasoning tokens before </think> is forced (-1: no limit); needs --reasoning-parser.
    # A JSON integer only, as vLLM's validator takes it (true, 8.0 and "8" are 400s)
    thinking_token_budget: Optional[Annotated[int, Field(strict=True)]] = None
    # vLLM's beam search: n beams, scored by cumulative logprob / length ** length_penalty
    # (server/beam.py refuses the fields it does not honour)
    use_beam_search: bool = False
    length_penalty: float = 1.0

    def max_tokens_field(self) -> str:
        """The field the output length came from, for errors to name what the client sent."""
        return "max_completion_tokens" if getattr(self, "max_completion_tokens", None) is not None else "max_tokens"

    def guided(self) -> Optional[GuidedDecoding]:
        """The structured-output request, from whichever field carries it (one at most)."""
        specs = self._guided_specs()
        if len(specs) > 1:
            raise ValueError(f"structured_outputs: give one of {', '.join(n for n, _ in specs)}, not several")
        return specs[0][1] if specs else None

    def guided_field(self) -> Optional[str]:
        """The field carrying the structured-output request (a spec that does not compile names it)."""
        specs = self._guided_specs()
        return specs[0][0] if specs else None

    def _guided_specs(self) -> list[tuple[str, GuidedDecoding]]:
        specs = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            specs.append(("response_format", GuidedDecoding(json_object=True)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            specs.append(("response_format", GuidedDecoding(json=rf.json_schema.schema_)))
        elif rf is not None and rf.type == "structural_tag":
            specs.append(("response_format", GuidedDecoding(structural_tag=rf.structural_tag())))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                specs.append((name, GuidedDecoding(**{kind: getattr(self, name)})))
        so = self.structured_outputs
        if so is not None:
            kinds = dict(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                         structural_tag=so.structural_tag)
            if so.json_object or any(v is not None for v in kinds.values()):
                specs.append(("structured_outputs", GuidedDecoding(json_object=bool(so.json_object), **kinds)))
            elif not specs:     # its options (disable_any_whitespace, ...) beside no constraint
                raise ValueError("structured_outputs: give one of json, regex, choice, grammar, json_object, "
                                 "structural_tag (its options alone constrain nothing)")
        return specs

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                        defaults: Optional[dict] = None) -> SamplingParams:
        """Raises ValueError naming the field for out-of-range values. `defaults`: the
        model's generation config (temperature, top_p, top_k, min_p, repetition_penalty),
        used where the request leaves a field out."""
        d = defaults or {}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stop:   # vLLM's check: an empty string would end every reply at once
            raise ValueError("stop cannot contain an empty string")

        def pick(name: str, fallback):
            value = getattr(self, name)
            return value if value is not None else d.get(name, fallback)
        params = SamplingParams(
            n=1 if self.use_beam_search else self.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=None if self.logprob_token_ids else logprobs,   # their number (vLLM's)
            logprob_token_ids=self.logprob_token_ids,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.prompt_logprobs,
            logit_bias=logit_bias_by_token(self.logit_bias),
            guided=self.guided(),
            priority=self.priority,
            allowed_token_ids=self.allowed_token_ids,
            thinking_token_budget=self.thinking_token_budget,
            bad_words=self.bad_words,
        )
        if self.use_beam_search:   # n is the beam width: greedy beams are allowed (vLLM's BeamSearchParams)
            params.n = self.n
        return params


PromptField = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: Optional[PromptField] = None   # none or "": a 400 in vLLM's words (serving_completions)
    max_tokens: Optional[int] = 16
    max_completion_tokens: Optional[int] = None   # vLLM takes it here too (the vllm-ascend guide sends it)
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    add_special_tokens: bool = True

    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt field as a list of prompts (each a string or a token-id list)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if any(x == [] for x in p):
            raise ValueError("The decoder prompt cannot be empty")   # vLLM's engine text
        return list(p)


# the content part types that are text (vLLM renders these five), each with the key holding it
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "thinking": "thinking"}


class ContentPart(_Wire):
    type: str
    text: Optional[str] = None
    refusal: Optional[str] = None
    thinking: Optional[str] = None

    def part_text(self) -> str:
        """The part's text; a 400 for a part that is not text (images, audio, files)."""
        if self.type not in _TEXT_PARTS:
            raise APIError(400, f"content part type {self.type!r} is not supported (text only: "
                                f"{', '.join(_TEXT_PARTS)})", param="messages")
        return getattr(self, _TEXT_PARTS[self.type]) or ""


def content_texts(parts: list) -> list[str]:
    """The texts of a content list, as vLLM reads one: a plain string is a text part, a text or
    refusal part without its text is skipped (vLLM warns and drops it)."""
    return [p if isinstance(p, str) else p.part_text() for p in parts
            if isinstance(p, str) or p.type not in ("text", "refusal") or getattr(p, _TEXT_PARTS[p.type]) is not None]


class FunctionCall(_Wire):
    name: str
    arguments: str


class ToolCall(_Wire):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[Union[str, ContentPart]]]] = None   # vLLM takes plain strings in the list
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None

    def template_dict(self) -> dict:
        """The message as chat templates see it (transformers' shape): only the keys sent;
        content None stays None beside tool calls (R1's template tests for it); a turn's
        reasoning, sent under either name, under both (vLLM's, for either kind of template)."""
        msg: dict = {"role": self.role}
        msg["content"] = None if self.content is None and self.tool_calls else self.text()
        if self.tool_calls:
            msg["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
        if reasoning is not None:
            msg["reasoning"] = msg["reasoning_content"] = reasoning
        return msg

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(content_texts(self.content))   # vLLM's join for templates that take strings


class FunctionDef(_Wire):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Wire):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False   # the last (assistant) message is a prefill to continue
    echo: bool = False                     # the reply starts with the last message, if it is the reply's role
    include_reasoning: bool = True         # False: no reasoning_content in the reply
    # vLLM's: the chat template's rendered prompt as the response's prompt_text (streamed: with the role chunks)
    return_prompt_text: Optional[bool] = None
    add_special_tokens: bool = False
    chat_template: Optional[str] = None    # vLLM's: refused without --trust-request-chat-template
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Tool]] = Field(default=None, min_length=1)   # OpenAI refuses an empty list too
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    # vLLM's values; the chat template applies it, as documents (serving_chat.request_template_kwargs)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]] = None
    documents: Optional[list[dict[str, str]]] = None
    # OpenAI's labels of a stored completion, checked as OpenAI checks them; this server stores
    # nothing (store is refused), so they change nothing, as on OpenAI without store (vLLM takes them too)
    metadata: Optional[dict[Annotated[str, StringConstraints(max_length=64)],
                            Annotated[str, StringConstraints(max_length=512)]]] = Field(default=None, max_length=16)

    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> Optional[int]:
        if self.top_logprobs and not self.logprobs:  # 0 asks for nothing (OpenAI's default, vLLM's too)
            raise ValueError("top_logprobs needs logprobs=true")
        if not self.logprobs:
            return None
        top = self.top_logprobs or 0
        if top < -1:   # -1: the whole vocabulary (vLLM's)
            raise ValueError(f"top_logprobs must be >= 0, or -1 for the whole vocabulary, got {top}")
        return top


class TokenizeRequest(_Wire):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[Tool]] = None
    chat_template: Optional[str] = None    # as chat's
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_special_tokens: Optional[bool] = None   # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Wire):
    model: Optional[str] = None
    tokens: list[int]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """A stream chunk's usage."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def final_usage(prompt_tokens: int, completion_tokens: int, details: Optional[dict], stream: bool) -> dict:
    """A response's usage, with vLLM's prompt_tokens_details (None without
    --enable-prompt-tokens-details): in a whole response always there (null without the
    flag), in a stream's last chunk only with it and without its null fields, as vLLM sends them."""
    out = usage(prompt_tokens, completion_tokens)
    if not stream:
        out["prompt_tokens_details"] = details
    elif details is not None:
        out["prompt_tokens_details"] = {k: v for k, v in details.items() if v is not None}
    return out


def now() -> int:
    return int(time.time())


# The fields of vLLM's whole (non-streamed) response models, in their order: vLLM sends each, null
# where unset (model_dump), and so do these responses. ChatMessage's tool_calls is left out as
# vLLM's serializer leaves an empty list out; a field vLLM does not have (reasoning_content) stays.
CHAT_RESPONSE_FIELDS = ("id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                        "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                        "ec_transfer_params", "metrics")
CHAT_CHOICE_FIELDS = ("index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                      "routed_experts")
CHAT_MESSAGE_FIELDS = ("role", "content", "refusal", "annotations", "audio", "function_call", "reasoning")
COMPLETION_RESPONSE_FIELDS = ("id", "object", "created", "model", "choices", "service_tier",
                              "system_fingerprint", "usage", "kv_transfer_params", "ec_transfer_params", "metrics")
COMPLETION_CHOICE_FIELDS = ("index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                            "prompt_logprobs", "prompt_token_ids", "routed_experts")

# vLLM's stream choice of a completion, whose fields its chunks all set (null where unset)
COMPLETION_STREAM_CHOICE_FIELDS = ("index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
                                   "token_ids")


def with_fields(obj: dict, fields: tuple[str, ...]) -> dict:
    """`obj` with each of `fields` (null where it has none), in their order, then its other keys."""
    return {**{f: obj.get(f) for f in fields}, **obj}
