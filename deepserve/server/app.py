"""The FastAPI application: routes, API-key check, OpenAI-shaped errors for everything (unknown
routes and unexpected failures included), and the engine thread's start and stop in the
app's lifespan.

    POST /v1/completions      POST /v1/chat/completions     GET /v1/models, /v1/models/{model}
    POST /v1/responses        GET  /v1/responses/{id}       POST /v1/responses/{id}/cancel
                              (with the store: --enable-responses-api-store, as vLLM's)
    POST /v1/messages         POST /v1/messages/count_tokens (Anthropic's Messages API, as vLLM's)
    GET  /health              GET  /version                 GET /metrics
    POST /invocations         (vLLM's SageMaker route: a chat body, one with "messages", to chat
                              completions; one with "prompt" to completions)
    POST /scale_elastic_ep    POST /is_scaling_elastic_ep   (vLLM's elastic EP routes: the data parallel
                              size a server started with is the one it keeps; a scale to it is done)
    POST /tokenize            POST /detokenize              GET|POST /ping (/health)
    GET  /tokenizer_info      (vLLM's: the tokenizer's configuration, with --enable-tokenizer-info-endpoint)
    GET  /load                (vLLM's: generation requests in flight, with --enable-server-load-tracking)
    POST /start_profile       POST /stop_profile            (with --profiler-config, as vLLM)
    POST /reset_prefix_cache  GET  /is_sleeping             GET /server_info
                              (vLLM's development endpoints, with VLLM_SERVER_DEV_MODE=1)
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from deepserve import __version__
from deepserve.engine.async_llm import EngineDeadError
from deepserve.server.args import dev_mode
from deepserve.server.dev_endpoints import add_dev_routes
from deepserve.server.errors import APIError, error_body, error_response, internal_error
from deepserve.server.metrics import HTTP_UNCOUNTED_PATHS
from deepserve.server.protocol import DetokenizeRequest, TokenizeRequest
from deepserve.server.serving_chat import create_chat_completion, render_messages
from deepserve.server.serving_common import (ClientDisconnected, ServerState, api_error_from, check_json_content_type,
                                             parse_request, read_body, utf8_json)
from deepserve.server.serving_completions import create_completion
from deepserve.server.serving_anthropic import count_tokens, create_message
from deepserve.server.serving_responses import cancel_response, create_response, retrieve_response
from deepserve.server.stopping import stop_interruptibly

logger = logging.getLogger("deepserve")


# the routes whose requests GET /load counts (vLLM's: a stored response's retrieval, which may
# stream a background generation, and its cancel too)
_LOADING_PATHS = frozenset(("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
                            "/invocations"))
_LOADING_PREFIX = "/v1/responses/"
# the path prefixes --api-key guards (vLLM's; /health, /metrics, ... stay open to probes)
_GUARDED_PREFIXES = ("/v1", "/v2", "/inference")


def route_path(scope) -> str:
    """The request's path without --root-path's prefix, where it has it (a proxy may strip it or not)."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


