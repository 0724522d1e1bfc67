"""POST /v1/chat/completions: messages (assistant `tool_calls` and `tool` messages included) and
`tools` rendered with the model's chat template (or --chat-template), n samples,
logprobs/top_logprobs, prompt_logprobs, streaming deltas, usage, and:

- with --reasoning-parser the R1 split into `reasoning_content` (and `reasoning`, the newer
  name) and `content`, the same way streamed and not;
- tool calls: `tool_choice` auto (needs --enable-auto-tool-choice and --tool-call-parser: the
  parser turns the model's tool-call tokens into `tool_calls`, finish_reason `tool_calls`; the
  calls of tools marked `strict` are held to their schemas by a structural-tag grammar, and
  with response_format the output is the formatted answer or tool calls),
  required (the output is constrained to a JSON list of {name, parameters} of the given
  tools; streamed call by call, each call's arguments as they are generated) or a named
  function (the output is constrained to its parameters' schema; a reply cut inside its
  reasoning has no call), both with content "" as vLLM's, and none (tools only reach the template);
- structured outputs (response_format, guided_*, structured_outputs); with a reasoning
  parser the grammar starts after `</think>`, so only the answer is constrained;
- a `developer` message (OpenAI's name for the instructions) goes to a template that knows no
  developer role as a `system` one;
- vLLM's extras: `continue_final_message` (an assistant prefill continued, with
  add_generation_prompt false), `echo` (the reply opens with the last message when it is an
  assistant's, or with add_generation_prompt false), `include_reasoning` false (no
  reasoning fields, and, as vLLM's, no logprobs or reply token ids, which would list its
  tokens), `return_token_ids` (the prompt's and the reply's token ids), `return_prompt_text`
  (the rendered prompt) and `return_tokens_as_token_ids` (logprobs name tokens `token_id:N`);
- thinking switches: `reasoning_effort` reaches the template as vLLM passes it (itself, and
  enable_thinking false for "none", true otherwise); it, and chat_template_kwargs'
  enable_thinking or thinking, are refused where the template reads none of them; so are
  vLLM's `documents` (for RAG templates).
"""
from __future__ import annotations

import copy
import functools
from typing import AsyncIterator, Optional

import jinja2
import jinja2.meta

from fastapi import Request
from fastapi.responses import JSONResponse

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sampling_params import GuidedDecoding
from deepserve.engine.tokenizer import tool_call_arguments
from deepserve.server.beam import beam_params, beam_stream, check_length_penalty
from deepserve.server.errors import APIError
from deepserve.server.protocol import (CHAT_CHOICE_FIELDS, CHAT_MESSAGE_FIELDS, CHAT_RESPONSE_FIELDS,
                                      ChatCompletionRequest, NamedToolChoice, content_texts, final_usage, now, response_ids,
                                      with_fields)
from deepserve.server.reasoning import make_parser
from deepserve.server.serving_common import (ChunkFrames, SSEResponse, ServerState, api_error_from,
                                             compile_grammar, fingerprint_fields, header_request_id, merge_streams,
                                             parse_request,
                                             prompt_tokens_details, sampling_params, sse, stream_usage,
                                             tokens_as_ids, truncated_prompt, until_disconnect,
                                             usage_in_stream)
from deepserve.server.serving_completions import vllm_prompt_logprobs
from deepserve.server.tool_parsers import (RequiredCallsStream, make_tool_parser, required_calls, tool_calls_tag,
                                          tool_call_id)


