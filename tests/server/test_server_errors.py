"""Every bad request gets its status and OpenAI's error body, and the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest
from conftest import API_KEY

GOOD = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def http(demo_server):
    with httpx.Client(base_url=demo_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def check_error(response: httpx.Response, status: int, param=None, contains: tuple = ()) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status   # vLLM's ErrorInfo.code: the HTTP status, a number
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    for text in contains:
        assert text in err["message"], err["message"]
    return err


BAD_COMPLETIONS = [
    ({"max_tokens": 0}, "max_tokens", ("max_tokens", "0")),
    ({"temperature": -0.5}, "temperature", ("-0.5",)),
    ({"top_p": 0.0}, "top_p", ("top_p",)),
    ({"top_p": 1.5}, "top_p", ("1.5",)),
    ({"n": 0}, "n", ("n must be at least 1",)),
    ({"n": 257}, "n", ("n must be <= 256", "max-num-seqs")),   # unbounded: n=10**8 ate memory without end
    ({"n": "two"}, "n", ("two",)),
    ({"temperature": "hot"}, "temperature", ("hot",)),
    ({"stop": 5}, "stop", ("stop must be a string or a list of strings, got 5",)),
    ({"prompt": {"text": "x"}}, "prompt", ("prompt must be",)),
    ({"prompt": [1, 99999]}, "prompt", ("99999",)),
    ({"prompt": [[1, 5], []]}, None, ("The decoder prompt cannot be empty",)),   # vLLM's text
    ({"prompt": [[1]] * 4097}, "prompt", ("4097 samples", "at most 4096")),   # memory per sample, before any step
    ({"prompt": [[1]] * 20, "n": 250}, "prompt", ("5000 samples",)),
    ({"logprobs": 50}, "logprobs", ("50",)),
    ({"logprobs": -1}, "logprobs", ("logprobs must be >= 0", "got -1")),   # vLLM's: -1 is no completions' logprobs
    ({"logprobs": -1, "echo": True}, "logprobs", ("logprobs must be >= 0", "got -1")),
    ({"prompt_logprobs": -1}, "prompt_logprobs", ("must be <= 20", "got -1 (the whole vocabulary, 512 tokens)")),
    ({"max_tokens": 600}, "max_tokens", ("max_tokens=600 cannot be greater than max_model_len=512. Please request "
                                         "fewer output tokens.",)),   # vLLM's words, before the prompt's count
    ({"stop_token_ids": [512], "min_tokens": 2}, "stop_token_ids", ("512",)),   # failed the step
    ({"stop_token_ids": [-1]}, "stop_token_ids", ("-1",)),
    ({"seed": 2**64}, "seed", (str(2**64),)),                  # beyond int64 (vLLM's bound)
    ({"stream_options": {"include_usage": True}}, "stream_options", ("stream",)),   # without stream
]


@pytest.mark.parametrize("change,param,contains", BAD_COMPLETIONS)
def test_bad_completion_values_are_400(http, change, param, contains):
    check_error(http.post("/v1/completions", json={**GOOD, **change}), 400, param, contains)
    ok = http.post("/v1/completions", json=GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == ", there was a"


@pytest.mark.parametrize("route,base", [("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)])
def test_numbers_and_switches_coerced_as_vllms_models_do(http, route, base):
    """vLLM's request models take pydantic's lax types: 2.0 and "2" are the integer 2, "0" the
    number 0, "false" false; 2.5 for an integer stays a 400 naming the field."""
    exact = http.post(route, json={**base, "max_tokens": 2, "temperature": 0, "stream": False}).json()
    for given in (2.0, "2"):
        r = http.post(route, json={**base, "max_tokens": given, "temperature": "0", "stream": "false"})
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == exact["choices"] and r.json()["usage"] == exact["usage"]
    check_error(http.post(route, json={**base, "max_tokens": 2.5}), 400, "max_tokens", ("integer", "2.5"))
    check_error(http.post(route, json={**base, "max_tokens": "two"}), 400, "max_tokens", ("integer", "two"))


@pytest.mark.parametrize("route,base", [("/v1/completions", GOOD), ("/v1/chat/completions", CHAT)])
def test_empty_stream_options_without_stream_pass(http, route, base):
    """vLLM refuses stream_options without stream only where they ask for something: {} passes."""
    assert http.post(route, json={**base, "stream_options": {}}).status_code == 200
    check_error(http.post(route, json={**base, "stream_options": {"include_usage": False}}), 400, "stream_options")


def test_null_max_tokens_is_the_default(http):
    """vLLM reads a completion's max_tokens null as its default, 16 (it ran to the context's end);
    a chat's default is no limit but the context's, null or not."""
    body = {**GOOD, "ignore_eos": True}
    del body["max_tokens"]
    plain = http.post("/v1/completions", json=body).json()
    null = http.post("/v1/completions", json={**body, "max_tokens": None}).json()
    assert null["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 16
    assert null["choices"] == plain["choices"]
    chat = {**CHAT, "ignore_eos": True, "max_tokens": None}
    assert http.post("/v1/chat/completions", json=chat).json()["usage"]["total_tokens"] == 512


def test_empty_prompt_has_vllms_text(http):
    for extra in ({}, {"add_special_tokens": False}):   # refused before tokenizing, as vLLM does
        check_error(http.post("/v1/completions", json={**GOOD, "prompt": "", **extra}),
                    400, "prompt", ("Either prompt or prompt_embeds must be provided and non-empty.",))
    no_prompt = {k: v for k, v in GOOD.items() if k != "prompt"}
    for body in (no_prompt, {**no_prompt, "prompt": None}):   # vLLM's text too (the body was quoted back)
        err = check_error(http.post("/v1/completions", json=body), 400, "prompt")
        assert err["message"] == "Either prompt or prompt_embeds must be provided and non-empty."


def test_long_prompt_names_both_numbers(http):
    """vLLM's renderer names the prompt's tokens (input_tokens), not max_tokens, where prompt +
    max_tokens passes the context."""
    err = check_error(http.post("/v1/completions", json={**GOOD, "prompt": [5] * 520, "max_tokens": 1}),
                      400, "input_tokens")
    assert "512" in err["message"] and "520" in err["message"]


def test_long_request_names_max_completion_tokens_when_sent(http):
    check_error(http.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 600}),
                400, "max_completion_tokens", ("max_completion_tokens=600 cannot be greater than max_model_len=512",))
    check_error(http.post("/v1/completions", json={**GOOD, "max_tokens": None, "max_completion_tokens": 600}),
                400, "max_completion_tokens")


# JSON parsers take NaN and Infinity (and 1e999 overflows to it): no sampling value may be one
@pytest.mark.parametrize("field,literal", [("temperature", "NaN"), ("temperature", "1e999"),
                                           ("presence_penalty", "-Infinity"), ("logit_bias", '{"5": NaN}')])
def test_non_finite_numbers_are_400(http, field, literal):
    body = b'{"model": "stories260k", "prompt": "Once", "max_tokens": 2, "%s": %s}' % (field.encode(), literal.encode())
    check_error(http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"}),
                400, field, ("finite",))


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"tools": []}, "tools"),                        # OpenAI's 400 too (it was taken as no tools)
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),   # the field sent is the one named
    ({"top_logprobs": 3}, "top_logprobs"),          # top_logprobs without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    # json_schema's name is required (OpenAI's and vLLM's JsonSchemaResponseFormat); it was optional
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "response_format"),
]


@pytest.mark.parametrize("change,param", BAD_CHAT)
def test_bad_chat_values_are_400(http, change, param):
    check_error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, param)


def test_whole_vocabulary_over_max_logprobs_names_the_minus_one_sent(http):
    """vLLM takes -1 for chat's top_logprobs and for prompt_logprobs as the whole vocabulary (512
    for the demo model), over --max-logprobs 20 a 400: the message names the -1 sent, then the size."""
    whole = "got -1 (the whole vocabulary, 512 tokens)"
    check_error(http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": -1}),
                400, "top_logprobs", ("top_logprobs must be <= 20", whole))
    check_error(http.post("/v1/chat/completions", json={**CHAT, "prompt_logprobs": -1}),
                400, "prompt_logprobs", ("prompt_logprobs must be <= 20", whole))


def test_a_union_field_names_every_shape_it_takes(http):
    """OpenAI's newer allowed_tools choice is not implemented: the message says what is (it named
    only the strings, as if an object could not be given)."""
    choice = {"type": "allowed_tools", "mode": "auto", "tools": []}
    check_error(http.post("/v1/chat/completions", json={**CHAT, "tool_choice": choice}), 400, "tool_choice",
                ('"required" or {"type": "function", "function": {"name": NAME}}', "allowed_tools"))
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_malformed_and_empty_json(http):
    headers = {"Content-Type": "application/json"}
    check_error(http.post("/v1/completions", content=b'{"prompt": "x",', headers=headers), 400,
                contains=("malformed JSON",))
    check_error(http.post("/v1/chat/completions", content=b"", headers=headers), 400)
    for not_an_object in (b"[1, 2]", b"5", b"null", b'"x"'):
        check_error(http.post("/v1/completions", content=not_an_object, headers=headers), 400)


JSON_ROUTES = {"/v1/completions": GOOD, "/v1/chat/completions": CHAT, "/tokenize": {"prompt": "Hi"},
               "/v1/responses": {"input": "Hi", "max_output_tokens": 4}, "/detokenize": {"tokens": [1, 5]}}


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_json_routes_take_only_application_json(http, route):
    """vLLM's JSON routes refuse any other Content-Type (curl -d sends a form's, curl without -H
    nothing) with a 400 before reading the body; a charset parameter is fine."""
    body = json.dumps(JSON_ROUTES[route]).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None, "application/jsonl"):
        headers = {} if content_type is None else {"Content-Type": content_type}
        check_error(http.post(route, content=body, headers=headers), 400,
                    contains=("Unsupported Media Type: Only 'application/json' is allowed",))
    ok = http.post(route, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_utf8_bom_and_duplicate_keys_read_as_python_json_reads_them(http):
    """A UTF-8 byte-order mark before the JSON is skipped, UTF-16 and UTF-32 are read, and of keys
    given twice the last counts, as vLLM's json.loads reads a body."""
    headers = {"Content-Type": "application/json"}
    plain = http.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
    text = json.dumps(GOOD)
    for body in (b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"), text.encode("utf-16-le"),
                 text.encode("utf-32")):
        r = http.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == plain
    check_error(http.post("/v1/completions", content=b"\xff\xfe{\x00\x22", headers=headers), 400,
                contains=("malformed JSON body: not utf-16 text",))   # cut in a character
    twice = b'{"prompt": "Once upon a time", "temperature": 0, "max_tokens": 9, "max_tokens": 2}'
    r = http.post("/v1/completions", content=twice, headers=headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_auth_401(demo_server):
    url = demo_server.url + "/v1/completions"
    check_error(httpx.post(url, json=GOOD), 401)
    check_error(httpx.post(url, json=GOOD, headers={"Authorization": "Bearer wrong"}), 401)
    # health and metrics stay open for probes and scrapers
    assert httpx.get(demo_server.url + "/health").status_code == 200


def test_cors_preflight_and_headers(demo_server):
    """Browsers may call the API from any origin by default (vLLM's --allowed-origins '["*"]'):
    the preflight is answered, and even a refusal carries the header the page needs to read it."""
    url = demo_server.url + "/v1/chat/completions"
    pre = httpx.options(url, headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    refused = httpx.post(url, json=CHAT, headers={"Origin": "https://ui.example"})   # no key
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"
    ok = httpx.post(url, json=CHAT, headers={"Origin": "https://ui.example", "Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"


def test_unknown_model_404(http):
    err = check_error(http.post("/v1/completions", json={**GOOD, "model": "gpt-4"}), 404, "model",
                      ("gpt-4",))
    assert err["code"] == 404
    check_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model")
    check_error(http.get("/v1/nothing-here"), 404)
    # an endpoint of OpenAI's this server lacks: the answer says which ones it has
    check_error(http.post("/v1/embeddings", json={"model": "stories260k", "input": "x"}), 404, None,
                ("POST /v1/embeddings", "POST /v1/chat/completions"))


def test_wrong_method_405_as_vllms_router(http):
    """A route asked with a method it does not take: 405 typed as vLLM's HTTPException handler types
    it (the status phrase); HEAD is no GET (FastAPI's routes, vLLM's too, take only what they name)."""
    for method, path in (("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("HEAD", "/health"),
                         ("PUT", "/tokenize")):
        r = http.request(method, path)
        assert r.status_code == 405, (method, path)
        if method != "HEAD":
            err = check_error(r, 405, contains=(f"{method} {path}", "Method Not Allowed"))
            assert err["type"] == "Method Not Allowed"


def test_oversized_body_413(http):
    big = {**GOOD, "prompt": "a " * (1 << 20)}           # > the 1 MiB limit the fixture sets
    check_error(http.post("/v1/completions", json=big), 413, contains=("limit",))

    def chunks():  # no Content-Length: refused while reading
        for _ in range(40):
            yield b" " * 65536
    check_error(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_error_metrics_counted(http):
    text = http.get("/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("deepserve:http_errors_total") and '"400"' in l)
    assert float(line.rsplit(" ", 1)[1]) >= 1


def test_several_keys_guarded_prefixes_and_root_path():
    """vLLM's --api-key takes several keys and guards /v1, /v2 and /inference, under --root-path
    (a proxy's prefix, kept or stripped) too; /health stays open."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.config import DEMO_MODEL
    from deepserve.engine.tokenizer import Tokenizer
    from deepserve.server.app import build_app
    from deepserve.server.metrics import ServerMetrics
    from deepserve.server.serving_common import ServerSettings, ServerState

    # the middleware and the routes that need no engine (the lifespan does not run outside `with`)
    llm = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL), max_model_len=512, is_running=True)
    settings = ServerSettings(served_model_names=["stories260k"], model_path="m", api_keys=["k1", "k2"],
                              root_path="/llm")
    client = TestClient(build_app(ServerState(llm=llm, settings=settings, metrics=ServerMetrics("m", dict))))

    def post(path, key=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return client.post(path, json=GOOD, headers=headers)

    for prefix in ("", "/llm"):
        check_error(post(prefix + "/v1/completions"), 401)
        check_error(post(prefix + "/v1/completions", "k3"), 401)
        check_error(client.get(prefix + "/v1/models"), 401)
        for key in ("k1", "k2"):
            ok = client.get(prefix + "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "stories260k"
        for guarded in ("/v2/models", "/inference/v1/generate"):
            check_error(post(prefix + guarded), 401)
            check_error(post(prefix + guarded, "k1"), 404)
        assert client.get(prefix + "/health").status_code == 200
        check_error(post(prefix + "/detokenize"), 400, "tokens")   # open, and so read: no tokens
