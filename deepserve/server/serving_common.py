"""What both generation endpoints share: the server state, reading and checking a request
body (unsupported fields refused), the context-length check, sampling parameters with the
model's generation-config defaults, structured-output grammars compiled off the event loop,
mapping engine exceptions to API errors, running several engine requests as one stream, and
SSE framing that ends every stream cleanly.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Type, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from deepserve.engine.async_llm import AsyncLLM, EngineDeadError, EngineStepError, QueueFullError
from deepserve.engine.llm_engine import RequestError
from deepserve.engine.sampling_params import SamplingParams, whole_vocabulary
from deepserve.engine.thinking_budget import THINK_END, THINK_START, reasoning_ended
from deepserve.server.args import ServerArgs
from deepserve.server.batch_encoder import BatchEncoder
from deepserve.server.errors import APIError, from_validation_error, from_value_error, internal_error, sse_error
from deepserve.server.metrics import ServerMetrics
from deepserve.server.protocol import ignored_fields, unsupported_field, usage
from deepserve.server.request_log import RequestLogger
from deepserve.server.responses_store import ResponseStore

logger = logging.getLogger("deepserve")

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_path: str
    api_keys: list[str] = field(default_factory=list)   # a request must bear one of them (none: no check)
    root_path: Optional[str] = None   # vLLM's --root-path: the prefix a proxy serves the routes under
    disable_fastapi_docs: bool = False   # vLLM's: no /openapi.json, /docs, /redoc
    reasoning_parser: Optional[str] = None
    # the token ids of the reasoning's start and end, which thinking_token_budget counts between
    reasoning_token_ids: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None
    max_body_bytes: int = ServerArgs.max_body_bytes
    retry_after_s: int = 1
    created: int = 0
    # the model's generation_config.json sampling defaults (--generation-config auto)
    generation_defaults: dict = field(default_factory=dict)
    tool_call_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False
    exclude_tools_when_tool_choice_none: bool = False   # vLLM's: tool_choice none renders no tools
    default_chat_template_kwargs: dict = field(default_factory=dict)   # under each request's own
    chat_template_content_format: str = "auto"   # vLLM's: how message content reaches the template
    trust_request_chat_template: bool = False    # vLLM's: a request may bring its own chat template
    grammar_in_reasoning: bool = False   # vLLM's enable_in_reasoning: grammars hold from the first token
    return_tokens_as_token_ids: bool = False   # vLLM's: the default of requests that do not say
    response_role: str = "assistant"   # vLLM's --response-role: a new turn's role in the reply
    stream_interval: int = 1   # vLLM's: a streamed request's outputs are spaced by this many tokens
    max_logprobs: int = ServerArgs.max_logprobs
    # samples a request may ask for (n): the engine's max_num_seqs, at least OpenAI's limit; an
    # unbounded n would have one request build millions of sequences (memory without end)
    max_n: int = 128
    scheduling_policy: str = "fcfs"
    cors: dict = field(default_factory=dict)   # CORSMiddleware's arguments (ServerArgs.cors)
    # vLLM's --enable-prompt-tokens-details, --enable-force-include-usage, --enable-server-load-tracking
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    enable_server_load_tracking: bool = False
    enable_tokenizer_info_endpoint: bool = False   # vLLM's: GET /tokenizer_info is served
    enable_request_id_headers: bool = False   # vLLM's: every answer carries an X-Request-Id header
    system_fingerprint: Optional[str] = None   # vLLM's, from --fingerprint-mode (server/fingerprint.py)
    # the prefix cache's block size (None: prefix caching is off), for created_cache_tokens
    prefix_cache_block_size: Optional[int] = None
    # how many /v1/responses responses are kept (0: none; --enable-responses-api-store)
    responses_store_size: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class ServerState:
    llm: AsyncLLM
    settings: ServerSettings
    metrics: ServerMetrics
    request_logger: Optional[RequestLogger] = None   # --enable-log-requests
    server_load: int = field(default=0, init=False)   # generation requests in flight (GET /load)
    response_store: Optional[ResponseStore] = field(default=None, init=False)
    _encoder: Optional[BatchEncoder] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.settings.responses_store_size:
            self.response_store = ResponseStore(self.settings.responses_store_size)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def generate(self, prompt, params, request_id: str):
        """AsyncLLM.generate, logged with --enable-log-requests, spaced by --stream-interval."""
        outputs = self.llm.generate(prompt, params, request_id)
        if self.request_logger is not None:
            outputs = self.request_logger.logged(outputs, request_id, prompt, params)
        return outputs if self.settings.stream_interval == 1 else spaced(outputs, self.settings.stream_interval)

    async def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """The prompts' token ids, encoded off the event loop (server/batch_encoder.py)."""
        if self._encoder is None:
            self._encoder = BatchEncoder(self.tokenizer)
        return await self._encoder.encode(texts, add_special_tokens)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def check_model(self, name: Optional[str]) -> str:
        if name and name not in self.settings.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist; served: "
                                f"{', '.join(self.settings.served_model_names)}", param="model")
        return name or self.model_name

    def grammar_start_after(self, params: SamplingParams, prompt_ids: list[int]) -> Optional[int]:
        """The token a request's structured-output grammar waits for: with a reasoning parser,
        `</think>` unless the prompt closed the reasoning (vLLM's is_reasoning_end, decided for
        every request: chat's rendered prompt, each completions prompt); else None."""
        guided = params.guided
        if guided is None or guided.start_after_token is not None or self.tokenizer is None or \
                self.settings.reasoning_parser is None or self.settings.grammar_in_reasoning:
            return None
        start, end = self.tokenizer.tok.token_to_id(THINK_START), self.tokenizer.tok.token_to_id(THINK_END)
        if end is None or reasoning_ended(prompt_ids, (start,), (end,)):
            return None
        return end

    def check_length(self, prompt_tokens: int, max_tokens: Optional[int], what: str = "prompt",
                     field: str = "max_tokens", min_tokens: int = 0) -> None:
        """A 400 where the request does not fit the context, in vLLM 0.26's words and parameter
        names (clients match the words to shorten a prompt and retry): max_tokens alone past it
        names the field it came from (`field`), prompt + max_tokens past it `input_tokens`, and a
        prompt that fills it the prompt's field (`what`). A `min_tokens` past max_tokens (or, without
        one, past the room the prompt leaves, which vLLM's server asks for) is refused in
        SamplingParams' words."""
        limit = self.llm.max_model_len
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"{field}={max_tokens} cannot be greater than max_model_len={limit}. Please request "
                                f"fewer output tokens.", param=field)
        total = prompt_tokens + (max_tokens or 0)
        if prompt_tokens >= limit or total > limit:
            no_room = "; the prompt leaves no room for an output token" if total <= limit else ""
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{max_tokens or 0} output tokens and your prompt contains {prompt_tokens} input "
                                f"tokens, for a total of {total} tokens{no_room}. Please reduce the length of the "
                                f"input prompt or the number of requested output tokens.",
                           param="input_tokens" if total > limit else what)
        asked = limit - prompt_tokens if max_tokens is None else max_tokens
        if min_tokens > asked:
            raise APIError(400, f"min_tokens must be less than or equal to max_tokens={asked}, got {min_tokens}.",
                           param="min_tokens")