def _entry(text: str, logprob: float, name: Optional[str] = None) -> dict:
    """One token's entry; `name` replaces the text as `token` (its bytes stay the text's)."""
    return {"token": text if name is None else name, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(out: CompletionOutput, start: int, end: int, top_k: int, as_ids: bool = False,
                  listed: bool = False) -> dict:
    """OpenAI's chat logprobs object for tokens [start, end) of one sample (`as_ids`: tokens
    named `token_id:N`, vLLM's return_tokens_as_token_ids; `bytes` stay the token's text's;
    `listed`: top_logprobs are the sampled token's and logprob_token_ids', in that order, as vLLM's;
    `top_k` -1: every token's, the whole vocabulary). As vLLM's, top_logprobs are the first
    `top_k` of the sampled token and then the most likely others by rank: a sampled token outside
    the top k comes first and pushes the k-th out."""
    content = []
    for tid, entry in zip(out.token_ids[start:end], (out.logprobs or [])[start:end]):
        chosen = entry[tid]
        if listed or top_k == -1:
            top = list(entry.items())
        else:   # an entry is the sampled token's, then the others' in rank order (more for beams)
            top = [(t, lp) for t, lp in entry.items() if t == tid or lp.rank <= top_k][:top_k]
        item = _entry(chosen.decoded_token, chosen.logprob, f"token_id:{tid}" if as_ids else None)
        item["top_logprobs"] = [_entry(lp.decoded_token, lp.logprob, f"token_id:{t}" if as_ids else None)
                                for t, lp in top]
        content.append(item)
    return {"content": content}


async def render_messages(state: ServerState, messages, tools=None, add_generation_prompt: bool = True,
                          template_kwargs: Optional[dict] = None, add_special_tokens: bool = False,
                          continue_final_message: bool = False,
                          template: Optional[str] = None) -> tuple[str, list[int]]:
    """The prompt text and ids, as transformers' apply_chat_template renders and encodes them
    (the encoding off the event loop); `template`: the request's own chat template, if any."""
    text = render_text(state, messages, tools, add_generation_prompt, with_default_kwargs(state, template_kwargs),
                       continue_final_message, request_template(state, template, template_kwargs),
                       state.settings.chat_template_content_format)
    return text, (await state.encode([text], add_special_tokens))[0]


UNTRUSTED_TEMPLATE = ("Chat template is passed with request, but --trust-request-chat-template is not set. "
                      "Refused request with untrusted chat template.")   # vLLM's words


def request_template(state: ServerState, template: Optional[str], kwargs: Optional[dict]) -> Optional[str]:
    """The chat template a request brings (its chat_template, else chat_template_kwargs'
    chat_template), None where it brings none; a 400 unless --trust-request-chat-template (vLLM's
    rule: any value given, "" included, is refused)."""
    given = template if template is not None else (kwargs or {}).get("chat_template")
    if given is None:
        return None
    if not state.settings.trust_request_chat_template:
        raise APIError(400, UNTRUSTED_TEMPLATE, param="chat_template" if template is not None
                       else "chat_template_kwargs")
    return template or (kwargs or {}).get("chat_template") or None


def with_default_kwargs(state: ServerState, kwargs: Optional[dict]) -> Optional[dict]:
    """A request's chat template kwargs over the server's --default-chat-template-kwargs (vLLM's merge)."""
    defaults = state.settings.default_chat_template_kwargs
    return {**defaults, **(kwargs or {})} if defaults else kwargs


# chat_template_kwargs that switch a model's thinking (Qwen3's, DeepSeek V3.1's)
_THINKING_SWITCHES = ("enable_thinking", "thinking")


@functools.lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset:
    """The names a chat template reads from its context: the kwargs it can honour."""
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))


def unread_switches(template: Optional[str], kwargs: dict) -> list[str]:
    """The thinking switches set in `kwargs` that `template` does not read."""
    return [k for k in _THINKING_SWITCHES if kwargs.get(k) is not None and k not in template_variables(template or "")]


def check_template_kwargs(tokenizer, kwargs: Optional[dict], flag: str) -> None:
    """A server-wide thinking switch the chat template does not read would have every request
    refused: ValueError naming the flag at start."""
    unread = unread_switches(tokenizer.chat_template if tokenizer is not None else None, kwargs or {})
    if unread:
        raise ValueError(f"{flag}: {unread[0]} is not read by this model's chat template, so it would switch "
                         "nothing (every chat request would be refused)")


