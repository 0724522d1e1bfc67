"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status a
client expects (400 bad values or JSON, 401 bad key, 404 unknown model, 413 body too big,
503 queue full with Retry-After, 500 engine failure). `code` is that status as a number, as
vLLM's ErrorInfo gives it (the openai SDK's APIStatusError.code).

Handlers raise `APIError`; the app turns it into the JSON body. A streaming response that
fails after its first chunk cannot change its status, so it sends the same body as one SSE
event instead (`sse_error`).
"""
from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Optional

from fastapi.responses import JSONResponse
from pydantic import ValidationError

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, HTTPStatus(status).phrase),
                      "param": param, "code": status}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# what the text of a failure of the server's own may tell of its insides (vLLM strips these from
# what it sends too): object addresses, a traceback's source lines, absolute file paths
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")
_SOURCE_LINE = re.compile(r'\n?[ \t]*File "[^"]*", line \d+[^\n]*(\n[ \t]+[^\n]*)?')
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(?:/[\w.\-]+){2,}")


def internal_error(exc: BaseException) -> APIError:
    """A 500 for an unexpected exception (a bug, not the request's fault): its type and text, less
    addresses, source lines and file paths."""
    text = _ADDRESS.sub(">", f"{type(exc).__name__}: {exc}")
    return APIError(500, _ABSOLUTE_PATH.sub("<path>", _SOURCE_LINE.sub("", text)).strip())


def sse_error(exc: APIError) -> str:
    return f"data: {json.dumps(exc.body())}\n\n"


# the shapes a union-typed field takes, for its error message
_UNIONS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "tool_choice": '"none", "auto", "required" or {"type": "function", "function": {"name": NAME}}',
    "stop": "a string or a list of strings",
}


# the JSON parser's words for a \ud800-\udfff escape without its other half: Python's json
# takes such a string, and vLLM's tokenizer then refuses it with a 400 that names no cause
_LONE_SURROGATE = re.compile(r"Invalid JSON: (?:unexpected end of hex escape|lone leading surrogate in hex escape)"
                             r"( at line \d+ column \d+)")


def from_validation_error(exc: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first bad field (or malformed JSON)."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        lone = _LONE_SURROGATE.fullmatch(first["msg"])
        if lone:
            return APIError(400, "malformed JSON body: a \\u escape of half a UTF-16 surrogate pair (\\ud800 to "
                                 f"\\udfff) without its other half encodes no Unicode character{lone.group(1)}")
        return APIError(400, f"malformed JSON body: {first['msg']}")
    loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    param = loc[0] if loc else None
    given = first.get("input")
    if param in _UNIONS:  # pydantic's message names one member of the union: it would mislead
        return APIError(400, f"{param} must be {_UNIONS[param]}, got {json.dumps(given)[:200]}", param=param)
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    shown = json.dumps(given)[:100] if given is not None and not isinstance(given, dict) else None
    message = f"{where}: {first['msg']}" + (f", got {shown}" if shown is not None else "")
    return APIError(400, message, param=param)


_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "max_tokens", "min_tokens",
                    "logprobs", "top_logprobs", "prompt", "messages", "max_completion_tokens", "logit_bias",
                    "prompt_logprobs", "structured_outputs", "guided_json", "guided_choice", "response_format",
                    "allowed_token_ids", "seed", "stop_token_ids", "stop", "thinking_token_budget", "bad_words",
                    "cache_salt", "logprob_token_ids")


def from_value_error(exc: ValueError) -> APIError:
    """A range error from SamplingParams/the engine as a 400; the message starts with the field."""
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":")
    param = first if first in _SAMPLING_FIELDS else None
    return APIError(400, message, param=param)
