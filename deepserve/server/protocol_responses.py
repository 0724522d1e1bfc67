"""The wire protocol of OpenAI's Responses API (`POST /v1/responses`): the request models, the
fields this server refuses (`ResponsesRequest.refused`), and the translation of a request into
the chat-completions request that serves it (`ResponsesRequest.chat_request`): input items to
chat messages, flat function tools to chat tools, `text.format` to `response_format`.

Input items: messages (role user / system / developer / assistant; content a string or a list
of `input_text` / `output_text` parts), `function_call` and `function_call_output` items of
earlier turns, and `reasoning` items (a previous response's output sent back: its text goes to
the next assistant turn as `reasoning_content`, which R1's template drops, as it drops earlier
turns' reasoning). An assistant message and the function calls after it are one chat turn.

`include` takes message.output_text.logprobs (with `top_logprobs`) only. By default the server
keeps no responses (vLLM's default): `store` true, `previous_response_id` and `background` true
are refused (vLLM drops store true in silence; deepserve refuses what it does not do), and a
client sends the whole conversation in `input`, as the Agents SDK does with store off. With the
store on (--enable-responses-api-store or vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1; see
server/responses_store.py) `store` defaults to true, as OpenAI's, `previous_response_id` puts the
stored conversation before the input (`instructions` are not carried over), and `background`
needs `store`. `conversation` (OpenAI's Conversations API) is refused either way.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Sequence, Union

from pydantic import Field, StringConstraints

from deepserve.server.args import STORE_ENV
from deepserve.server.errors import APIError
from deepserve.server.protocol import ChatCompletionRequest, StructuredOutputs, _Wire

# the one `include` value served: the answer's token logprobs (with top_logprobs alternatives)
LOGPROBS = "message.output_text.logprobs"

class ContentPart(_Wire):
    type: str
    text: Optional[str] = None
    annotations: Optional[list[Any]] = None   # output_text parts of a previous response
    logprobs: Optional[list[Any]] = None


class InputItem(_Wire):
    """One input item; `type` picks which fields apply (a message may leave `type` out)."""

    type: Optional[str] = None
    id: Optional[str] = None
    status: Optional[str] = None
    # message
    role: Optional[str] = None
    content: Optional[Union[str, list[ContentPart]]] = None
    # function_call / function_call_output
    call_id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None
    output: Optional[Union[str, list[ContentPart]]] = None
    # reasoning
    summary: Optional[list[ContentPart]] = None
    encrypted_content: Optional[str] = None


class FunctionTool(_Wire):
    """A tool in the Responses shape: name, description, parameters and strict at the top level."""

    type: str
    name: Optional[str] = None
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolChoiceObject(_Wire):
    type: str
    name: Optional[str] = None


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Wire):
    format: Optional[TextFormat] = None
    verbosity: Optional[str] = None


class ReasoningConfig(_Wire):
    effort: Optional[str] = None
    summary: Optional[str] = None
    generate_summary: Optional[str] = None


class ResponsesStreamOptions(_Wire):
    include_obfuscation: Optional[bool] = None


class ResponsesRequest(_Wire):
    model: Optional[str] = None
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: Optional[bool] = False   # null: unstreamed (OpenAI's and vLLM's)
    stream_options: Optional[ResponsesStreamOptions] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceObject]] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    reasoning: Optional[ReasoningConfig] = None
    # labels, checked as OpenAI checks them; returned with the response, nothing else
    metadata: Optional[dict[Annotated[str, StringConstraints(max_length=64)],
                            Annotated[str, StringConstraints(max_length=512)]]] = Field(default=None, max_length=16)
    user: Optional[str] = None
    safety_identifier: Optional[str] = None
    # OpenAI's fields this server answers only in their "off" setting (see refused())
    store: Optional[bool] = None
    background: Optional[bool] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    prompt: Optional[Any] = None
    include: Optional[list[str]] = None
    top_logprobs: Optional[int] = None
    truncation: Optional[str] = None
    service_tier: Optional[str] = None
    max_tool_calls: Optional[int] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    # vLLM's extras (its Responses request takes these too), and chat's sampling extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None    # vLLM's, as chat's
    include_reasoning: bool = True   # vLLM's: false leaves the reasoning item out (it is still generated)
    include_stop_str_in_output: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: Optional[dict[str, float]] = None
    skip_special_tokens: bool = True
    priority: int = 0
    request_id: Optional[str] = None
    cache_salt: Optional[Annotated[str, StringConstraints(min_length=1)]] = None
    structured_outputs: Optional[StructuredOutputs] = None   # vLLM's; not with text.format

    def logprobs(self) -> Optional[int]:
        """How many top logprobs each answer token carries (None: no logprobs asked for)."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or ()) else None

    def stored(self, store_on: bool) -> bool:
        """Whether this response is kept: store defaults to true (OpenAI's) where the server keeps responses."""
        return store_on and self.store is not False

    def refused(self, store_on: bool = False) -> Optional[tuple[str, str]]:
        """(field, message) of the first field sent that this server does not implement;
        `store_on`: the server keeps responses (--enable-responses-api-store)."""
        no_store = ("this server keeps no responses unless started with --enable-responses-api-store or "
                    f"{STORE_ENV}=1; send the whole conversation in input")
        checks = [
            ("store", self.store and not store_on, f"store true is not supported ({no_store})"),
            ("previous_response_id", self.previous_response_id is not None and not store_on,
             f"previous_response_id is not supported ({no_store})"),
            ("background", self.background and not store_on, f"background true is not supported ({no_store})"),
            ("background", self.background and not self.stored(store_on),
             "background can only be used when store is true"),
            ("conversation", self.conversation is not None,
             "conversation (the Conversations API) is not supported; previous_response_id continues a stored "
             "response where the server keeps them"),
            ("prompt", self.prompt is not None, "prompt (stored prompt templates) is not supported"),
            ("include", bool(set(self.include or ()) - {LOGPROBS}),
             f"include {sorted(set(self.include or ()) - {LOGPROBS})} is not supported (only {LOGPROBS!r})"),
            ("top_logprobs", bool(self.top_logprobs) and self.logprobs() is None,
             f"top_logprobs needs include [{LOGPROBS!r}]"),
            ("truncation", self.truncation not in (None, "disabled"),
             f"truncation {self.truncation!r} is not supported (only \"disabled\": a prompt over the context "
             "is refused)"),
            ("service_tier", self.service_tier not in (None, "auto", "default"),
             f"service_tier {self.service_tier!r} is not supported (auto or default)"),
            ("max_tool_calls", self.max_tool_calls is not None, "max_tool_calls is not supported"),
            ("prompt_cache_key", self.prompt_cache_key is not None,
             "prompt_cache_key is not supported (the prefix cache needs no key)"),
            ("prompt_cache_retention", self.prompt_cache_retention is not None,
             "prompt_cache_retention is not supported"),
            ("stream_options", self.stream_options is not None and not self.stream,
             "stream_options is only for streamed requests (stream=true)"),
            ("stream_options.include_obfuscation",
             self.stream_options is not None and bool(self.stream_options.include_obfuscation),
             "stream_options.include_obfuscation is not supported"),
            ("reasoning.summary", self.reasoning is not None and (self.reasoning.summary or
                                                                  self.reasoning.generate_summary) is not None,
             "reasoning.summary is not supported (reasoning comes as reasoning_text, not summarised)"),
            ("text.verbosity", self.text is not None and self.text.verbosity is not None,
             "text.verbosity is not supported"),
            ("structured_outputs", self.structured_outputs is not None and self.text is not None
             and self.text.format is not None, "structured_outputs cannot be combined with text.format"),
        ]
        for name, sent, message in checks:
            if sent:
                return name, message
        for i, tool in enumerate(self.tools or []):
            if tool.type != "function":   # web_search, file_search, mcp, computer use, custom, ...
                return f"tools[{i}].type", (f"tool type {tool.type!r} is not supported (this server runs no "
                                            "tools and takes no free-form ones: function tools only)")
            if not tool.name:
                return f"tools[{i}].name", ("a function tool needs a name (the Responses API's tools are flat: "
                                            '{"type": "function", "name": ..., "parameters": ...}, no "function" '
                                            "object)")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceObject):
            if choice.type != "function":
                return "tool_choice", f"tool_choice type {choice.type!r} is not supported (function only)"
            if not choice.name:
                return "tool_choice.name", ("tool_choice of type function needs a name (the Responses API's flat "
                                            'shape: {"type": "function", "name": ...})')
        return None

    def input_items(self) -> list[dict]:
        """`input` as a list of items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [item.model_dump(exclude_none=True) for item in self.input]

    def chat_request(self, history: Sequence[dict] = ()) -> dict:
        """The chat-completions request body that serves this request (validated by the caller
        as a ChatFromResponses), `history` (a stored conversation's input items) before the
        input; a 400 naming the input item for a bad one."""
        body: dict[str, Any] = {"model": self.model, "messages": chat_messages(self, history), "n": 1}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "seed", "stop", "logit_bias", "parallel_tool_calls", "priority",
                     "request_id", "user", "metadata", "cache_salt"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        body.update(skip_special_tokens=self.skip_special_tokens, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                    include_reasoning=self.include_reasoning, include_stop_str_in_output=self.include_stop_str_in_output)
        if self.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = self.chat_template_kwargs
        if self.reasoning is not None and self.reasoning.effort is not None:   # to the template, as chat's
            body["reasoning_effort"] = self.reasoning.effort
        body["stream"] = bool(self.stream)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.logprobs() is not None:
            body.update(logprobs=True, top_logprobs=self.logprobs())
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = choice if isinstance(choice, str) else \
                {"type": "function", "function": {"name": choice.name}}
        if self.structured_outputs is not None:
            body["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise APIError(400, "text.format json_schema needs a schema", param="text.format.schema")
            if fmt.name is None:   # required, as by OpenAI's and vLLM's
                raise APIError(400, "text.format json_schema needs a name", param="text.format.name")
            schema = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_, "strict": fmt.strict}
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {k: v for k, v in schema.items() if v is not None}}
        return body


class ChatFromResponses(ChatCompletionRequest):
    """The chat request a Responses request becomes: errors about the output length name
    max_output_tokens, the field the client sent."""

    def max_tokens_field(self) -> str:
        return "max_output_tokens"


def _text(parts: Union[str, list[ContentPart], None], where: str) -> str:
    """A content field's text: a string, or text parts joined by newlines (chat's join)."""
    if parts is None or isinstance(parts, str):
        return parts or ""
    texts = []
    for j, part in enumerate(parts):
        if part.type not in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            raise APIError(400, f"{where}[{j}].type: content part type {part.type!r} is not supported (text only: "
                                "input_text, output_text)", param=f"{where}[{j}].type")
        texts.append(part.text or "")
    return "\n".join(texts)


def chat_messages(req: ResponsesRequest, history: Sequence[dict] = ()) -> list[dict]:
    """instructions + history (a stored conversation's input items) + input as chat messages
    (see the module docstring)."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str) and not history:
        messages.append({"role": "user", "content": req.input})
        return messages
    items = [InputItem.model_validate(item) for item in history]
    items += [InputItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    calls: dict[str, str] = {}   # call_id -> name of the function calls seen
    reasoning: Optional[str] = None
    for i, item in enumerate(items, start=-len(history)):
        where = f"input[{i}]" if i >= 0 else f"previous_response_id's input[{i + len(history)}]"
        kind = item.type or "message"
        if kind == "message":
            if item.role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role must be user, system, developer or assistant, got {item.role!r}",
                               param=f"{where}.role")
            message = {"role": item.role, "content": _text(item.content, f"{where}.content")}
            if item.role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif kind == "function_call":
            if not item.call_id or not item.name or item.arguments is None:
                raise APIError(400, f"{where}: a function_call item needs call_id, name and arguments", param=where)
            calls[item.call_id] = item.name
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                if reasoning is not None:
                    last["reasoning_content"], reasoning = reasoning, None
                messages.append(last)
            last.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif kind == "function_call_output":
            if item.call_id not in calls:
                raise APIError(400, f"{where}.call_id: no function_call item with call_id {item.call_id!r} comes "
                                    "before this output (send the call in input too, or continue its response with "
                                    "previous_response_id where the server stores responses)",
                               param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, f"{where}.output")})
        elif kind == "reasoning":
            if item.encrypted_content is not None:
                raise APIError(400, f"{where}.encrypted_content: encrypted reasoning is not supported (this server "
                                    "sends reasoning as text)", param=f"{where}.encrypted_content")
            reasoning = _text(item.content, f"{where}.content") if isinstance(item.content, list) else \
                _text(item.summary, f"{where}.summary")
        else:
            raise APIError(400, f"{where}.type: input item type {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning)", param=f"{where}.type")
    return messages