def request_template_kwargs(state: ServerState, req: ChatCompletionRequest) -> Optional[dict]:
    """chat_template_kwargs with reasoning_effort and documents as vLLM hands them to the
    template (the request's own chat_template_kwargs win); 400 where the template reads
    none of a field's keys."""
    if req.reasoning_effort is None and not req.documents:
        return req.chat_template_kwargs
    template = request_template(state, req.chat_template, req.chat_template_kwargs) or (
        state.tokenizer.chat_template if state.tokenizer else None)
    reads = template_variables(template or "")
    derived: dict = {}
    if req.reasoning_effort is not None:
        effort = {"reasoning_effort": req.reasoning_effort, "enable_thinking": req.reasoning_effort != "none"}
        derived = {k: v for k, v in effort.items() if k in reads}
        if not derived:
            raise APIError(400, "reasoning_effort: this model's chat template reads neither reasoning_effort nor "
                                "enable_thinking, so its reasoning cannot be set per request",
                           param="reasoning_effort")
    if req.documents:
        if "documents" not in reads:
            raise APIError(400, "documents: this model's chat template does not read documents", param="documents")
        derived["documents"] = req.documents
    return {**derived, **(req.chat_template_kwargs or {})}


def render_text(state: ServerState, messages, tools=None, add_generation_prompt: bool = True,
                template_kwargs: Optional[dict] = None, continue_final_message: bool = False,
                template: Optional[str] = None, content_format: str = "auto") -> str:
    """The prompt text, as transformers' apply_chat_template renders it, with the model's chat
    template or `template` (a request's, trusted); message content as `content_format` says
    (vLLM's --chat-template-content-format)."""
    tok = state.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
    if template is not None:
        tok = copy.copy(tok)
        tok.chat_template = template
    extra = dict(template_kwargs or {})
    extra.pop("chat_template", None)   # the template itself (request_template), no variable of it
    # as vLLM: chat_template_kwargs override the request's own template switches
    add_generation_prompt = extra.pop("add_generation_prompt", add_generation_prompt)
    continue_final_message = extra.pop("continue_final_message", continue_final_message)
    taken = sorted(set(extra) & {"messages", "bos_token", "eos_token", "tokenize"})
    if taken:
        raise APIError(400, f"chat_template_kwargs cannot set {', '.join(taken)} (the server renders them)",
                       param="chat_template_kwargs")
    unread = unread_switches(tok.chat_template, extra)
    if unread:
        raise APIError(400, f"chat_template_kwargs.{unread[0]}: this model's chat template does not read it, so "
                            "its thinking cannot be switched per request", param="chat_template_kwargs")
    if tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    turns = [m.template_dict() for m in messages]
    if resolve_content_format(content_format, tok.chat_template or "") == "openai":
        for turn, message in zip(turns, messages):
            if message.role != "tool":   # tool results stay text (vLLM's: templates expect a string there)
                turn["content"] = content_parts(message.content)
    for i, turn in enumerate(turns):
        for j, call in enumerate(turn.get("tool_calls") or []):
            try:
                call["function"]["arguments"] = tool_call_arguments(call["function"].get("arguments"))
            except ValueError as exc:
                raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments {exc}",
                               param="messages") from None
    if "developer" not in (tok.chat_template or ""):
        # OpenAI's developer messages are the system instructions (its newer name for them); a
        # template that knows no developer role (R1's, Qwen2.5's) would drop them without a word
        for turn in turns:
            if turn["role"] == "developer":
                turn["role"] = "system"
    render = functools.partial(tok.apply_chat_template, add_generation_prompt=add_generation_prompt, tokenize=False,
                               continue_final_message=continue_final_message, **extra)
    try:
        try:
            return render(turns)
        except TypeError:
            # a tool-call turn's content None (as sent; transformers' shape, which R1-Distill's
            # templates test for) in a template that reads it as a string (vLLM's example tool
            # templates, written for vLLM, which renders a missing content as ""): "" then
            blank = [turn for turn in turns if turn["content"] is None]
            if not blank:
                raise
            return render([{**turn, "content": ""} if turn["content"] is None else turn for turn in turns])
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc), param="messages") from None
    except jinja2.TemplateError as exc:   # a request's own template: its syntax, the sandbox
        raise APIError(400, f"chat template error: {exc}", param="chat_template") from None


