"""Start the OpenAI-compatible server: build the engine, the app, and run uvicorn until
SIGINT/SIGTERM.

The engine core (scheduler, KV pool, sampler, detokenizer) runs in a process of its own, as
in vLLM, so HTTP, JSON and streaming never hold the GIL that the step loop needs: this process
is a front end that sends requests to it and rebuilds outputs from its per-step deltas over
ZeroMQ (engine/dp_engine.py). DEEPSERVE_ENGINE_CORE_PROCESS=0 keeps the engine in a thread of
this process instead; --distributed-executor-backend ray always does.

On a signal, in-flight requests are ended at once with an error (streams get an error event
and `[DONE]`; with --shutdown-timeout N, vLLM's drain, new requests get a 503 and those in
flight have up to N seconds to finish first; a second signal ends the wait), the listener
closes, the engine thread stops and the engine-core processes with it: the process exits
within a few seconds and leaves nothing behind. When the socket is
bound the server prints one line with its URL (`--port 0` picks a free port and the line
tells which). --api-server-count N > 1: server/api_servers.py.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import sys
import time
import urllib.parse
from typing import Optional

import uvicorn

from deepserve.config import EngineArgs, served_names
from deepserve.engine import llm_inputs
from deepserve.engine.async_llm import AsyncLLM
from deepserve.engine.fork_server import freeze_heap
from deepserve.engine.llm_engine import LLMEngine, engine_core_apart
from deepserve.engine.tokenizer import template_file
from deepserve.log import FORMAT as LOG_FORMAT
from deepserve.log import for_spawned_processes
from deepserve.server.app import build_app
from deepserve.server.args import STORE_ENV, ServerArgs
from deepserve.server.fingerprint import system_fingerprint
from deepserve.server.metrics import ServerMetrics, cache_info_labels
from deepserve.engine.thinking_budget import delimiter_token_ids, reasoning_delimiters
from deepserve.server.reasoning import PARSERS, check_parser_tokens
from deepserve.server.request_log import RequestLogger, StatsLogger, stats_interval
from deepserve.server.serving_chat import check_template_kwargs
from deepserve.server.serving_common import ServerSettings, ServerState
from deepserve.server.stopping import stop_interruptibly, workers_end_with_a_signal
from deepserve.server.tool_parsers import TOOL_PARSERS

logger = logging.getLogger("deepserve")


def read_chat_template(template: str) -> str:
    """--chat-template: a file's text, or the template text itself."""
    path = template_file(template)
    if path is not None:
        return path.read_text()
    if "{" not in template:
        raise FileNotFoundError(f"chat template file {template} not found")
    return template


def load_chat_template(engine: LLMEngine, template: Optional[str]) -> None:
    if template is None:
        return
    if engine.tokenizer is None:
        raise ValueError("--chat-template needs a model with a tokenizer")
    engine.tokenizer.chat_template = read_chat_template(template)


def check_server_args(engine_args: EngineArgs, server: ServerArgs) -> None:
    """What the server's options need that is known before the engine starts (a --chat-template
    path that is no file fails here, not after the model has loaded)."""
    if engine_args.api_server_count > 1 and server.responses_store_size():
        raise ValueError(f"the Responses API's store (--enable-responses-api-store, {STORE_ENV}=1) keeps responses "
                         "in one API server process's memory: it needs --api-server-count 1, got "
                         f"{engine_args.api_server_count}")
    if server.uds and engine_args.api_server_count > 1:
        raise ValueError(f"--uds serves one API server on its socket: it needs --api-server-count 1, got "
                         f"{engine_args.api_server_count}")
    if server.chat_template is not None:
        read_chat_template(server.chat_template)


