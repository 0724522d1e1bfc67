"""POST /v1/responses: OpenAI's Responses API on top of the chat path. The request becomes a chat
request (server/protocol_responses.py), so the chat template, tool-call and reasoning parsers,
structured outputs, sampling defaults and checks are chat's own (serving_chat.PreparedChat and
ContentSplitter); this module shapes what comes out as Responses output items:

- a `reasoning` item (the R1 `<think>` text as one `reasoning_text` part, as vLLM gives it) when
  the server runs a reasoning parser,
- a `message` item with one `output_text` part (with include message.output_text.logprobs, its
  tokens' logprobs: the answer's, after the reasoning, without the EOS that ended it; refused
  with tool calls, whose text is no answer),
- a `function_call` item per tool call (call_id, name, arguments as a JSON string),

and `usage` with input/output tokens, reasoning tokens and cached prompt tokens. A response cut
by max_output_tokens is `incomplete` (incomplete_details.reason max_output_tokens; its last
item too). Streamed, the events are OpenAI's: response.created, response.in_progress, then per
item output_item.added, content_part.added, the text / reasoning_text / function-call argument
deltas, their done events, content_part.done, output_item.done, and last response.completed
carrying the whole response, whatever its status (a cut one's too, status incomplete: vLLM
sends no response.incomplete, and the openai SDK's responses.stream() helper finds the final
response only in response.completed); each with its sequence_number and an
SSE `event:` line, and no closing `[DONE]` (OpenAI's Responses streams have none). The streamed
deltas join to the items of the non-streamed response. An error after the stream began is
OpenAI's `error` event, which also carries the `error` object the openai SDK raises.

A client that leaves mid-request aborts it and its KV blocks are freed at once, as on the chat
endpoint. With the store on (server/responses_store.py) a response is kept once whole (streamed:
after its last event; one whose client left is not kept); GET /v1/responses/{id} returns it. A
background response is stored "queued" and answered at once, its generation goes on in a task
(status in_progress, then completed / incomplete, or failed with its error), and POST
/v1/responses/{id}/cancel cancels that task, which aborts the engine request. A background
stream's events are kept as they come (vLLM's event store): the POST streams them, and a client
that leaves it leaves the generation running; GET /v1/responses/{id}?stream=true&starting_after=N
streams them again from sequence number N + 1.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.args import STORE_ENV
from deepserve.server.errors import APIError, from_validation_error
from deepserve.server.protocol_responses import LOGPROBS, ChatFromResponses, ResponsesRequest
from deepserve.server.reasoning import THINK_END, THINK_START
from deepserve.server.responses_store import EventLog, ResponseStore, StoredResponse
from deepserve.server.serving_chat import ContentSplitter, PreparedChat, chat_logprobs, collect_final
from deepserve.server.serving_common import (SSEResponse, ServerState, api_error_from, compile_grammar,
                                             merge_streams, parse_request, query_flag, sse_data, until_disconnect)

logger = logging.getLogger("deepserve")

# the chat fields a Responses request sends under other names, for errors to name what was sent
_RENAMED = {"messages": "input", "response_format": "text.format", "max_completion_tokens": "max_output_tokens",
            "reasoning_effort": "reasoning.effort"}


def _renamed(err: APIError) -> APIError:
    if err.param in _RENAMED:
        err.message = err.message.replace(err.param, _RENAMED[err.param], 1)
        err.param = _RENAMED[err.param]
    return err


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _call_id(chat_id: str) -> str:
    """A chat tool-call id (chatcmpl-tool-HEX) as a Responses call_id (call_HEX)."""
    return "call_" + chat_id.rsplit("-", 1)[-1]


def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def message_item(item_id: str, text: str, status: str, logprobs: Optional[list[dict]] = None) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


async def create_response(request: Request, state: ServerState):
    req = await parse_request(request, ResponsesRequest, state.settings.max_body_bytes)
    store = state.response_store
    refused = req.refused(store is not None)
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])
    history = _history(store, req.previous_response_id)
    try:
        chat = ChatFromResponses.model_validate(req.chat_request(history))
    except ValidationError as exc:
        raise _renamed(from_validation_error(exc)) from None
    try:
        prep = await PreparedChat(state, chat).tokenize(state, chat)
        await compile_grammar(state, prep.params, prep.guided_field)
    except APIError as err:
        raise _renamed(err) from None
    if prep.top_k is not None and prep.tool_mode is not None:
        raise APIError(400, f"include {LOGPROBS!r} is not supported with tool calls (tool_choice none takes it)",
                       param="include")
    response_id = f"resp_{req.request_id}" if req.request_id else _new_id("resp")
    running = store.get(response_id) if store is not None else None
    if running is not None and running.running:   # replacing it would leave its generation out of reach
        raise APIError(400, f"request_id {req.request_id!r} names response {response_id}, which is still "
                            f"{running.response['status']} in the background", param="request_id")
    kept = StoredResponse({}, history + req.input_items()) if req.stored(store is not None) else None
    if req.background:   # refused() let it through only with the store
        kept.response = _response(req, prep, response_id, "queued", [], None, stored=True)
        if req.stream:
            kept.events = EventLog()
            kept.task = asyncio.create_task(_run_background_stream(state, req, prep, kept))
        else:
            kept.task = asyncio.create_task(_run_background(state, req, prep, kept))
        store.put(response_id, kept)
        # a client that leaves this stream leaves the generation running: GET ?stream=true resumes it
        return SSEResponse(kept.events.replay()) if req.stream else JSONResponse(kept.response)
    if req.stream:
        return SSEResponse(_stream(state, req, prep, response_id, kept))
    final: RequestOutput = await until_disconnect(request, collect_final(prep, state))
    status, items = _output(state, prep, final)
    body = _response(req, prep, response_id, status, items, _usage(state, prep, final), stored=kept is not None)
    _keep(store, kept, body)
    return JSONResponse(body)


def _history(store: Optional[ResponseStore], previous_id: Optional[str]) -> list[dict]:
    """The input items that previous_response_id continues ([] without one)."""
    if previous_id is None:
        return []
    previous = store.get(previous_id)
    if previous is None:
        raise APIError(404, f"Response with id '{previous_id}' not found.", param="previous_response_id")
    if previous.running:
        raise APIError(400, f"previous response {previous_id} is still {previous.response['status']}: continue it "
                            "once it has finished", param="previous_response_id")
    return previous.conversation()


def _keep(store: Optional[ResponseStore], kept: Optional[StoredResponse], body: dict) -> None:
    if kept is not None and kept.response.get("status") != "cancelled":
        kept.response = body
        store.put(body["id"], kept)


def _output(state: ServerState, prep: PreparedChat, final: RequestOutput) -> tuple[str, list[dict]]:
    """A whole response's status and output items."""
    out = final.outputs[0]
    reasoning, content, calls = ContentSplitter(prep, state.settings.tool_call_parser).whole(out.text)
    items = []
    if reasoning and prep.include_reasoning:
        items.append(reasoning_item(_new_id("rs"), reasoning, "completed"))
    if content:
        logprobs = _answer_logprobs(state, prep, out, 0)
        items.append(message_item(_new_id("msg"), content, "completed", logprobs))
    for call in calls:
        items.append(call_item(_new_id("fc"), _call_id(call["id"]), call["function"]["name"],
                               call["function"]["arguments"], "completed"))
    status = _status(out)
    if items and status == "incomplete":   # the item that max_output_tokens cut (a call too, as streamed)
        items[-1]["status"] = "incomplete"
    return status, items


