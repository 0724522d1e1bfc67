"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, which vLLM serves
beside the OpenAI routes (Claude Code and the `anthropic` SDK talk to it). The request becomes a
chat request (server/protocol_anthropic.py), so the chat template, reasoning and tool-call
parsers, structured outputs and checks are chat's; this module shapes what comes out:

- a message with content blocks: `thinking` (the reasoning, with a signature, when the server
  runs a reasoning parser), `text`, and a `tool_use` block per tool call (its input parsed from
  the arguments); an empty reply is one empty text block (Anthropic's and vLLM's);
- stop_reason end_turn, max_tokens, tool_use, or stop_sequence with the stop_sequence that
  ended it (Anthropic's rule; vLLM says end_turn there);
- usage input_tokens / output_tokens; with --enable-prompt-tokens-details, the prompt tokens
  the prefix cache held as cache_read_input_tokens, out of input_tokens (vLLM's reading).

Streamed, the events are Anthropic's: message_start, then per block content_block_start, its
text_delta / thinking_delta (and a signature_delta) / input_json_delta deltas and
content_block_stop, then message_delta (stop_reason, and the whole usage, as vLLM's) and
message_stop, each with its SSE `event:` line. Errors are Anthropic's error object ({"type":
"error", "error": {"type", "message"}}) with the status the chat route gives, an `error` event
once a stream has begun.
"""
from __future__ import annotations

import json
import uuid
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.errors import APIError, from_validation_error
from deepserve.server.protocol import ChatCompletionRequest
from deepserve.server.protocol_anthropic import CountTokensRequest, MessagesRequest
from deepserve.server.serving_chat import ContentSplitter, PreparedChat, collect_final
from deepserve.server.serving_common import (SSEResponse, ServerState, api_error_from, compile_grammar,
                                             merge_streams, parse_request, prompt_tokens_details, until_disconnect)


# Anthropic's error types by status (its SDK raises by status; the type names the kind)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}


def anthropic_error(err: APIError) -> JSONResponse:
    """An APIError as Anthropic's error response, with its status."""
    return JSONResponse(_error_body(err), status_code=err.status, headers=err.headers)


def _error_body(err: APIError) -> dict:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


async def _prepared(request: Request, state: ServerState, model) -> tuple:
    """(the Anthropic request, its chat request, its PreparedChat, tokenized)."""
    req = await parse_request(request, model, state.settings.max_body_bytes)
    try:
        chat = ChatCompletionRequest.model_validate(req.chat_request())
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    return req, chat, await PreparedChat(state, chat).tokenize(state, chat)


async def count_tokens(request: Request, state: ServerState):
    try:
        _, _, prep = await _prepared(request, state, CountTokensRequest)
    except APIError as err:
        state.metrics.record_error(err.status)
        return anthropic_error(err)
    n = len(prep.prompt_ids)
    return JSONResponse({"input_tokens": n, "context_management": {"original_input_tokens": n}})


async def create_message(request: Request, state: ServerState):
    try:
        req, _, prep = await _prepared(request, state, MessagesRequest)
        await compile_grammar(state, prep.params, prep.guided_field)
        message_id = f"msg_{uuid.uuid4().hex}"
        if req.stream:
            return SSEResponse(_stream(state, req, prep, message_id))
        final: RequestOutput = await until_disconnect(request, collect_final(prep, state))
    except APIError as err:
        state.metrics.record_error(err.status)
        return anthropic_error(err)
    out = final.outputs[0]
    splitter = ContentSplitter(prep, state.settings.tool_call_parser)
    reasoning, content, calls = splitter.whole(out.text)
    blocks = []
    if reasoning and prep.include_reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": uuid.uuid4().hex})
    if content:
        blocks.append({"type": "text", "text": content})
    blocks += [_tool_use(call["id"], call["function"]["name"], _input(call["function"]["arguments"]))
               for call in calls]
    stop_reason, stop_sequence = _stop(req, out, bool(calls))
    return JSONResponse({"id": message_id, "type": "message", "role": "assistant", "model": prep.model,
                         "content": blocks or [{"type": "text", "text": ""}], "stop_reason": stop_reason,
                         "stop_sequence": stop_sequence, "usage": _usage(state, prep, final)})


def _tool_use(call_id: str, name: str, arguments) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call_id.rsplit("-", 1)[-1], "name": name, "input": arguments}