class _Server(uvicorn.Server):
    """uvicorn, plus a ready line with the bound URL and an engine drain on the first signal."""

    def __init__(self, config: uvicorn.Config, state: ServerState, on_ready=None,
                 stats: Optional[tuple[StatsLogger, float]] = None, shutdown_timeout: float = 0.0):
        super().__init__(config)
        self.state = state
        self.on_ready = on_ready
        self.stats = stats   # the periodic stats line's logger and interval (None: --disable-log-stats)
        self.shutdown_timeout = shutdown_timeout   # how long a signal lets the requests in flight finish
        self.draining = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def startup(self, sockets=None) -> None:
        freeze_heap()   # what the engine's start made stays, as in the fork server (vLLM's freeze_gc_heap)
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        name = self.servers[0].sockets[0].getsockname()
        scheme = "https" if self.config.is_ssl else "http"
        url = f"{scheme}+unix:{name}" if isinstance(name, str) else f"{scheme}://{name[0]}:{name[1]}"
        if self.on_ready is not None:  # one of several API servers: the launcher announces them
            self.on_ready(url)
        else:
            names = ", ".join(self.state.settings.served_model_names)
            print(f"deepserve: serving {names} at {url}/v1 (Ctrl-C to stop)", flush=True)
        loop = self.loop = asyncio.get_running_loop()
        loop.create_task(self._watch_engine())
        if self.stats is not None:
            stats, interval = self.stats
            loop.create_task(stats.run(interval, lambda: not self.should_exit))

    async def _watch_engine(self) -> None:
        """Exit (code 1) soon after a worker process dies; /health says 503 meanwhile."""
        while not self.should_exit:
            reason = self.state.llm.fatal_error
            if reason:
                if self.on_ready is None:   # else one of several API servers, whose launcher names it
                    print(f"deepserve serve: error: {reason}; shutting down", file=sys.stderr, flush=True)
                self.fatal = reason
                await asyncio.sleep(1.0)  # let /health report 503 to anyone polling
                self.state.llm.begin_shutdown(reason)
                self.should_exit = True
                return
            await asyncio.sleep(0.5)

    def handle_exit(self, sig, frame) -> None:
        if self.shutdown_timeout > 0 and not self.draining and not self.should_exit and self.loop is not None:
            self.draining = True   # vLLM's drain: new requests refused, those in flight go on
            self.state.llm.stop_accepting()
            logger.info("%s: draining %d requests in flight (--shutdown-timeout %s s)",
                        signal.Signals(sig).name, self.state.llm.num_in_flight, self.shutdown_timeout)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(sig, frame)))
            return
        if not self.should_exit:
            self.state.llm.begin_shutdown()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown, so the process dies of SIGTERM (-15)
        # even when everything closed cleanly; a requested stop that completes exits 0 instead
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def _drain(self, sig, frame) -> None:
        """Stop once the requests in flight have ended, or at --shutdown-timeout (the rest then
        end with an error); a second signal meanwhile stops at once."""
        deadline = time.monotonic() + self.shutdown_timeout
        while self.state.llm.num_in_flight and time.monotonic() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if self.state.llm.num_in_flight:
            logger.warning("%d requests still in flight at shutdown: ended with an error", self.state.llm.num_in_flight)
        self.shutdown_timeout = 0.0   # the stop that follows ends what is left
        if not self.should_exit:
            self.handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        if self.force_exit and not self.lifespan.shutdown_event.is_set():
            # a second signal during the drain (Ctrl-C pressed twice; `timeout -s INT` signals
            # both the process and its group) makes uvicorn stop waiting for connections and
            # skip the app's lifespan shutdown too, whose task asyncio then cancels with a
            # CancelledError traceback: run it anyway (it stops the engine, within seconds).
            # A signal that comes while uvicorn runs it finds it done here.
            await self.lifespan.shutdown()


def generation_defaults(generation_config: str, model: str, overrides: Optional[dict] = None) -> dict:
    """Sampling defaults for requests that leave fields out: `auto` reads the model folder's
    generation_config.json, `vllm` uses none (vLLM's neutral defaults), anything else is a
    folder holding a generation_config.json (the offline LLM's reading of it); `overrides`
    (--override-generation-config) are set over what it holds."""
    return llm_inputs.generation_defaults(generation_config, model, overrides, flag="--generation-config")


def build_state(engine_args: EngineArgs, server: ServerArgs, engine: Optional[LLMEngine] = None,
                api_server: Optional[int] = None) -> ServerState:
    """The server's state; `engine`: one already connected to its cores (API server number
    `api_server` of several), else one is started from `engine_args`."""
    if server.reasoning_parser is not None and server.reasoning_parser not in PARSERS:
        raise ValueError(f"unknown --reasoning-parser {server.reasoning_parser!r}; choose from {', '.join(PARSERS)}")
    if server.tool_call_parser is not None and server.tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"unknown --tool-call-parser {server.tool_call_parser!r}; choose from "
                         f"{', '.join(TOOL_PARSERS)}")
    defaults = generation_defaults(server.generation_config, str(engine_args.model), server.override_generation_config)
    if engine is None:
        from deepserve.engine.dp_engine import DataParallelEngine
        apart = engine_core_apart(engine_args, default=True)
        engine = DataParallelEngine(engine_args) if apart else LLMEngine(engine_args)
    engine.executor.log_failure = False   # a dead rank is named once, by _Server._watch_engine (or the launcher)
    load_chat_template(engine, server.chat_template)
    check_template_kwargs(engine.tokenizer, server.default_chat_template_kwargs, "--default-chat-template-kwargs")
    check_parser_tokens(server.reasoning_parser, engine.tokenizer, str(engine_args.model))
    settings = ServerSettings(served_model_names=served_names(engine_args), model_path=str(engine_args.model),
                              api_keys=server.api_keys(), root_path=server.root_path,
                              disable_fastapi_docs=bool(server.disable_fastapi_docs),
                              reasoning_parser=server.reasoning_parser,
                              reasoning_token_ids=delimiter_token_ids(
                                  reasoning_delimiters(server.reasoning_parser, server.reasoning_config),
                                  engine.tokenizer),
                              max_body_bytes=int(server.max_body_bytes), created=int(time.time()),
                              generation_defaults=defaults, tool_call_parser=server.tool_call_parser,
                              enable_auto_tool_choice=bool(server.enable_auto_tool_choice),
                              exclude_tools_when_tool_choice_none=bool(server.exclude_tools_when_tool_choice_none),
                              default_chat_template_kwargs=dict(server.default_chat_template_kwargs or {}),
                              chat_template_content_format=server.chat_template_content_format,
                              trust_request_chat_template=bool(server.trust_request_chat_template),
                              grammar_in_reasoning=server.grammar_in_reasoning(),
                              return_tokens_as_token_ids=bool(server.return_tokens_as_token_ids),
                              response_role=server.response_role, stream_interval=int(server.stream_interval),
                              max_logprobs=int(server.max_logprobs), scheduling_policy=engine_args.scheduling_policy,
                              max_n=max(128, engine.config.scheduler.max_num_seqs),
                              cors=server.cors(),
                              enable_prompt_tokens_details=bool(server.enable_prompt_tokens_details),
                              enable_force_include_usage=bool(server.enable_force_include_usage),
                              enable_server_load_tracking=bool(server.enable_server_load_tracking),
                              enable_tokenizer_info_endpoint=bool(server.enable_tokenizer_info_endpoint),
                              enable_request_id_headers=bool(server.enable_request_id_headers),
                              system_fingerprint=system_fingerprint(engine.config, server.fingerprint_mode,
                                                                    server.fingerprint_value),
                              responses_store_size=server.responses_store_size(),
                              prefix_cache_block_size=engine.config.cache.block_size
                              if engine.config.cache.enable_prefix_caching else None)
    llm = AsyncLLM(engine)
    request_logger = RequestLogger(server.max_log_len, server.enable_log_outputs) if server.enable_log_requests else None
    metrics = ServerMetrics(settings.served_model_names[0], lambda: llm.rank_snapshots, api_server, llm.max_model_len,
                            cache_info_labels(engine.config.cache), engine.config.parallel.data_parallel_size)
    llm.listener = metrics
    return ServerState(llm=llm, settings=settings, metrics=metrics, request_logger=request_logger)