class LoadTrackingMiddleware:
    """Pure ASGI: counts the generation requests in flight in `state.server_load`, each from
    its start until its response (a stream included) has ended, as vLLM's load_aware_call."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        path = route_path(scope) if scope["type"] == "http" else ""
        if path not in _LOADING_PATHS and not path.startswith(_LOADING_PREFIX):
            return await self.app(scope, receive, send)
        self.state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.server_load -= 1


class HTTPMetricsMiddleware:
    """Pure ASGI: each HTTP request's status, route, duration (a stream's until it ended) and
    sizes into /metrics' http_* metrics, as vLLM's instrumentator counts them."""

    def __init__(self, app, state: ServerState, routes: list):
        self.app, self.state, self.routes = app, state, routes

    def _handler(self, scope) -> str:
        for route in self.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] == Match.FULL:
                return route.path
        return "none"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or route_path(scope) in HTTP_UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        start, status, out_bytes = time.perf_counter(), [500], [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                out_bytes[0] = int(dict(message.get("headers", ())).get(b"content-length", 0) or 0)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            in_bytes = dict(scope["headers"]).get(b"content-length", b"0")
            self.state.metrics.record_http(scope["method"], status[0], self._handler(scope),
                                           time.perf_counter() - start,
                                           int(in_bytes) if in_bytes.isdigit() else 0, out_bytes[0])


class APIKeyMiddleware:
    """Pure ASGI (so streams pass through untouched): /v1/*, /v2/* and /inference/* need
    `Authorization: Bearer KEY` with one of the keys (vLLM's rule; a CORS preflight needs none)."""

    def __init__(self, app, api_keys: list[str], on_reject):
        self.app, self.keys, self.on_reject = app, [key.encode() for key in api_keys], on_reject

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "http" and route_path(scope).startswith(_GUARDED_PREFIXES)
        if not guarded or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        # every key compared (no early exit), each in constant time: the time taken tells nothing of a key
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        if scheme.lower() == b"bearer" and any(matches):
            return await self.app(scope, receive, send)
        self.on_reject(401)
        response = JSONResponse(error_body(401, "invalid or missing API key (send Authorization: "
                                                "Bearer <key>)"), status_code=401)
        await response(scope, receive, send)


class RequestIdHeaderMiddleware:
    """Pure ASGI: every answer carries X-Request-Id, the request's or a new uuid4 hex
    (--enable-request-id-headers, vLLM's)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.llm.start()
        try:
            yield
        finally:
            stop_interruptibly(state.llm.shutdown)

    docs = {"openapi_url": None, "docs_url": None, "redoc_url": None} if state.settings.disable_fastapi_docs else {}
    app = FastAPI(title="deepserve", version=__version__, lifespan=lifespan, **docs)
    app.root_path = state.settings.root_path or ""   # vLLM's way (FastAPI's argument is deprecated)
    app.state.deepserve = state
    if state.settings.enable_server_load_tracking:   # inside the key check: refused requests are no load
        app.add_middleware(LoadTrackingMiddleware, state=state)
    if state.settings.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=state.settings.api_keys,
                           on_reject=state.metrics.record_error)
    if state.settings.cors:  # preflights and refusals carry the CORS headers too (vLLM's defaults)
        app.add_middleware(CORSMiddleware, **state.settings.cors)
    if state.settings.enable_request_id_headers:   # outside the key check: a refusal carries it too
        app.add_middleware(RequestIdHeaderMiddleware)
    app.add_middleware(HTTPMetricsMiddleware, state=state, routes=app.router.routes)   # outermost: every answer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.record_error(exc.status)
        return error_response(exc)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError):
        # a route other than generation's waiting on the engine when a rank died (vLLM's
        # engine_error_handler: an answer, no traceback)
        return await _api_error(request, api_error_from(exc))

    @app.exception_handler(ClientDisconnected)
    async def _client_gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)   # nginx's "client closed request": never sent, only logged

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        state.metrics.record_error(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:  # /v1/embeddings, a typo: say what is served
            served = [f"{m} {r.path}" for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]
            message += f"; this server answers {', '.join(served)}"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        state.metrics.record_error(500)
        return error_response(internal_error(exc))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create_completion(request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(request, state)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await create_response(request, state)

    def over_state(handler):   # a route of Anthropic's Messages API (server/serving_anthropic.py)
        async def endpoint(request: Request):
            return await handler(request, state)
        return endpoint

    app.add_api_route("/v1/messages", over_state(create_message), methods=["POST"], name="messages")
    app.add_api_route("/v1/messages/count_tokens", over_state(count_tokens), methods=["POST"],
                      name="messages_count_tokens")

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request):
        return await retrieve_response(request, state, response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel(response_id: str):
        return await cancel_response(state, response_id)

    permission_ids = {name: f"modelperm-{uuid.uuid4().hex}" for name in state.settings.served_model_names}

    def model_card(name: str) -> dict:
        # vLLM's card, its one permission entry included (what its ModelPermission defaults say)
        permission = {"id": permission_ids[name], "object": "model_permission",
                      "created": state.settings.created, "allow_create_engine": False, "allow_sampling": True,
                      "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                      "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}
        return {"id": name, "object": "model", "created": state.settings.created, "owned_by": "deepserve",
                "root": state.settings.model_path, "parent": None, "max_model_len": state.llm.max_model_len,
                "permission": [permission]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in state.settings.served_model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):   # OpenAI's models.retrieve
        if not name:   # /v1/models/: the list, by the redirect vLLM's router answers with (it has no such route)
            return RedirectResponse(request.url.replace(path=request.url.path.rstrip("/")), status_code=307)
        return model_card(state.check_model(name))

    @app.get("/health")
    async def health():
        if not state.llm.is_running:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return Response(status_code=200)

    @app.get("/ping")
    @app.post("/ping")   # two routes (not one of two methods): each its own OpenAPI operation id
    async def ping():   # vLLM's (SageMaker's health check): /health
        return await health()

    @app.post("/invocations")
    async def invocations(request: Request):
        return await invoke(request, state)

    @app.post("/scale_elastic_ep")
    async def scale_elastic_ep(request: Request):
        return await scale_data_parallel(request, state)

    @app.post("/is_scaling_elastic_ep")
    async def is_scaling_elastic_ep():
        return {"is_scaling_elastic_ep": False}

    @app.get("/load")
    async def load():
        return {"server_load": state.server_load}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    if dev_mode():   # vLLM routes its development endpoints only then
        add_dev_routes(app, state)

    if getattr(state.llm, "profiler_config", None) is not None:   # vLLM routes them only then
        logger.warning("profiler %s configured: POST /start_profile and /stop_profile are served; "
                       "profiling is for development, not production", state.llm.profiler_config.profiler)

        @app.post("/start_profile")
        async def start_profile():
            await state.llm.start_profile()
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile():   # returns once every rank's trace is written
            await state.llm.stop_profile()
            return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_request(request, TokenizeRequest, state.settings.max_body_bytes)
        state.check_model(req.model)
        tok = _tokenizer(state)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:  # the chat fields would be ignored: refused by name
            chat_only = {"tools": req.tools, "chat_template": req.chat_template,
                         "chat_template_kwargs": req.chat_template_kwargs,
                         "continue_final_message": req.continue_final_message or None,
                         "add_generation_prompt": None if req.add_generation_prompt else False}
            given = next((name for name, value in chat_only.items() if value is not None), None)
            if given is not None:
                raise APIError(400, f"{given} goes with messages, not prompt", param=given)
        if req.messages is not None:
            _, ids = await render_messages(state, req.messages, req.tools, req.add_generation_prompt,
                                           req.chat_template_kwargs, add_special_tokens=bool(req.add_special_tokens),
                                           continue_final_message=req.continue_final_message,
                                           template=req.chat_template)
        else:
            ids = (await state.encode([req.prompt], req.add_special_tokens is not False))[0]
        body = {"count": len(ids), "max_model_len": state.llm.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tok.id_to_token(i) for i in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_request(request, DetokenizeRequest, state.settings.max_body_bytes)
        state.check_model(req.model)
        tok = _tokenizer(state)
        bad = next((t for t in req.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab_size})",
                           param="tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}  # as vLLM: a round trip keeps BOS

    if state.settings.enable_tokenizer_info_endpoint:   # vLLM routes it only then
        @app.get("/tokenizer_info")
        async def get_tokenizer_info():
            return tokenizer_info(_tokenizer(state))

    return app


# what vLLM's /invocations names when a body is neither (its request types, tried in this order)
_INVOCATION_TYPES = "['ChatCompletionRequest', 'CompletionRequest']"


async def invoke(request: Request, state: ServerState):
    """vLLM's SageMaker route: the body goes to chat completions where it has "messages", else to
    completions where it has "prompt" (vLLM's order: the first request type it validates as);
    the route's own answer, a stream included. Outside --api-key's prefixes, as vLLM's."""
    check_json_content_type(request)
    body = await read_body(request, state.settings.max_body_bytes)
    try:
        fields = json.loads(utf8_json(body))
    except json.JSONDecodeError as exc:
        raise APIError(400, f"JSON decode error: {exc}") from None
    if isinstance(fields, dict) and "messages" in fields:
        handler = create_chat_completion
    elif isinstance(fields, dict) and ("prompt" in fields or "prompt_embeds" in fields):
        handler = create_completion
    else:
        raise APIError(400, f"Cannot find suitable handler for request. Expected one of: {_INVOCATION_TYPES}")
    replayed = False

    async def receive():   # the body read above, then the connection's own messages (a disconnect)
        nonlocal replayed
        if replayed:
            return await request.receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await handler(Request(request.scope, receive), state)


async def scale_data_parallel(request: Request, state: ServerState) -> dict:
    """vLLM's POST /scale_elastic_ep, checked as vLLM checks it: a scale to the data parallel
    size the server runs is done at once (vLLM's answer); any other is a 400 (deepserve has no
    elastic EP: the size is set at start)."""
    try:
        fields = json.loads(utf8_json(await read_body(request, state.settings.max_body_bytes)))
    except json.JSONDecodeError:
        raise APIError(400, "Invalid JSON format") from None
    if not isinstance(fields, dict):
        raise APIError(400, "Invalid JSON format")
    size, drain_timeout = fields.get("new_data_parallel_size"), fields.get("drain_timeout", 120)
    if size is None:
        raise APIError(400, "new_data_parallel_size is required", param="new_data_parallel_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise APIError(400, "new_data_parallel_size must be a positive integer", param="new_data_parallel_size")
    if not isinstance(drain_timeout, int) or isinstance(drain_timeout, bool) or drain_timeout <= 0:
        raise APIError(400, "drain_timeout must be a positive integer", param="drain_timeout")
    current = state.llm.engine.config.parallel.data_parallel_size
    if size != current:
        raise APIError(400, f"new_data_parallel_size {size} is not supported: deepserve has no elastic EP, so a "
                            f"running server keeps its data parallel size ({current}); restart it with "
                            f"--data-parallel-size {size}", param="new_data_parallel_size")
    return {"message": f"Scaled to {size} data parallel engines"}


def _plain(value: Any) -> Any:
    """A tokenizer_config.json value with each AddedToken object ({"__type": "AddedToken",
    "content": ...}) as its text, as vLLM's JSON of transformers' init_kwargs gives it."""
    if isinstance(value, dict):
        if value.get("__type") == "AddedToken":
            return value.get("content")
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def tokenizer_info(tok) -> dict:
    """GET /tokenizer_info (vLLM's): tokenizer_config.json's fields but file paths, special tokens
    as text, `tokenizer_class`, and the chat template this server renders. lm-eval's remote
    tokenizer needs `eos_token`, so one the config leaves out is the tokenizer's own."""
    path = Path(tok.folder) / "tokenizer_config.json"
    info = _plain(json.loads(path.read_text())) if path.is_file() else {}
    for key in ("vocab_file", "merges_file", "chat_template"):
        info.pop(key, None)
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if info.get("bos_token") is None and tok.bos_token_id is not None:
        info["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if info.get("eos_token") is None and tok.eos_token_id is not None:
        info["eos_token"] = tok.id_to_token(tok.eos_token_id)
    if tok.chat_template:
        info["chat_template"] = tok.chat_template
    return info


def _tokenizer(state: ServerState):
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return state.tokenizer