def content_parts(content) -> list[dict]:
    """A message's content in vLLM's "openai" content format: a list of text parts (none for
    no content, one for a plain string)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": "text", "text": text} for text in content_texts(content)]


def resolve_content_format(option: str, template: str) -> str:
    """--chat-template-content-format's value for `template`: string or openai as given, auto
    detected from the template."""
    return detected_content_format(template) if option == "auto" else option


@functools.lru_cache(maxsize=16)
def detected_content_format(template: str) -> str:
    """vLLM's detection: "openai" where the template loops over a message's content (`for part in
    message['content']`, the message drawn from `messages` or a variable set from it, or over a
    variable named content), else "string" (a template that does not parse included)."""
    try:
        root = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    names, grown = {"messages"}, True
    while grown:   # variables set from messages (`{% set msgs = messages[1:] %}`), transitively
        before = len(names)
        names |= {a.target.name for a in root.find_all(jinja2.nodes.Assign)
                  if isinstance(a.target, jinja2.nodes.Name) and _reads(a.node, names)}
        grown = len(names) > before
    loops = list(root.find_all(jinja2.nodes.For))
    message_vars = {loop.target.name for loop in loops
                    if isinstance(loop.target, jinja2.nodes.Name) and _reads(loop.iter, names)}
    for loop in loops:
        if _reads(loop.iter, message_vars, "content") or _reads(loop.iter, {"content"}):
            return "openai"
    return "string"


def _reads(node, names: set, key: Optional[str] = None) -> bool:
    """Whether `node` is one of `names` (or its `key` item / attribute), through filters, tests
    and slices."""
    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) or (
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice)):
        node = node.node
    if key is not None:
        if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const) \
                and node.arg.value == key:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getattr) and node.attr == key:
            node = node.node
        else:
            return False
    return isinstance(node, jinja2.nodes.Name) and node.name in names


def _tool_schema(req: ChatCompletionRequest, choice) -> Optional[dict]:
    """The JSON schema that required / named tool choices constrain the output to."""
    tools = {t.function.name: t.function for t in req.tools or []}
    params = lambda f: f.parameters or {"type": "object"}  # noqa: E731
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in tools:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                f"({', '.join(tools) or 'none given'})", param="tool_choice")
        return params(tools[choice.function.name])
    if choice == "required":
        defs: dict = {}
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": _hoisted_defs(params(f), defs)},
                  "required": ["name", "parameters"]} for name, f in tools.items()]
        one = {"maxItems": 1} if req.parallel_tool_calls is False else {}
        return {"type": "array", "minItems": 1, "items": {"anyOf": items}, **one, **defs}
    return None


def _hoisted_defs(schema: dict, defs: dict) -> dict:
    """`schema` without its `$defs` / `definitions`, which go to `defs`: inside the required
    calls' array schema, a tool's `#/$defs/X` names the root's (vLLM's hoisting; pydantic's
    nested models are written so). A name two tools define differently is a 400 in vLLM's words."""
    out = dict(schema)
    for key in ("$defs", "definitions"):
        if not isinstance(out.get(key), dict):
            continue
        for name, definition in out.pop(key).items():
            if defs.setdefault(key, {}).setdefault(name, definition) != definition:
                raise APIError(400, f"Tool definition '{name}' has multiple schemas, which is not supported.",
                               param="tools")
    return out