def run_server(engine_args: EngineArgs, server: Optional[ServerArgs] = None, sock=None, **options) -> int:
    """Serve until interrupted: `server` (default ServerArgs()) with `options` replacing its
    fields, on `sock` where given (bound to its address before the engine starts); with
    --api-server-count N > 1, as N API server processes on one listening socket
    (server/api_servers.py)."""
    server = dataclasses.replace(server or ServerArgs(), **options)
    check_server_args(engine_args, server)
    if engine_args.api_server_count > 1:
        from deepserve.server.api_servers import run_api_servers
        return run_api_servers(engine_args, server)
    set_up_logging(server.log_level)
    with for_spawned_processes(server.log_level), workers_end_with_a_signal():  # cores log at this level too
        state = build_state(engine_args, server)
    if sock is not None:   # held exclusively during the load; listening past old connections' TIME_WAIT needs it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return serve_app(state, server, sock=sock)


class AccessLogFilter(logging.Filter):
    """Drops uvicorn's access lines for the given paths (vLLM's --disable-access-log-for-endpoints);
    uvicorn logs (client, method, path with query, HTTP version, status) as the record's args."""

    def __init__(self, paths: str):
        super().__init__()
        self.paths = frozenset(p.strip() for p in paths.split(",") if p.strip())

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return urllib.parse.urlsplit(args[2]).path not in self.paths
        return True


def set_up_logging(log_level: str) -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format=LOG_FORMAT, stream=sys.stderr)


def serve_app(state: ServerState, server: ServerArgs, sock=None, on_ready=None, log_stats: bool = True) -> int:
    """Run uvicorn on `state` until a signal or a dead engine; `sock`: an already bound
    listening socket (shared by several API server processes), else server.host:port is bound.
    `log_stats`: this process writes the periodic stats line (one API server of several does)."""
    app = build_app(state)
    config = uvicorn.Config(app, host=server.host, port=int(server.port),
                            log_level=server.uvicorn_log_level or server.log_level,
                            access_log=not server.disable_uvicorn_access_log, timeout_graceful_shutdown=3,
                            lifespan="on", ssl_keyfile=server.ssl_keyfile, ssl_certfile=server.ssl_certfile,
                            ssl_ca_certs=server.ssl_ca_certs, ssl_cert_reqs=int(server.ssl_cert_reqs),
                            h11_max_incomplete_event_size=int(server.h11_max_incomplete_event_size),
                            **({"log_config": server.log_config()} if server.log_config_file else {}),
                            **({"ssl_ciphers": server.ssl_ciphers} if server.ssl_ciphers else {}))
    access_filter = AccessLogFilter(server.disable_access_log_for_endpoints or "")
    logging.getLogger("uvicorn.access").addFilter(access_filter)
    stats = None
    if log_stats and not server.disable_log_stats:
        engines = state.llm.engine.config.parallel.data_parallel_size
        stats = (StatsLogger(lambda: state.llm.snapshot, engines), stats_interval())
    http = _Server(config, state, on_ready, stats, float(server.shutdown_timeout))
    try:
        http.run(sockets=[sock] if sock is not None else None)
    finally:
        logging.getLogger("uvicorn.access").removeFilter(access_filter)
    stop_interruptibly(state.llm.shutdown)  # done by the app's lifespan unless uvicorn failed to start
    if getattr(http, "fatal", None):
        return 1
    return 0 if http.started else 1