def query_flag(request: Request, name: str) -> bool:
    """A true / false query parameter (true, false, 1, 0; false when absent), else a 400 naming it."""
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(400, f"{name} must be true or false, got {request.query_params[name]!r}", param=name)
    return value in ("true", "1")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes with 413 (without reading it all); a
    client gone before its body's end raises ClientDisconnected (no one is left to answer)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


def header_request_id(request: Request, body_id: Optional[str]) -> Optional[str]:
    """The id a completion or chat response ends with: an X-Request-Id header's (gateways add
    one), else the body's request_id, as vLLM's."""
    return request.headers.get("x-request-id") or body_id


def utf8_json(body: bytes) -> bytes:
    """JSON text as UTF-8: a byte-order mark, UTF-16 or UTF-32 read as Python's json.loads reads
    them (so vLLM reads a body)."""
    encoding = json.detect_encoding(body)
    if encoding == "utf-8":
        return body
    try:
        return body.decode(encoding).encode()
    except UnicodeDecodeError as exc:
        raise APIError(400, f"malformed JSON body: not {encoding} text ({exc.reason})") from None


def check_json_content_type(request: Request) -> None:
    """vLLM's rule for its JSON routes: a body sent as application/json, else a 400."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(400, f"Unsupported Media Type: Only 'application/json' is allowed, got Content-Type "
                            f"{content_type!r}")


async def parse_request(request: Request, model: Type[M], limit: int) -> M:
    """The body as `model`: JSON sent as application/json, else a 400."""
    check_json_content_type(request)
    body = utf8_json(await read_body(request, limit))
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    found = unsupported_field(req)
    if found is not None:
        raise APIError(400, found[1], param=found[0])
    ignored = ignored_fields(req)
    if ignored:
        logger.warning("request fields ignored (neither OpenAI's nor vLLM's API defines them): %s",
                       ", ".join(ignored))
    return req


def sampling_params(state: ServerState, req, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    """The request's SamplingParams over the model's defaults; 400 naming a bad field."""
    opts = req.stream_options
    if opts is not None and (opts.model_fields_set or opts.model_extra) and not req.stream:   # vLLM's rule: {} passes
        raise APIError(400, "stream_options is only for streamed requests (stream=true)", param="stream_options")
    if req.n > state.settings.max_n:
        raise APIError(400, f"n must be <= {state.settings.max_n} (the server's --max-num-seqs, at least OpenAI's "
                            f"limit of 128), got {req.n}", param="n")
    if req.best_of not in (None, req.n):  # under n: vLLM refuses it too; over n: no ranking of extra samples
        raise APIError(400, f"best_of must equal n ({req.n}), got {req.best_of}", param="best_of")
    try:
        params = req.sampling_params(max_tokens, logprobs, state.settings.generation_defaults)
    except ValueError as exc:
        err, field = api_error_from(exc), req.max_tokens_field()
        if err.param == "max_tokens" and field != "max_tokens":  # name the field sent
            err.param, err.message = field, err.message.replace("max_tokens", field, 1)
        raise err from None
    if req.priority and state.settings.scheduling_policy != "priority":
        raise APIError(400, f"priority {req.priority} needs --scheduling-policy priority (this server schedules "
                            "first come, first served)", param="priority")
    if params.logprob_token_ids is not None and logprobs is None:   # vLLM's rule
        raise APIError(400, "logprob_token_ids needs logprobs (true on chat completions, a number on completions)",
                       param="logprob_token_ids")
    limit = state.settings.max_logprobs
    # logprob_token_ids' number stands in logprobs; it has its own limit (SamplingParams'), as in vLLM
    sample_logprobs = params.logprobs if params.logprob_token_ids is None else None
    for name, given in (("logprobs", sample_logprobs), ("prompt_logprobs", params.prompt_logprobs)):
        value = whole_vocabulary(given, state.llm.vocab_size)
        if value is not None and value > limit >= 0:
            shown = "top_logprobs" if name == "logprobs" and hasattr(req, "top_logprobs") else name
            got = f"{given} (the whole vocabulary, {value} tokens)" if given == -1 else given
            raise APIError(400, f"{shown} must be <= {limit} (--max-logprobs), got {got}", param=shown)
    for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or []),
                      ("stop_token_ids", params.stop_token_ids), ("logprob_token_ids", params.logprob_token_ids or [])):
        bad = next((t for t in ids if t >= state.llm.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{name} token id {bad} is outside the vocabulary [0, {state.llm.vocab_size})",
                           param=name)
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1 and req.truncate_prompt_tokens != -1:
        raise APIError(400, f"truncate_prompt_tokens must be -1 (as many as the context holds) or >= 1, got "
                            f"{req.truncate_prompt_tokens}", param="truncate_prompt_tokens")
    if req.truncate_prompt_tokens is not None:   # vLLM's rule: the prompt must leave room for the reply
        budget = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        room = state.llm.max_model_len - (req.max_new_tokens() or 0)
        if req.truncate_prompt_tokens > room:
            raise APIError(400, f"truncate_prompt_tokens={req.truncate_prompt_tokens} cannot be greater than "
                                f"max_model_len - {budget} = {room}. Please request a smaller truncation size.",
                           param="truncate_prompt_tokens")
    if params.thinking_token_budget is not None:
        if state.settings.reasoning_token_ids is None:   # vLLM's rule
            raise APIError(400, "thinking_token_budget needs to know where reasoning starts and ends: start the "
                                "server with --reasoning-parser deepseek_r1 (or --reasoning-config)",
                           param="thinking_token_budget")
        params.reasoning_token_ids = state.settings.reasoning_token_ids
    return params


def truncated_prompt(state: ServerState, req, ids: list[int], max_tokens: Optional[int]) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (vLLM's default side, "left"); -1 keeps
    as many as the context holds beside max_tokens (at least one token for the reply)."""
    keep = req.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep == -1:
        keep = max(state.llm.max_model_len - (max_tokens or 1), 1)
    return ids[-keep:]