class PreparedChat:
    def __init__(self, state: ServerState, req: ChatCompletionRequest):
        self.model = state.check_model(req.model)
        max_tokens = req.max_new_tokens()
        try:
            self.top_k = req.num_logprobs()
        except ValueError as exc:
            raise api_error_from(exc) from None
        self.params = sampling_params(state, req, max_tokens, self.top_k)
        check_length_penalty(req)
        self.listed = self.params.logprob_token_ids is not None
        self.as_ids = tokens_as_ids(state, req)
        self.cache_salt = req.cache_salt
        # vLLM's --exclude-tools-when-tool-choice-none: tools the reply may not call stay out of the prompt
        shown = None if req.tool_choice == "none" and state.settings.exclude_tools_when_tool_choice_none \
            else req.tools
        self.prompt_text = render_text(state, req.messages, shown, req.add_generation_prompt,
                                       with_default_kwargs(state, request_template_kwargs(state, req)),
                                       req.continue_final_message,
                                       request_template(state, req.chat_template, req.chat_template_kwargs),
                                       state.settings.chat_template_content_format)

    async def tokenize(self, state: ServerState, req: ChatCompletionRequest) -> "PreparedChat":
        """Encodes the rendered prompt (off the event loop), then checks its length, the tools
        and whether the engine takes the request."""
        self.prompt_ids = (await state.encode([self.prompt_text], req.add_special_tokens))[0]
        max_tokens = req.max_new_tokens()
        # the reply's role, as vLLM names it: --response-role's for a new turn, else the last message's
        last = req.messages[-1]
        self.role = state.settings.response_role if req.add_generation_prompt else last.role
        # vLLM's echo: the reply opens with the last message when that is the reply's role
        echoed = req.echo and last.role == self.role
        self.echo_text = last.text() if echoed else ""
        self.include_reasoning = req.include_reasoning
        self.prompt_ids = truncated_prompt(state, req, self.prompt_ids, max_tokens)
        default_max = state.settings.generation_defaults.get("max_tokens")
        if max_tokens is None and default_max is not None:  # the model's max_new_tokens, within the context
            room = state.llm.max_model_len - len(self.prompt_ids)
            max_tokens = self.params.max_tokens = max(1, min(default_max, room))
        state.check_length(len(self.prompt_ids), max_tokens, what="messages", field=req.max_tokens_field(),
                           min_tokens=self.params.min_tokens)
        self.parser_name = state.settings.reasoning_parser
        # the reply's tokens, listed with their logprobs or ids, would show the reasoning that
        # include_reasoning false hides: they are left out (vLLM's; the prompt's ids stay)
        self.hide_tokens = not req.include_reasoning and self.parser_name is not None
        self.parallel_tool_calls = req.parallel_tool_calls
        self._tools(state, req)
        self.beams = None   # BeamSearchParams with use_beam_search (vLLM's)
        if req.use_beam_search:
            self.beams = beam_params(req, self.params, self.guided_field, len(self.prompt_ids),
                                     state.llm.max_model_len, stream_refused=False)
        after = state.grammar_start_after(self.params, self.prompt_ids)
        if after is not None:   # the prompt leaves the reasoning open: the grammar holds from </think> on
            self.params.guided.start_after_token = after
        try:
            state.llm.check_can_accept()
        except Exception as exc:
            raise api_error_from(exc, state.settings.retry_after_s) from None
        self.id, self.engine_id = response_ids("chatcmpl", req.request_id)
        self.created = now()
        return self

    def _tools(self, state: ServerState, req: ChatCompletionRequest) -> None:
        """How the output becomes tool calls: self.tool_mode is None (plain content), "auto"
        (the tool-call parser), "required" or "named" (constrained JSON)."""
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        self.tool_mode, self.tool_name = None, None
        self.guided_field = req.guided_field()   # the field a grammar comes from
        if choice == "none":
            return
        if not req.tools:
            raise APIError(400, f"tool_choice {choice if isinstance(choice, str) else 'function'} needs tools",
                           param="tool_choice")
        if choice == "auto":
            if not (state.settings.enable_auto_tool_choice and state.settings.tool_call_parser):
                raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                    "to be set", param="tool_choice")
            self.tool_mode = "auto"
            rf = req.response_format
            answer = (rf.json_schema.schema_ if rf.type == "json_schema" else {"type": "object"}) \
                if rf is not None and rf.type in ("json_schema", "json_object") else None
            if self.params.guided is None or answer is not None:   # not with vLLM's guided_* fields
                tag = tool_calls_tag(state.settings.tool_call_parser, req.tools, req.parallel_tool_calls is not False,
                                     answer)
                if tag is not None:
                    self.params.guided = GuidedDecoding(structural_tag=tag)
                    self.guided_field = "tools" if answer is None else "response_format"
            return
        # response_format shapes an answer, and a turn that must call tools has none (OpenAI takes
        # both: an agent with an output type that forces a tool); vLLM's guided_* fields would be
        # overridden, so they are refused
        if self.params.guided is not None and self.guided_field != "response_format":
            raise APIError(400, f"tool_choice required / named cannot be combined with {self.guided_field}",
                           param="tool_choice")
        self.params.guided = GuidedDecoding(json=_tool_schema(req, choice))
        self.guided_field = "tools"
        self.tool_mode = "named" if isinstance(choice, NamedToolChoice) else "required"
        self.tool_name = choice.function.name if self.tool_mode == "named" else None

    def reasoning_parser(self):
        return make_parser(self.parser_name, self.prompt_text)

    def stream(self, state: ServerState) -> AsyncIterator[RequestOutput]:
        prompt = {"prompt": self.prompt_text, "prompt_token_ids": self.prompt_ids, "cache_salt": self.cache_salt}
        if self.beams is not None:
            return beam_stream(state, prompt, self.beams, self.params, self.engine_id)
        return state.generate(prompt, self.params, self.engine_id)