def _input(arguments: str) -> dict:
    """A call's arguments as the tool_use input object ({} where they are no JSON object: a call
    cut by max_tokens)."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _stop(req: MessagesRequest, out: CompletionOutput, called: bool) -> tuple[str, Optional[str]]:
    """(stop_reason, stop_sequence) by Anthropic's rules."""
    if out.finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(out.stop_reason, str) and out.stop_reason in (req.stop_sequences or ()):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def _usage(state: ServerState, prep: PreparedChat, final: Optional[RequestOutput]) -> dict:
    prompt = len(prep.prompt_ids)
    output = len(final.outputs[0].token_ids) if final is not None else 0
    usage = {"input_tokens": prompt, "output_tokens": output}
    details = prompt_tokens_details(state, final.num_cached_tokens if final is not None else 0, [prompt])
    if details is not None:
        usage.update(input_tokens=prompt - details["cached_tokens"] - details["created_cache_tokens"],
                     cache_read_input_tokens=details["cached_tokens"],
                     cache_creation_input_tokens=details["created_cache_tokens"])
    return usage


def _frame(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class _Blocks:
    """The streamed content blocks: one open at a time, a delta of another kind closes it. An
    answer's trailing whitespace is held back, so that blank text before a tool call opens no
    text block (the whole message has none)."""

    def __init__(self):
        self.index = -1
        self.kind: Optional[str] = None   # "thinking", "text" or "tool_use"
        self.held = ""

    def _open(self, kind: str, block: dict) -> list[dict]:
        events = self.close()
        self.index, self.kind = self.index + 1, kind
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _delta(self, kind: str, delta: dict) -> list[dict]:
        events = [] if self.kind == kind else self._open(kind, {"type": kind, kind: ""})
        return events + [{"type": "content_block_delta", "index": self.index, "delta": delta}]

    def close(self) -> list[dict]:
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "signature_delta", "signature": uuid.uuid4().hex}})
        self.kind = None
        return events + [{"type": "content_block_stop", "index": self.index}]

    def feed(self, reasoning: str, content: str, calls: list[dict]) -> list[dict]:
        events = self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning}) if reasoning else []
        self.held += content
        shown = self.held.rstrip()
        if shown:
            events += self._delta("text", {"type": "text_delta", "text": shown})
            self.held = self.held[len(shown):]
        for call in calls:
            fn = call["function"]
            if "id" in call:   # a new call: its block, then its arguments as they grow
                if self.kind == "text" and self.held:
                    events += self._delta("text", {"type": "text_delta", "text": self.held})
                self.held = ""
                events += self._open("tool_use", _tool_use(call["id"], fn["name"], {}))
            if fn.get("arguments"):
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})
        return events

    def finish(self) -> list[dict]:
        events = self._delta("text", {"type": "text_delta", "text": self.held}) if self.held else []
        self.held = ""
        if self.index < 0:   # an empty reply: one empty text block, as the whole message has
            events += self._open("text", {"type": "text", "text": ""})
        return events + self.close()


async def _stream(state: ServerState, req: MessagesRequest, prep: PreparedChat, message_id: str
                  ) -> AsyncIterator[str]:
    start = {"id": message_id, "type": "message", "role": "assistant", "model": prep.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": _usage(state, prep, None)}
    yield _frame({"type": "message_start", "message": start})
    splitter = ContentSplitter(prep, state.settings.tool_call_parser)
    blocks = _Blocks()
    sent, last, called = 0, None, False
    try:
        async for _, res in merge_streams([prep.stream(state)]):
            out, last = res.outputs[0], res
            reasoning, content, calls = splitter.feed(out.text[sent:], out.finish_reason is not None)
            sent = len(out.text)
            called = called or bool(calls)
            for event in blocks.feed(reasoning if prep.include_reasoning else "", content, calls):
                yield _frame(event)
    except Exception as exc:   # the status line is gone: Anthropic's error event
        err = api_error_from(exc, state.settings.retry_after_s)
        state.metrics.record_error(err.status)
        yield _frame(_error_body(err))
        return
    for event in blocks.finish():
        yield _frame(event)
    stop_reason, stop_sequence = _stop(req, last.outputs[0], called)
    yield _frame({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                  "usage": _usage(state, prep, last)})
    yield _frame({"type": "message_stop"})