async def compile_grammar(state: ServerState, params: SamplingParams, field: Optional[str]) -> None:
    """Compile a structured-output request's grammar in a worker thread (the engine thread
    would otherwise stall every running request while it compiles); 400 for a bad spec,
    naming `field`, the request field it came from."""
    engine = getattr(state.llm, "engine", None)
    if params.guided is None or params.guided.compiled is not None or engine is None:
        return
    try:
        await asyncio.to_thread(lambda: engine.grammar_compiler().compile(params.guided))
    except ValueError as exc:
        raise APIError(400, str(exc), param=field) from None


async def spaced(outputs: AsyncIterator, interval: int) -> AsyncIterator:
    """vLLM's --stream-interval: the first output, then one each `interval` new tokens, and the
    last. Outputs are cumulative (text and ids so far), so one left out merges into the next."""
    sent = None
    try:
        async for out in outputs:
            tokens = max((len(o.token_ids) for o in out.outputs), default=0)
            if out.finished or sent is None or tokens - sent >= interval:
                sent = tokens
                yield out
    finally:   # a client gone: the inner stream's close aborts the request
        await outputs.aclose()


def tokens_as_ids(state: ServerState, req) -> bool:
    """Whether logprobs name tokens `token_id:N`: the request's return_tokens_as_token_ids, else
    the server's --return-tokens-as-token-ids (vLLM's rule)."""
    given = req.return_tokens_as_token_ids
    return bool(given if given is not None else state.settings.return_tokens_as_token_ids)