async def _run_background(state: ServerState, req: ResponsesRequest, prep: PreparedChat,
                          kept: StoredResponse) -> None:
    """A background response's generation; its stored response shows how far it got. Cancelling
    this task (POST .../cancel) aborts the engine request."""
    kept.response["status"] = "in_progress"
    try:
        final = await collect_final(prep, state)
        status, items = _output(state, prep, final)
        body = _response(req, prep, kept.response["id"], status, items, _usage(state, prep, final), stored=True)
    except Exception as exc:   # no client waits for it: the stored response says what went wrong
        err = api_error_from(exc, state.settings.retry_after_s)
        state.metrics.record_error(err.status)
        _failed(kept, err)
        return
    if kept.response["status"] == "in_progress":   # not cancelled meanwhile
        kept.response = body


async def _run_background_stream(state: ServerState, req: ResponsesRequest, prep: PreparedChat,
                                 kept: StoredResponse) -> None:
    """A background stream's generation: its events go to the response's event log, which the
    POST's stream and GET ?stream=true replay."""
    kept.response["status"] = "in_progress"
    try:
        async for frame in _stream(state, req, prep, kept.response["id"], kept):
            kept.events.add(frame)
    finally:
        kept.events.close()


def _failed(kept: StoredResponse, err: APIError) -> None:
    if err.status >= 500:   # 503: the engine stopped (the server shutting down), no fault of this response
        logger.log(logging.WARNING if err.status == 503 else logging.ERROR, "background response %s failed: %s",
                   kept.response["id"], err.message)
    kept.response.update(status="failed", error={"code": str(err.body()["error"]["code"]), "message": err.message})