class ContentSplitter:
    """One sample's text -> reasoning, content and tool-call deltas, streamed or whole."""

    def __init__(self, prep: PreparedChat, tool_call_parser: Optional[str]):
        self.reasoning = prep.reasoning_parser()
        self.mode, self.name = prep.tool_mode, prep.tool_name
        self.tools = make_tool_parser(tool_call_parser) if self.mode == "auto" else None
        self.max_calls = 1 if prep.parallel_tool_calls is False else None
        self.required_stream = RequiredCallsStream() if self.mode == "required" else None
        self.named_sent = False
        self.named_held = ""      # blank answer text before the named call opens
        self.id = tool_call_id()
        # vLLM's stream without a reasoning or tool parser: each output's text is the delta's
        # content, "" included (a held-back stop string, a finishing EOS)
        self.plain = self.reasoning is None and tool_call_parser is None and self.mode not in ("named", "required")

    def feed(self, delta: str, final: bool) -> tuple[str, str, list[dict]]:
        """(reasoning delta, content delta, tool-call deltas)."""
        reasoning, content = "", delta
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(delta)
            if final:
                r2, c2 = self.reasoning.finish()
                reasoning, content = reasoning + r2, content + c2
        calls: list[dict] = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, calls2 = self.tools.finish()
                content, calls = content + c2, calls + calls2
            calls = [c for c in calls if self.max_calls is None or c["index"] < self.max_calls]
        elif self.mode == "named":
            # the call opens with the first answer text that is not blank: an output whose
            # reasoning never ended (cut by max_tokens) calls nothing, as vLLM's
            self.named_held += content
            if self.named_held.strip():
                call: dict = {"index": 0, "function": {"arguments": self.named_held}}
                if not self.named_sent:
                    call.update(id=self.id, type="function")
                    call["function"]["name"] = self.name
                    self.named_sent = True
                calls.append(call)
                self.named_held = ""
            content = ""
        elif self.mode == "required":
            calls = self.required_stream.feed(content)
            content = ""
        return reasoning, content, calls

    def whole(self, text: str) -> tuple[Optional[str], Optional[str], list[dict]]:
        """(reasoning, content, tool_calls) of a finished sample."""
        reasoning, content = None, text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse(text)
        if self.tools is not None:
            content, calls = self.tools.parse(content or "")
            return reasoning, content, calls[:self.max_calls]
        # a forced call's reply has content "" (vLLM's), with or without the call
        if self.mode == "named":
            if not (content or "").strip():    # the reasoning never ended: no arguments, no call
                return reasoning, "", []
            return reasoning, "", [{"id": self.id, "type": "function",
                                    "function": {"name": self.name, "arguments": content}}]
        if self.mode == "required":
            return reasoning, "", required_calls(content or "")
        return reasoning, content, []


