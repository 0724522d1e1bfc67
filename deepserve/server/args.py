"""`ServerArgs`: the API server's options, one dataclass from which `deepserve serve`'s server
flags (`--host`, `--port`, ... with vLLM's names), the keys a YAML deployment file may set
beside the engine args (server/config_file.py), and their defaults all come.

A field's docstring is its `--help` text; `choices` in a field's metadata limit its values on
the command line and in a YAML file alike (`__post_init__` checks what argparse did not see),
`metavar` names its value in `--help`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from deepserve.config import add_dataclass_args
from deepserve.engine.llm_inputs import structured_outputs_parser
from deepserve.engine.thinking_budget import reasoning_delimiters
from deepserve.server.fingerprint import FINGERPRINT_MODES
from deepserve.server.request_log import stats_interval
from deepserve.server.tool_parsers import TOOL_PARSERS

LOG_LEVELS = ("debug", "info", "warning", "error")
CONTENT_FORMATS = ("auto", "string", "openai")   # vLLM's --chat-template-content-format values
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"   # vLLM's switch for the Responses API's store
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"   # vLLM's switch for its development endpoints
API_KEY_ENV = "VLLM_API_KEY"   # vLLM's API key where --api-key is not given


def dev_mode() -> bool:
    """VLLM_SERVER_DEV_MODE=1: the server also answers vLLM's development endpoints that
    deepserve has (POST /reset_prefix_cache, GET /is_sleeping, GET /server_info)."""
    env = os.environ.get(DEV_MODE_ENV, "0").strip() or "0"
    if env not in ("0", "1"):
        raise ValueError(f"{DEV_MODE_ENV} must be 0 or 1, got {env!r}")
    return env == "1"


@dataclass
class ServerArgs:
    """Options of the OpenAI-compatible HTTP server (the engine's are EngineArgs)."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port (0 picks a free one)."""
    uds: Optional[str] = None
    """vLLM's: listen on this unix socket path instead of --host / --port."""
    api_key: Optional[Union[str, list]] = field(default=None, metadata={"nargs": "+"})
    """Require `Authorization: Bearer KEY` (any of the keys given) on /v1/*, /v2/* and
    /inference/* (vLLM's); without it, vLLM's VLLM_API_KEY environment variable's key."""
    ssl_keyfile: Optional[str] = None
    """vLLM's: serve HTTPS with this private key (PEM file), beside --ssl-certfile."""
    ssl_certfile: Optional[str] = None
    """vLLM's: the certificate (PEM file, chain included) served with --ssl-keyfile."""
    ssl_ca_certs: Optional[str] = None
    """vLLM's: CA certificates (PEM file) that client certificates are checked against."""
    ssl_cert_reqs: int = 0
    """vLLM's: client certificates (Python's ssl constants): 0 none asked, 1 optional, 2 required."""
    ssl_ciphers: Optional[str] = None
    """vLLM's: the cipher suites for TLS 1.2 and below, in OpenSSL's list form."""
    root_path: Optional[str] = None
    """vLLM's: the path prefix a proxy serves this server under (/v1/models answers at
    ROOT_PATH/v1/models too)."""
    disable_fastapi_docs: bool = False
    """vLLM's: no OpenAPI schema, Swagger UI or ReDoc (/openapi.json, /docs, /redoc answer 404)."""
    reasoning_parser: Optional[str] = field(default=None, metadata={"choices": ("deepseek_r1",)})
    """Split <think> reasoning into reasoning_content (and reasoning)."""
    reasoning_config: Optional[dict] = field(default=None, metadata={"metavar": "JSON"})
    """vLLM's: where the reasoning that a request's thinking_token_budget counts starts and ends,
    '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}' (or "reasoning_parser");
    default: --reasoning-parser's tags."""
    enable_reasoning: bool = False
    """vLLM <= 0.8's switch for --reasoning-parser: accepted (reasoning is split whenever a parser
    is given), an error without one."""
    generation_config: str = field(default="auto", metadata={"metavar": "auto|vllm|FOLDER"})
    """Request defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) from
    generation_config.json: auto reads the model folder's (R1: 0.6 / 0.95), vllm ignores it, or a
    folder holding one."""
    structured_outputs_config: Optional[dict] = field(default=None, metadata={"metavar": "JSON"})
    """vLLM's, for deepserve's one grammar engine, xgrammar: backend (auto | xgrammar),
    disable_any_whitespace and disable_additional_properties (what its JSON grammars do anyway:
    compact JSON, only the keys a schema names), reasoning_parser (as --reasoning-parser),
    enable_in_reasoning (true: a grammar holds from the first token, reasoning included, instead of
    from </think>); e.g. '{"backend": "xgrammar"}' or --structured-outputs-config.backend xgrammar."""
    override_generation_config: Optional[dict] = field(default=None, metadata={"metavar": "JSON"})
    """vLLM's: request defaults set over --generation-config's (with vllm: the only ones), e.g.
    '{"temperature": 0.5, "max_new_tokens": 1024}' (keys as generation_config.json's)."""
    response_role: str = "assistant"
    """vLLM's: the role a chat reply names when the request adds a generation prompt (otherwise
    the last message's role, as vLLM's)."""
    stream_interval: int = 1
    """vLLM's: a stream sends its first token, then its tokens in groups of this many, then the
    rest as it ends (1: each token as it comes; more: fewer, larger chunks)."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: logprobs name tokens `token_id:N` for requests that do not set
    return_tokens_as_token_ids themselves."""
    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (tool_choice auto); needs --tool-call-parser."""
    exclude_tools_when_tool_choice_none: bool = False
    """vLLM's: a request with tool_choice none renders its prompt without the tools."""
    tool_call_parser: Optional[str] = field(default=None, metadata={"choices": TOOL_PARSERS})
    """Parse the model's tool-call tokens into tool_calls (R1 / V3: deepseek_v3; V3.1: deepseek_v31;
    vLLM's hermes and llama3_json for R1-Distill-Qwen and -Llama, with a --chat-template that lists
    the tools)."""
    max_logprobs: int = 20
    """Most logprobs / top_logprobs / prompt_logprobs a request may ask for (-1: no cap, the
    whole vocabulary, as vLLM's)."""
    enable_prompt_tokens_details: bool = False
    """vLLM's: chat completions' and completions' usage gives prompt_tokens_details.cached_tokens,
    the prompt tokens found in the prefix cache (null without this flag, as vLLM)."""
    enable_force_include_usage: bool = False
    """vLLM's: every stream carries usage, on each chunk and in a last chunk, as if each request
    sent stream_options include_usage and continuous_usage_stats."""
    shutdown_timeout: int = 0
    """vLLM's: seconds a SIGTERM / SIGINT lets the requests in flight finish (new ones get a 503)
    before the rest are ended with an error and the server exits; 0 ends them at once."""
    enable_server_load_tracking: bool = False
    """vLLM's: GET /load counts the generation requests in flight ({"server_load": N}; 0 without
    this flag), each API server process its own."""
    enable_tokenizer_info_endpoint: bool = False
    """vLLM's: GET /tokenizer_info answers the tokenizer's configuration (tokenizer_config.json's
    fields, special tokens as their text, the chat template served), which lm-evaluation-harness's
    remote tokenizer reads; it shows the chat template to anyone who can reach the server."""
    enable_request_id_headers: bool = False
    """vLLM's: every answer carries an X-Request-Id header, the request's own or a new uuid4 hex
    (a request's X-Request-Id names its completion or chat response with or without this flag)."""
    fingerprint_mode: str = field(default="full", metadata={"choices": FINGERPRINT_MODES})
    """vLLM's: the system_fingerprint of chat completions and completions (a stream's last chunk):
    full `deepserve-VERSION[-tpN][-ppN][-dpN][-ep]-HASH8` (HASH8: of the model, dtype, context
    length, quantization, KV cache dtype, parallel layout and speculative config), hash
    `deepserve-VERSION-HASH8`, custom (--fingerprint-value's text) or none (null)."""
    fingerprint_value: Optional[str] = None
    """vLLM's: the system_fingerprint sent with --fingerprint-mode custom."""
    enable_responses_api_store: bool = False
    """Keep /v1/responses responses in this process's memory (OpenAI's store: GET
    /v1/responses/{id}, previous_response_id, background and cancel); vLLM's
    VLLM_ENABLE_RESPONSES_API_STORE=1 does the same. Needs --api-server-count 1."""
    responses_store_max_size: int = 1000
    """Most responses the store keeps; past it the oldest finished one is dropped."""
    chat_template: Optional[str] = None
    """Chat template file (or Jinja text) replacing the tokenizer's."""
    default_chat_template_kwargs: Optional[dict] = field(default=None, metadata={"metavar": "JSON"})
    """vLLM's: chat template kwargs every chat request gets, under its own chat_template_kwargs
    (e.g. '{"enable_thinking": false}' for a template that reads it)."""
    chat_template_content_format: str = field(default="auto", metadata={"choices": CONTENT_FORMATS})
    """vLLM's: how a message's content reaches the chat template: string (its text, parts joined by
    newlines), openai (a list of {"type": "text", "text": ...} parts, a plain string as one part;
    tool results stay text) or auto (openai where the template loops over a message's content,
    string otherwise)."""
    trust_request_chat_template: bool = False
    """vLLM's: a chat or /tokenize request may bring its own Jinja template (chat_template, or
    chat_template_kwargs' chat_template), rendered in the sandbox; without this flag such a
    request gets a 400."""
    h11_max_incomplete_event_size: int = 4 * 1024 * 1024
    """vLLM's: the largest request head (request line and headers) in bytes; vLLM's 4 MiB, where
    uvicorn's own is 16 KiB."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    log_level: str = field(default="info", metadata={"choices": LOG_LEVELS})
    """Log level."""
    uvicorn_log_level: Optional[str] = field(default=None, metadata={"choices": UVICORN_LOG_LEVELS})
    """vLLM's: uvicorn's log level (default: --log-level)."""
    log_config_file: Optional[str] = None
    """vLLM's: a logging configuration, JSON in Python's logging.config.dictConfig schema (loggers
    uvicorn, uvicorn.access, deepserve, ...), applied as the server starts."""
    disable_uvicorn_access_log: bool = False
    """vLLM's: no uvicorn access log line per HTTP request (`INFO:     127.0.0.1:PORT - "POST
    /v1/completions HTTP/1.1" 200 OK`, on stdout at uvicorn's INFO level)."""
    disable_access_log_for_endpoints: Optional[str] = None
    """vLLM's: comma-separated paths (e.g. "/health,/metrics") whose requests write no access
    log line; the others still do."""
    enable_log_requests: bool = False
    """vLLM's: log each generation request as it arrives, its id and sampling parameters at INFO,
    its prompt and token ids at DEBUG (--log-level debug)."""
    disable_log_requests: bool = False
    """vLLM <= 0.10's: no request log lines (the default; --enable-log-requests turns them on)."""
    max_log_len: Optional[int] = None
    """vLLM's: most prompt characters / token ids (and output characters / ids) a request log
    line shows (default: all)."""
    enable_log_outputs: bool = False
    """vLLM's: log each request's output text, token ids and finish reason as it ends; needs
    --enable-log-requests."""
    disable_log_stats: bool = False
    """vLLM's: no periodic stats line (every VLLM_LOG_STATS_INTERVAL seconds, 10 by default:
    prompt and generation throughput, running and waiting requests, KV cache usage, prefix-cache
    hit rate; at DEBUG while idle)."""
    allowed_origins: Union[str, list] = '["*"]'
    """Origins a browser may call the API from (CORS), a JSON list as vLLM's."""
    allow_credentials: bool = False
    """CORS: let browsers send credentials (cookies, Authorization) cross-origin."""
    allowed_methods: Union[str, list] = '["*"]'
    """CORS: HTTP methods allowed cross-origin, a JSON list."""
    allowed_headers: Union[str, list] = '["*"]'
    """CORS: request headers allowed cross-origin, a JSON list."""

    def __post_init__(self) -> None:
        for name in ("reasoning_config", "default_chat_template_kwargs", "structured_outputs_config",
                     "override_generation_config"):
            if isinstance(getattr(self, name), str):   # a YAML file's JSON text
                try:
                    setattr(self, name, json.loads(getattr(self, name)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--{name.replace('_', '-')} is not valid JSON: {exc}") from None
        self.check_structured_outputs_config()
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(self.api_key, str):   # a YAML file's one key
            self.api_key = [self.api_key]
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if int(self.max_logprobs) < -1:
            raise ValueError(f"max_logprobs must be >= 0, or -1 for no cap, got {self.max_logprobs}")
        if int(self.responses_store_max_size) < 1:
            raise ValueError(f"responses_store_max_size must be >= 1, got {self.responses_store_max_size}")
        self.check_ssl()
        self.log_config()
        if int(self.h11_max_incomplete_event_size) < 1:
            raise ValueError(f"h11_max_incomplete_event_size must be >= 1, got {self.h11_max_incomplete_event_size}")
        if int(self.stream_interval) < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if int(self.shutdown_timeout) < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if int(self.max_body_bytes) < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for name in ("default_chat_template_kwargs", "override_generation_config"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(self, name)!r}")
        reasoning_delimiters(self.reasoning_parser, self.reasoning_config)
        self.responses_store_size()   # a bad VLLM_ENABLE_RESPONSES_API_STORE is an error before the model loads
        dev_mode()                    # and so is a bad VLLM_SERVER_DEV_MODE
        if not self.disable_log_stats:
            stats_interval()          # and a VLLM_LOG_STATS_INTERVAL that is no number
        if self.max_log_len is not None and int(self.max_log_len) < 0:
            raise ValueError(f"max_log_len must be >= 0, got {self.max_log_len}")
        if self.enable_log_requests and self.disable_log_requests:
            raise ValueError("--enable-log-requests and --disable-log-requests contradict each other: give one")
        if self.enable_log_outputs and not self.enable_log_requests:
            raise ValueError("--enable-log-outputs needs --enable-log-requests (as in vLLM)")
        if self.enable_reasoning and not self.reasoning_parser:
            raise ValueError("--enable-reasoning needs --reasoning-parser deepseek_r1 (as in vLLM)")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (deepseek_v3 for R1)")
        self.cors()

    def check_structured_outputs_config(self) -> None:
        """--structured-outputs-config's keys: the values xgrammar serves pass, its reasoning_parser
        sets --reasoning-parser (the same parser where both are given), the rest are refused by name."""
        self.reasoning_parser = structured_outputs_parser(self.structured_outputs_config, self.reasoning_parser,
                                                          "--structured-outputs-config", "--reasoning-parser")

    def log_config(self) -> Optional[dict]:
        """--log-config-file's configuration (None without one); ValueError for a file that is
        missing or holds no JSON object."""
        if not self.log_config_file:
            return None
        try:
            with open(self.log_config_file) as f:
                config = json.load(f)
        except OSError as exc:
            raise ValueError(f"--log-config-file {self.log_config_file}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"--log-config-file {self.log_config_file}: not JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ValueError(f"--log-config-file {self.log_config_file}: expected a JSON object (logging's "
                             f"dictConfig schema), got {type(config).__name__}")
        return config

    def check_ssl(self) -> None:
        """The TLS flags, checked as the server would load them: one line here instead of a
        traceback after the model loads."""
        if int(self.ssl_cert_reqs) not in (0, 1, 2):
            raise ValueError(f"--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), "
                             f"got {self.ssl_cert_reqs}")
        if not (self.ssl_keyfile or self.ssl_certfile):
            if self.ssl_ca_certs or self.ssl_ciphers or int(self.ssl_cert_reqs):
                raise ValueError("--ssl-ca-certs, --ssl-cert-reqs and --ssl-ciphers need --ssl-keyfile and "
                                 "--ssl-certfile")
            return
        if not (self.ssl_keyfile and self.ssl_certfile):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together (the key and its certificate)")
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            if self.ssl_ca_certs:
                context.load_verify_locations(self.ssl_ca_certs)
            if self.ssl_ciphers:
                context.set_ciphers(self.ssl_ciphers)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ssl-keyfile {self.ssl_keyfile} / --ssl-certfile {self.ssl_certfile}"
                             f"{f' / --ssl-ca-certs {self.ssl_ca_certs}' if self.ssl_ca_certs else ''}: "
                             f"{exc.strerror or exc}") from None

    def grammar_in_reasoning(self) -> bool:
        """--structured-outputs-config enable_in_reasoning: grammars hold over the reasoning too."""
        return bool((self.structured_outputs_config or {}).get("enable_in_reasoning"))

    def api_keys(self) -> list[str]:
        """The keys a request may bear: --api-key's, else VLLM_API_KEY's (vLLM's rule); none: no check."""
        return [key for key in (self.api_key or [os.environ.get(API_KEY_ENV)]) if key]

    def responses_store_size(self) -> int:
        """How many responses /v1/responses keeps (0: none), from --enable-responses-api-store
        or vLLM's VLLM_ENABLE_RESPONSES_API_STORE (0 or 1)."""
        env = os.environ.get(STORE_ENV, "0").strip() or "0"
        if env not in ("0", "1"):
            raise ValueError(f"{STORE_ENV} must be 0 or 1, got {env!r}")
        return int(self.responses_store_max_size) if self.enable_responses_api_store or env == "1" else 0

    def cors(self) -> dict:
        """Starlette CORSMiddleware's arguments; ValueError naming a flag that is no JSON list of strings."""
        out: dict = {"allow_credentials": bool(self.allow_credentials)}
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            value = getattr(self, name)
            try:
                items = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError:
                items = None
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ValueError(f"--{name.replace('_', '-')} must be a JSON list of strings, got {value!r}")
            out[name.replace("allowed_", "allow_")] = items
        return out

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names: the YAML keys a deployment file may set beside the engine args."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One `--flag` per field; only flags actually given land in the namespace (so they
        override a YAML file's values, and the file's override the defaults)."""
        add_dataclass_args(parser, cls)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> dict:
        """The options given on the command line, by name."""
        return {name: getattr(args, name) for name in cls.keys() if hasattr(args, name)}