async def retrieve_response(request: Request, state: ServerState, response_id: str):
    """GET /v1/responses/{id}: the stored response (a background one as far as it got); with
    stream=true a background stream's events, from sequence number starting_after + 1 on (vLLM's)."""
    query = request.query_params
    unknown = sorted(set(query) - {"stream", "starting_after"})
    if unknown:
        raise APIError(400, f"query parameter {unknown[0]} is not supported (stream and starting_after are)",
                       param=unknown[0])
    stream = query_flag(request, "stream")
    after = query.get("starting_after")
    if after is not None and not stream:
        raise APIError(400, "starting_after goes with stream=true", param="starting_after")
    try:
        start = int(after) + 1 if after is not None else 0
    except ValueError:
        start = -1
    if start < 0:
        raise APIError(400, f"starting_after must be an integer >= -1, got {after!r}", param="starting_after")
    kept = _stored(state, response_id)
    if not stream:
        return kept.response
    if kept.events is None:
        raise APIError(400, f"response {response_id} was not created with background and stream true: it has no "
                            "events to stream (GET it without stream)", param="stream")
    return SSEResponse(kept.events.replay(start))


async def cancel_response(state: ServerState, response_id: str) -> dict:
    """POST /v1/responses/{id}/cancel: a running background response is cancelled, its engine
    request aborted (its KV blocks freed); a finished one is returned as it is (OpenAI's)."""
    kept = _stored(state, response_id)
    if not kept.response["background"]:
        raise APIError(400, f"response {response_id} was not created with background true: only background "
                            "responses can be cancelled", param="response_id")
    if kept.running:
        kept.response["status"] = "cancelled"
        kept.task.cancel()
        await asyncio.wait([kept.task])   # the engine request is aborted when this returns
    return kept.response


def _stored(state: ServerState, response_id: str) -> StoredResponse:
    if state.response_store is None:
        raise APIError(404, f"Response with id '{response_id}' not found (this server keeps no responses unless "
                            f"started with --enable-responses-api-store or {STORE_ENV}=1).", param="response_id")
    kept = state.response_store.get(response_id)
    if kept is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return kept


def _status(out: CompletionOutput) -> str:
    return "incomplete" if out.finish_reason == "length" else "completed"


def _response(req: ResponsesRequest, prep: PreparedChat, response_id: str, status: str, output: list[dict],
              usage: Optional[dict], stored: bool = False) -> dict:
    """The Response object, as OpenAI's API returns it."""
    choice = req.tool_choice
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        choice = {"type": "function", "name": choice.name}
    fmt = req.text.format if req.text is not None else None
    return {"id": response_id, "object": "response", "created_at": prep.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": prep.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": stored, "background": bool(req.background), "temperature": prep.params.temperature,
            "top_p": prep.params.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice, "tools": [t.model_dump() for t in req.tools or []], "truncation": "disabled",
            "top_logprobs": req.top_logprobs, "usage": usage, "user": req.user, "metadata": req.metadata or {},
            # vLLM's ResponsesResponse fields besides: the tier (auto and default are served), the
            # penalties sampled with, and OpenAI's max_tool_calls / prompt (both refused when sent)
            "service_tier": req.service_tier or "auto", "presence_penalty": prep.params.presence_penalty,
            "frequency_penalty": prep.params.frequency_penalty, "max_tool_calls": None, "prompt": None}