def _finish_reason(out: CompletionOutput, mode: Optional[str], called: bool) -> Optional[str]:
    if out.finish_reason == "stop" and called and mode in ("auto", "required"):
        return "tool_calls"
    return out.finish_reason


async def create_chat_completion(request: Request, state: ServerState):
    req = await parse_request(request, ChatCompletionRequest, state.settings.max_body_bytes)
    req.request_id = header_request_id(request, req.request_id)
    prep = await PreparedChat(state, req).tokenize(state, req)
    await compile_grammar(state, prep.params, prep.guided_field)
    if req.stream:
        return SSEResponse(sse(_stream(state, req, prep), state))
    final: RequestOutput = await until_disconnect(request, collect_final(prep, state))
    choices = []
    for out in final.outputs:
        splitter = ContentSplitter(prep, state.settings.tool_call_parser)
        reasoning, content, calls = splitter.whole(out.text)
        if prep.echo_text:
            content = prep.echo_text + (content or "")
        shown = content if (content or not calls or prep.tool_mode in ("named", "required")) else None
        # `reasoning` is always there, null without a parser or with the reasoning hidden, as in
        # vLLM's ChatMessage (clients read message.reasoning); reasoning_content, its older
        # name, only beside a parser's reasoning
        message: dict = with_fields({"role": prep.role, "content": shown}, CHAT_MESSAGE_FIELDS)
        if prep.parser_name is not None and prep.include_reasoning:
            message.update(reasoning=reasoning, reasoning_content=reasoning)
        if calls:  # OpenAI and vLLM leave the field out when there is no call, rather than send []
            message["tool_calls"] = calls
        logprobs = None
        if prep.top_k is not None and not prep.hide_tokens:
            logprobs = chat_logprobs(out, 0, len(out.token_ids), prep.top_k, prep.as_ids,
                                     prep.listed)
        choice = {"index": out.index, "message": message, "logprobs": logprobs,
                  "finish_reason": _finish_reason(out, prep.tool_mode, bool(calls)), "stop_reason": out.stop_reason}
        if req.return_token_ids and not prep.hide_tokens:
            choice["token_ids"] = list(out.token_ids)
        choices.append(with_fields(choice, CHAT_CHOICE_FIELDS))
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    details = prompt_tokens_details(state, final.num_cached_tokens, [len(prep.prompt_ids)])
    body = {"id": prep.id, "object": "chat.completion", "created": prep.created, "model": prep.model,
            "choices": choices, "system_fingerprint": state.settings.system_fingerprint,
            "usage": final_usage(len(prep.prompt_ids), completion_tokens, details, stream=False)}
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = vllm_prompt_logprobs(final)
    if req.return_token_ids:
        body["prompt_token_ids"] = prep.prompt_ids
    if req.return_prompt_text:
        body["prompt_text"] = prep.prompt_text
    return JSONResponse(with_fields(body, CHAT_RESPONSE_FIELDS))


async def collect_final(prep: PreparedChat, state: ServerState) -> RequestOutput:
    final = None
    try:
        async for _, out in merge_streams([prep.stream(state)]):
            final = out
    except Exception as exc:
        raise api_error_from(exc, state.settings.retry_after_s) from None
    return final