def usage_in_stream(state: ServerState, req) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage on every chunk): stream_options' include_usage
    and continuous_usage_stats, both with --enable-force-include-usage (vLLM's rule)."""
    if state.settings.enable_force_include_usage:
        return True, True
    opts = req.stream_options
    if opts is None or not opts.include_usage:
        return False, False
    return True, bool(opts.continuous_usage_stats)


def stream_usage(continuous: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    """The usage field of a chunk before the last where the stream has usage: with continuous
    usage stats only ({} without: vLLM's chunks leave an unset usage out, not null)."""
    return {"usage": usage(prompt_tokens, completion_tokens)} if continuous else {}


def prompt_tokens_details(state: ServerState, cached_tokens: int, prompt_lens: Optional[list[int]] = None
                          ) -> Optional[dict]:
    """vLLM's usage.prompt_tokens_details with --enable-prompt-tokens-details (None without):
    cached_tokens, the prompt tokens found in the prefix cache; with `prompt_lens` (chat's, as
    vLLM's) created_cache_tokens too, those the request wrote to it (its prompt's full blocks
    less the ones it found)."""
    if not state.settings.enable_prompt_tokens_details:
        return None
    created = None
    if prompt_lens is not None:
        block = state.settings.prefix_cache_block_size
        created = 0 if block is None else max(0, sum(n // block * block for n in prompt_lens) - cached_tokens)
    return {"cached_tokens": cached_tokens, "created_cache_tokens": created, "multimodal_tokens": None}


def api_error_from(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """Map what the engine raises to the API error the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (QueueFullError, EngineDeadError)):
        return APIError(503, str(exc), headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc))
    if isinstance(exc, (RequestError, ValueError)):
        return from_value_error(exc)
    return internal_error(exc)


_DONE = object()


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators as (index, item); the first error ends all of them.
    Closing the merged stream cancels every source, which aborts their engine requests."""
    if len(streams) == 1:  # the common case, without the extra tasks
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None))
            await queue.put((i, None, _DONE))
        except Exception as exc:  # handed to the consumer below
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, status = await queue.get()
            if status is _DONE:
                remaining -= 1
            elif status is not None:
                raise status
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# characters Python's str.splitlines() (and so httpx's aiter_lines) breaks lines at that JSON
# leaves unescaped: a client splitting the stream that way would cut a data line in two
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _one_line(text: str) -> str:
    if "\u2028" in text or "\u2029" in text or "\x85" in text:  # rare: three scans cost far less than translate
        return text.translate(_LINE_BREAKS)
    return text


def sse_data(event: dict) -> str:
    """One SSE data frame holding `event` as JSON on a single line for any line splitter."""
    return f"data: {_one_line(json.dumps(event, ensure_ascii=False))}\n\n"


def fingerprint_fields(state: ServerState) -> dict:
    """The system_fingerprint of a stream's last chunks ({} without one): vLLM sends it on each
    choice's finishing chunk, or with include_usage on the usage chunk alone."""
    fingerprint = state.settings.system_fingerprint
    return {} if fingerprint is None else {"system_fingerprint": fingerprint}


class ChunkFrames:
    """The SSE frames of one stream's chunks, which all open with the same fields (`head`: id,
    object, created, model): those are encoded once, and each frame encodes only the rest of
    its chunk, the bytes `sse_data({**head, **rest})` gives (json.dumps' default separators)."""

    def __init__(self, **head):
        self.prefix = f"data: {_one_line(json.dumps(head, ensure_ascii=False))[:-1]}, "

    def __call__(self, **rest) -> str:
        """The frame of the chunk {**head, **rest} (`rest`: at least one field)."""
        return f"{self.prefix}{_one_line(json.dumps(rest, ensure_ascii=False))[1:]}\n\n"


async def sse(events: AsyncIterator, state: ServerState) -> AsyncIterator[str]:
    """Frame dict events as SSE (a str event is a frame already: `ChunkFrames`); an error
    mid-stream becomes an error event, then [DONE]."""
    try:
        async for event in events:
            yield event if isinstance(event, str) else sse_data(event)
    except Exception as exc:  # the status line is gone: report in-band
        err = api_error_from(exc, state.settings.retry_after_s)
        state.metrics.record_error(err.status)
        yield sse_error(err)
    yield "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A stream that notices a client leaving even while no token is due, and always closes
    its iterator, so the engine requests behind it are aborted at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away while we were sending
                    pass
                finally:
                    with anyio.CancelScope(shield=True):
                        await self.body_iterator.aclose()
                    tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


class ClientDisconnected(Exception):
    """The client of a non-streamed request went away before its answer: there is no one to
    answer (the app ends the request without logging an error)."""


async def until_disconnect(request: Request, coro) -> object:
    """Run `coro` (a non-streamed generation); cancel it if the client disconnects first
    (cancelling aborts its engine requests) and raise ClientDisconnected."""
    task = asyncio.ensure_future(coro)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()