def _think_span(state: ServerState, prep: PreparedChat, token_ids: list[int]) -> Optional[tuple[int, int]]:
    """[start, end) of the output tokens inside the <think> block (its tags not counted; end is
    the length while the block is open); None when the output has no reasoning."""
    parser = prep.reasoning_parser()
    if parser is None:
        return None
    tok = state.tokenizer.tok
    start_id, end_id = tok.token_to_id(THINK_START), tok.token_to_id(THINK_END)
    first = 0
    if parser.state != "reasoning":   # the output must open the block itself
        if start_id is None or start_id not in token_ids:
            return None
        first = token_ids.index(start_id) + 1
    rest = token_ids[first:]
    return first, first + (rest.index(end_id) if end_id in rest else len(rest))


def _answer_logprobs(state: ServerState, prep: PreparedChat, out: CompletionOutput, sent: int) -> list[dict]:
    """The logprobs of the answer's tokens from the `sent`-th on: after </think> and the blank
    tokens the reasoning parser drops, all of them without reasoning, less the EOS or stop token
    that ended the output, which its text leaves out ([] without logprobs)."""
    if prep.top_k is None:
        return []
    ids, span = out.token_ids, _think_span(state, prep, out.token_ids)
    end = len(ids) - 1 if out.finish_reason == "stop" and not isinstance(out.stop_reason, str) else len(ids)
    start = 0 if span is None else span[1] + 1
    while start < end and span is not None and not out.logprobs[start][ids[start]].decoded_token.strip():
        start += 1
    start = min(start + sent, end)
    return chat_logprobs(out, start, end, prep.top_k)["content"]


def _usage(state: ServerState, prep: PreparedChat, final: RequestOutput) -> dict:
    prompt, output = len(prep.prompt_ids), len(final.outputs[0].token_ids)
    start, end = _think_span(state, prep, final.outputs[0].token_ids) or (0, 0)
    # cache_write_tokens: OpenAI's paid cache writes; the prefix cache here is kept without them
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": final.num_cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": end - start},
            "total_tokens": prompt + output}