async def _stream(state: ServerState, req: ChatCompletionRequest, prep: PreparedChat) -> AsyncIterator[str]:
    include_usage, continuous = usage_in_stream(state, req)
    n = prep.params.n
    generated = [0] * n
    cached = 0

    frame = ChunkFrames(id=prep.id, object="chat.completion.chunk", created=prep.created, model=prep.model)

    def chunk(choice: dict, **extra) -> str:
        """One choice's chunk (OpenAI's and vLLM's streams carry one each); its continuous usage
        counts the choice's tokens so far, as vLLM's."""
        if include_usage:
            usage = stream_usage(continuous, len(prep.prompt_ids), generated[choice["index"]])
            return frame(choices=[choice], **usage, **extra)
        if choice["finish_reason"] is not None:
            extra.update(fingerprint_fields(state))
        return frame(choices=[choice], **extra)

    # vLLM's role chunk sets prompt_token_ids and prompt_text (null unless asked for); the echo
    # follows in a chunk of its own
    prompt = {"prompt_token_ids": prep.prompt_ids if req.return_token_ids else None,
              "prompt_text": prep.prompt_text if req.return_prompt_text else None}
    for i in range(n):
        yield chunk({"index": i, "delta": {"role": prep.role, "content": ""}, "logprobs": None,
                     "finish_reason": None}, **prompt)
    if prep.echo_text:
        for i in range(n):
            yield chunk({"index": i, "delta": {"content": prep.echo_text}, "logprobs": None, "finish_reason": None})
    splitters = [ContentSplitter(prep, state.settings.tool_call_parser) for _ in range(n)]
    called = [False] * n
    sent_text, sent_tokens = [0] * n, [0] * n
    ids_sent = [0] * n   # tokens whose ids went out (return_token_ids): a held-back delta's go with the next
    done = [False] * n
    first = True
    async for _, res in merge_streams([prep.stream(state)]):
        cached = res.num_cached_tokens
        for out in res.outputs:
            i = out.index
            if done[i]:
                continue
            final = out.finish_reason is not None
            reasoning, content, calls = splitters[i].feed(out.text[sent_text[i]:], final)
            delta: dict = {}
            if reasoning and prep.include_reasoning:
                delta.update(reasoning_content=reasoning, reasoning=reasoning)
            if content or (splitters[i].plain and (final or len(out.token_ids) > sent_tokens[i])):
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
                called[i] = True
            logprobs = None
            if prep.top_k is not None and not prep.hide_tokens and len(out.token_ids) > sent_tokens[i]:
                logprobs = chat_logprobs(out, sent_tokens[i], len(out.token_ids), prep.top_k,
                                         prep.as_ids, prep.listed)
            sent_text[i], sent_tokens[i] = len(out.text), len(out.token_ids)
            generated[i] = len(out.token_ids)
            done[i] = final
            if delta or logprobs or final:
                # vLLM's token chunk: stop_reason on the finishing one alone, token_ids always
                choice = {"index": i, "delta": delta, "logprobs": logprobs,
                          "finish_reason": _finish_reason(out, prep.tool_mode, called[i])}
                if final:
                    choice["stop_reason"] = out.stop_reason
                choice["token_ids"] = None
                if req.return_token_ids and not prep.hide_tokens:
                    choice["token_ids"] = list(out.token_ids[ids_sent[i]:])
                    ids_sent[i] = len(out.token_ids)
                with_prompt = first and req.prompt_logprobs is not None
                extra = {"prompt_logprobs": vllm_prompt_logprobs(res)} if with_prompt else {}
                first = False
                yield chunk(choice, **extra)
    if include_usage:
        details = prompt_tokens_details(state, cached, [len(prep.prompt_ids)])
        yield frame(choices=[], usage=final_usage(len(prep.prompt_ids), sum(generated), details, stream=True),
                    **fingerprint_fields(state))