class _StreamedItems:
    """A streamed response's output items, built from the chat splitter's deltas, and the events
    that announce them. One item is open at a time; a delta of another kind closes it. A
    message's trailing whitespace is held back, so that blank text before a function call opens
    no message (the non-streamed response has none): an open message takes it when a call
    follows, as the whole response's text keeps it."""

    _PARTS = {"reasoning": {"type": "reasoning_text", "text": ""},
              "message": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}
    _DELTAS = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
               "call": "response.function_call_arguments.delta"}

    def __init__(self):
        self.items: list[dict] = []           # the closed items
        self.kind: Optional[str] = None       # the open item's: "reasoning", "message" or "call"
        self.id, self.text, self.held = "", "", ""
        self.call_id, self.name = "", ""
        self.logprobs: list[dict] = []        # the message's token logprobs: sent, and not yet sent
        self.pending: list[dict] = []

    def _where(self) -> dict:
        return {"item_id": self.id, "output_index": len(self.items)}

    def _open(self, kind: str, **call) -> list[dict]:
        events = self._close("completed")
        self.kind, self.text = kind, ""
        self.id = _new_id({"reasoning": "rs", "message": "msg", "call": "fc"}[kind])
        if kind == "reasoning":
            item = {"id": self.id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        elif kind == "message":
            item = {"id": self.id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        else:
            self.call_id, self.name = call["call_id"], call["name"]
            item = call_item(self.id, self.call_id, self.name, "", "in_progress")
        events.append({"type": "response.output_item.added", "output_index": len(self.items), "item": item})
        if kind in self._PARTS:
            events.append({"type": "response.content_part.added", **self._where(), "content_index": 0,
                           "part": dict(self._PARTS[kind])})
        return events

    def _delta(self, kind: str, text: str, **call) -> list[dict]:
        events = self._open(kind, **call) if self.kind != kind or call else []
        if text:
            self.text += text
            event = {"type": self._DELTAS[kind], **self._where()}
            if kind != "call":
                event["content_index"] = 0
            event["delta"] = text
            if kind == "message":   # the logprobs of the tokens generated since the last delta
                event["logprobs"], self.pending = self.pending, []
                self.logprobs += event["logprobs"]
            events.append(event)
        return events

    def _close(self, status: str) -> list[dict]:
        if self.kind is None:
            return []
        where, text = self._where(), self.text
        if self.kind == "reasoning":
            item = reasoning_item(self.id, text, status)
            events = [{"type": "response.reasoning_text.done", **where, "content_index": 0, "text": text},
                      {"type": "response.content_part.done", **where, "content_index": 0, "part": item["content"][0]}]
        elif self.kind == "message":
            item = message_item(self.id, text, status, self.logprobs + self.pending)
            events = [{"type": "response.output_text.done", **where, "content_index": 0, "text": text,
                       "logprobs": item["content"][0]["logprobs"]},
                      {"type": "response.content_part.done", **where, "content_index": 0, "part": item["content"][0]}]
        else:
            item = call_item(self.id, self.call_id, self.name, text, status)
            events = [{"type": "response.function_call_arguments.done", **where, "name": self.name, "arguments": text}]
        events.append({"type": "response.output_item.done", "output_index": where["output_index"], "item": item})
        self.items.append(item)
        self.kind = None
        return events

    def feed(self, reasoning: str, content: str, calls: list[dict], logprobs: list[dict]) -> list[dict]:
        self.pending += logprobs
        events = self._delta("reasoning", reasoning) if reasoning else []
        if content:
            self.held += content
            shown = self.held.rstrip()
            if shown:
                events += self._delta("message", shown)
                self.held = self.held[len(shown):]
        for call in calls:
            fn = call["function"]
            if "id" in call:   # a new call: its header, then its arguments as they grow
                if self.kind == "message" and self.held:
                    events += self._delta("message", self.held)
                self.held = ""
                events += self._delta("call", fn.get("arguments", ""), call_id=_call_id(call["id"]), name=fn["name"])
            elif fn.get("arguments"):
                events += self._delta("call", fn["arguments"])
        return events

    def finish(self, status: str) -> list[dict]:
        events = self._delta("message", self.held) if self.held else []
        self.held = ""
        return events + self._close(status)


async def _stream(state: ServerState, req: ResponsesRequest, prep: PreparedChat, response_id: str,
                  kept: Optional[StoredResponse] = None) -> AsyncIterator[str]:
    numbers = itertools.count()

    def frame(event: dict) -> str:
        event["sequence_number"] = next(numbers)
        return f"event: {event['type']}\n{sse_data(event)}"

    started = _response(req, prep, response_id, "in_progress", [], None, stored=kept is not None)
    yield frame({"type": "response.created", "response": started})
    yield frame({"type": "response.in_progress", "response": started})
    splitter = ContentSplitter(prep, state.settings.tool_call_parser)
    items = _StreamedItems()
    sent, sent_logprobs, last = 0, 0, None
    try:
        async for _, res in merge_streams([prep.stream(state)]):
            out, last = res.outputs[0], res
            reasoning, content, calls = splitter.feed(out.text[sent:], out.finish_reason is not None)
            reasoning = reasoning if prep.include_reasoning else ""
            logprobs = _answer_logprobs(state, prep, out, sent_logprobs)
            sent, sent_logprobs = len(out.text), sent_logprobs + len(logprobs)
            for event in items.feed(reasoning, content, calls, logprobs):
                yield frame(event)
    except Exception as exc:   # the status line is gone: OpenAI's error event, with the error object the SDKs raise
        err = api_error_from(exc, state.settings.retry_after_s)
        state.metrics.record_error(err.status)
        if kept is not None and kept.events is not None:
            _failed(kept, err)
        body = err.body()
        yield frame({"type": "error", "code": str(body["error"]["code"]), "message": err.message, "param": err.param,
                     **body})
        return
    status = _status(last.outputs[0])
    for event in items.finish(status):
        yield frame(event)
    body = _response(req, prep, response_id, status, items.items, _usage(state, prep, last), stored=kept is not None)
    _keep(state.response_store, kept, body)
    yield frame({"type": "response.completed", "response": body})

