"""In-process pieces: AsyncLLM (streaming, abort frees blocks, a failing step fails only its
requests, queue limit, shutdown), the YAML deployment file with CLI overrides, metrics text."""
from __future__ import annotations

import argparse
import asyncio
import json
import threading

import pytest

from deepserve.config import EngineArgs
from deepserve.engine.async_llm import AsyncLLM, EngineDeadError, EngineStepError, FinishedRequest, QueueFullError
from deepserve.engine.sampling_params import SamplingParams
from deepserve.server.metrics import ServerMetrics, parse_metrics, token_buckets

GREEDY_8 = ", there was a little girl"


@pytest.fixture(scope="module")
def make_llm():
    def make(**kwargs) -> AsyncLLM:
        return AsyncLLM.from_engine_args(EngineArgs(num_gpu_blocks_override=64, **kwargs))
    return make


async def last_of(outputs):
    last = None
    async for out in outputs:
        last = out
    return last


async def drain(llm: AsyncLLM, prompt: str, params: SamplingParams, rid: str):
    return await last_of(llm.generate(prompt, params, rid))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_generate_abort_and_failed_step(make_llm, async_scheduling):
    llm = make_llm(async_scheduling=async_scheduling, max_model_len=128)

    async def main():
        llm.start()
        greedy = SamplingParams(max_tokens=8, temperature=0)
        out = await drain(llm, "Once upon a time", greedy, "a")
        assert out.finished and out.outputs[0].text == GREEDY_8
        # leave a long stream after two outputs: its blocks are back before the next step
        gen = llm.generate("One day", SamplingParams(max_tokens=400, ignore_eos=True), "b")
        await gen.__anext__()
        await gen.__anext__()
        assert llm.snapshot["num_free_blocks"] < llm.snapshot["num_blocks"]
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if llm.snapshot["num_free_blocks"] == llm.snapshot["num_blocks"]:
                break
        assert llm.snapshot["num_free_blocks"] == llm.snapshot["num_blocks"]
        assert not llm.engine.requests
        # a step that raises fails its request, and the next one is served normally
        runs = "launch" if async_scheduling else "execute"     # how the engine runs a step
        real = getattr(llm.engine.runner, runs)
        calls = {"n": 0}

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device lost")
            return real(*args)

        setattr(llm.engine.runner, runs, flaky)
        with pytest.raises(EngineStepError, match="device lost"):
            await drain(llm, "Once upon a time", greedy, "c")
        assert (await drain(llm, "Once upon a time", greedy, "d")).outputs[0].text == GREEDY_8
        assert llm.num_step_errors == 1 and llm.snapshot["num_free_blocks"] == 64
        # an id in flight is refused, and the request holding it is served as usual (it hung)
        first = llm.generate("Once upon a time", greedy, "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await drain(llm, "One day", greedy, "dup")
        out = await asyncio.wait_for(last_of(first), 10)
        assert out.finished and out.outputs[0].text == GREEDY_8
        # a prompt past the context is refused with both numbers; an output past it stops there
        with pytest.raises(ValueError, match="600.*128"):
            await drain(llm, {"prompt_token_ids": [5] * 600}, SamplingParams(max_tokens=1), "e")
        capped = await drain(llm, "x", SamplingParams(max_tokens=600, ignore_eos=True), "e2")
        assert capped.outputs[0].finish_reason == "length"
        assert len(capped.prompt_token_ids) + len(capped.outputs[0].token_ids) == 128
        # shutdown ends in-flight requests with an error
        gen = llm.generate("One day", SamplingParams(max_tokens=400, ignore_eos=True), "f")
        await gen.__anext__()
        llm.begin_shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError):
            await drain(llm, "x", greedy, "g")
        llm.shutdown()
        assert not llm.is_running

    asyncio.run(main())


def test_queue_limit(make_llm):
    llm = make_llm(max_num_seqs=1, max_waiting_requests=1)

    async def main():
        llm.start()
        long = SamplingParams(max_tokens=300, ignore_eos=True)
        first = llm.generate("One day", long, "a")
        await first.__anext__()                      # running
        second = asyncio.ensure_future(drain(llm, "One day", SamplingParams(max_tokens=2), "b"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if llm.num_waiting_requests() == 1:
                break
        with pytest.raises(QueueFullError, match="1 requests waiting"):
            await drain(llm, "x", long, "c")
        await first.aclose()
        assert len((await second).outputs[0].token_ids) == 2
        llm.shutdown()

    asyncio.run(main())


def test_request_cancelled_before_its_add_is_applied(make_llm):
    """A client that leaves while its request's add still waits for the engine thread (a
    timeout under load) cancels the add's future: the engine thread goes on serving (it died
    on the cancelled future, and every later request waited forever) and the request is
    aborted, its blocks free."""
    llm = make_llm()
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        llm.start()
        with llm._cond:   # the engine thread cannot take the add until the client has left
            gone = asyncio.ensure_future(drain(llm, "One day", long, "gone"))
            for _ in range(5):
                await asyncio.sleep(0)
            assert [kind for kind, _, _ in llm._ops] == ["add"]
            gone.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            assert gone.cancelled() and [kind for kind, _, _ in llm._ops] == ["add", "abort"]
        out = await asyncio.wait_for(drain(llm, "Once upon a time", SamplingParams(max_tokens=8, temperature=0),
                                           "next"), 30)
        assert out.outputs[0].text == GREEDY_8 and llm.is_running
        assert not llm.engine.requests and llm.snapshot["num_free_blocks"] == 64
        llm.shutdown()

    asyncio.run(main())


def test_engine_thread_failure_fails_every_request(make_llm):
    """An error past the step's own handling ends the engine thread: the request in flight and
    every later one get EngineDeadError naming it (503 on the API), not a wait without end."""
    llm = make_llm()
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main():
        llm.start()
        gen = llm.generate("One day", long, "a")
        await gen.__anext__()

        def broken():
            raise RuntimeError("gauges gone")
        llm._take_snapshot = broken
        with pytest.raises(EngineDeadError, match="gauges gone"):
            await asyncio.wait_for(last_of(gen), 30)
        with pytest.raises(EngineDeadError, match="gauges gone"):
            await asyncio.wait_for(drain(llm, "Once", SamplingParams(max_tokens=2), "b"), 30)
        assert not llm.is_running
        llm.shutdown()

    asyncio.run(main())


def test_yaml_file_and_cli_override(tmp_path, monkeypatch):
    from deepserve.cli.serve import register, resolve

    path = tmp_path / "r1.yaml"
    path.write_text("serve:\n- serve_id: r1\n  engine_args:\n    model: deepseek-r1\n"
                    "    max_model_len: 4096\n    tensor_parallel_size: 8\n    port: 9010\n"
                    "    reasoning_parser: deepseek_r1\n  envs:\n    USE_FLAGGEMS: 1\n"
                    "experiment:\n  envs:\n    CUDA_DEVICE_MAX_CONNECTIONS: 1\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", str(path), "--max-model-len", "2048", "--host", "0.0.0.0"])
    engine, server, envs = resolve(args)
    assert engine == {"model": "deepseek-r1", "max_model_len": 2048, "tensor_parallel_size": 8}
    assert (server.host, server.port, server.reasoning_parser) == ("0.0.0.0", 9010, "deepseek_r1")
    assert envs == {"USE_FLAGGEMS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine_args:\n  model: x\n  max_modle_len: 5\n")
    with pytest.raises(ValueError, match="max_modle_len"):
        resolve(parser.parse_args(["serve", str(bad)]))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve(parser.parse_args(["serve", str(tmp_path / "missing.yaml")]))
    model_args = parser.parse_args(["serve", "some/model", "--port", "1234"])
    engine, server, _ = resolve(model_args)
    assert engine == {"model": "some/model"} and server.port == 1234 and server.host == "127.0.0.1"


def test_metrics_text():
    from prometheus_client.parser import text_string_to_metric_families

    snap = {"num_requests_running": 2, "prefix_cache_queries": 40, "prefix_cache_hits": 10}
    m = ServerMetrics('m"1', lambda: snap)
    m.on_output("r", 0.0, 0.2, [1], True)
    m.on_output("r", 0.0, 0.5, [3], False)
    m.on_finish("r", 0.0, 0.5, FinishedRequest(5, 4, 4, 0, 1, 16, "stop", {}))
    m.record_error(400)
    text = m.render()
    values = parse_metrics(text)
    lab = 'model_name="m\\"1",engine="0"'
    assert values[f"deepserve:num_requests_running{{{lab}}}"] == 2
    assert values[f"deepserve:prefix_cache_hit_rate{{{lab}}}"] == 0.25
    assert values[f"deepserve:time_to_first_token_seconds_sum{{{lab}}}"] == pytest.approx(0.2)
    assert values[f"deepserve:inter_token_latency_seconds_count{{{lab}}}"] == 3
    assert values[f"deepserve:inter_token_latency_seconds_sum{{{lab}}}"] == pytest.approx(0.3)
    assert values[f'deepserve:time_to_first_token_seconds_bucket{{{lab},le="0.1"}}'] == 0
    assert values[f'deepserve:time_to_first_token_seconds_bucket{{{lab},le="0.25"}}'] == 1
    assert values[f'deepserve:request_success_total{{{lab},finished_reason="stop"}}'] == 1
    assert values[f'deepserve:request_success_total{{{lab},finished_reason="length"}}'] == 0
    assert values['deepserve:http_errors_total{model_name="m\\"1",status="400"}'] == 1   # the server's, no engine
    # vLLM's per-request token counts (its dashboard's prompt / generation length panels)
    assert values[f'deepserve:request_prompt_tokens_bucket{{{lab},le="2.0"}}'] == 0
    assert values[f'deepserve:request_prompt_tokens_bucket{{{lab},le="5.0"}}'] == 1
    assert values[f"deepserve:request_generation_tokens_sum{{{lab}}}"] == 4
    assert token_buckets(512)[:4] == (1, 2, 5, 10) and token_buckets(512)[-1] == 500
    # every series is there under vLLM's name too
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert families["vllm:prompt_tokens"].type == "counter"
    for key, value in values.items():
        if key.startswith("deepserve:"):
            assert values["vllm:" + key[len("deepserve:"):]] == value, key

def test_known_unsupported_fields_refused_unknown_ones_ignored_by_name():
    from deepserve.server.protocol import ChatCompletionRequest, CompletionRequest, ignored_fields, unsupported_field

    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "prediction": {"a": 1}, "x_new": 1})
    assert unsupported_field(req)[0] == "prediction" and "predicted outputs" in unsupported_field(req)[1]
    assert ignored_fields(req) == ["x_new"]
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hi", "audio": {"id": "a"}, "mood": "calm"}], "store": False})
    assert unsupported_field(chat)[0] == "messages[0].audio"       # store=False asks for nothing
    assert ignored_fields(chat) == ["messages[0].mood"]
    plain = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "top_k": 3})
    assert unsupported_field(plain) is None and ignored_fields(plain) == []
    # values asking for what the server does anyway pass; others are refused
    for field, value in (("modalities", ["text"]), ("service_tier", "auto"), ("service_tier", "default"),
                         ("safety_identifier", "user-7")):
        chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], field: value})
        assert unsupported_field(chat) is None and ignored_fields(chat) == [], field
    for field, value in (("modalities", ["text", "audio"]), ("service_tier", "flex")):
        chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], field: value})
        assert unsupported_field(chat)[0] == field


def test_tokenize_messages_add_special_tokens():
    """/tokenize of messages takes add_special_tokens (vLLM's default there: false) as a chat
    request does: with a template that writes no BOS, true adds the tokenizer's (it was ignored)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.config import DEMO_MODEL
    from deepserve.engine.tokenizer import Tokenizer
    from deepserve.server.app import build_app
    from deepserve.server.serving_common import ServerSettings, ServerState

    tok = Tokenizer(DEMO_MODEL, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    llm = SimpleNamespace(tokenizer=tok, max_model_len=512)   # /tokenize needs no engine
    state = ServerState(llm=llm, settings=ServerSettings(served_model_names=["m"], model_path="m"),
                        metrics=ServerMetrics("m", dict))
    client = TestClient(build_app(state))   # outside `with`: the lifespan (engine start) does not run

    def tokens(**body) -> list[int]:
        r = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Once upon a time"}], **body})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]
    plain = tok.encode("Once upon a time", add_special_tokens=False)
    assert tokens() == plain and tokens(add_special_tokens=False) == plain
    assert tokens(add_special_tokens=True) == [tok.bos_token_id] + plain
    r = client.post("/tokenize", json={"prompt": "Once upon a time"})   # a prompt's default: true
    assert r.json()["tokens"] == [tok.bos_token_id] + plain


def test_shared_metric_files_skip_a_file_not_yet_sized(tmp_path):
    """An API server registering its metrics (or a scrape) while another API server has just
    created its metric file, still empty: the others' files are read, the empty one skipped."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from deepserve.server.metrics import _SharedFilesCollector

    written = MmapedDict(str(tmp_path / "counter_101.db"))
    key = mmap_key("deepserve:request_success", "deepserve:request_success_total", ["model_name"], ["m"], "h")
    written.write_value(key, 3.0, 0.0)
    written.close()
    (tmp_path / "counter_102.db").write_bytes(b"")     # opened by prometheus_client, not yet sized
    registry = CollectorRegistry(auto_describe=True)
    _SharedFilesCollector(registry, str(tmp_path))     # registering collects once
    samples = [s for family in registry.collect() for s in family.samples]
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("deepserve:request_success_total", {"model_name": "m"}, 3.0)]


def test_bad_words_are_tokenized_off_the_engine_thread(make_llm, monkeypatch):
    # the engine thread runs every batch's steps: a long bad_words list tokenized there holds them all
    llm = make_llm()
    threads = []
    encode = llm.tokenizer.encode

    def recording(text, add_special_tokens=True):
        if "girl" in text:
            threads.append(threading.current_thread())
        return encode(text, add_special_tokens)
    monkeypatch.setattr(llm.tokenizer, "encode", recording)

    async def main():
        llm.start()
        try:
            params = SamplingParams(max_tokens=8, temperature=0, bad_words=["girl"])
            out = await drain(llm, "Once upon a time", params, "a")
            assert out.finished and "girl" not in out.outputs[0].text
            assert threads and llm._thread not in threads
        finally:
            llm.shutdown()
    asyncio.run(main())


def test_fastapi_docs_served_unless_disabled_and_the_root_path():
    """vLLM serves FastAPI's /openapi.json, /docs and /redoc unless --disable-fastapi-docs; with
    --root-path the routes answer under the prefix and without it, and the schema names it."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.config import DEMO_MODEL
    from deepserve.engine.tokenizer import Tokenizer
    from deepserve.server.app import build_app
    from deepserve.server.serving_common import ServerSettings, ServerState

    llm = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL), max_model_len=512)   # /tokenize needs no engine

    def client(**settings) -> TestClient:
        state = ServerState(llm=llm, settings=ServerSettings(served_model_names=["m"], model_path="m", **settings),
                            metrics=ServerMetrics("m", dict))
        return TestClient(build_app(state))   # outside `with`: the lifespan (engine start) does not run

    served = client()
    assert [served.get(p).status_code for p in ("/openapi.json", "/docs", "/redoc")] == [200] * 3
    assert {"get", "post"} <= set(served.get("/openapi.json").json()["paths"]["/ping"])
    hidden = client(disable_fastapi_docs=True)
    assert [hidden.get(p).status_code for p in ("/openapi.json", "/docs", "/redoc")] == [404] * 3
    proxied = client(root_path="/llm")
    expected = served.post("/tokenize", json={"prompt": "Once"}).json()["tokens"]
    for path in ("/llm/tokenize", "/tokenize"):
        r = proxied.post(path, json={"prompt": "Once"})
        assert r.status_code == 200 and r.json()["tokens"] == expected
    assert proxied.get("/llm/openapi.json").json()["servers"] == [{"url": "/llm"}]



def test_models_with_a_trailing_slash_redirect_to_the_list():
    """GET /v1/models/ is redirected to /v1/models as vLLM's router does (it answered the first
    model's card, as if retrieved by an empty name)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.server.app import build_app
    from deepserve.server.serving_common import ServerSettings, ServerState

    llm = SimpleNamespace(tokenizer=None, max_model_len=512)   # the model routes need no engine
    state = ServerState(llm=llm, settings=ServerSettings(served_model_names=["a", "b"], model_path="m"),
                        metrics=ServerMetrics("a", dict))
    client = TestClient(build_app(state))
    moved = client.get("/v1/models/", follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == "http://testserver/v1/models"
    listed = client.get("/v1/models/").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["a", "b"]
    assert client.get("/v1/models/b").json()["id"] == "b"


def test_an_unexpected_error_says_what_failed_without_the_servers_insides():
    """A 500 names the exception and its text, less object addresses, traceback source lines and
    absolute file paths (vLLM strips the same from what it sends)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.server.app import build_app
    from deepserve.server.errors import internal_error
    from deepserve.server.serving_common import ServerSettings, ServerState, api_error_from

    class Thing:
        pass
    thing = f"<{Thing.__module__}.{Thing.__qualname__} object>"   # its repr without " at 0x..."

    class Broken:
        vocab_size = 10

        def decode(self, ids, skip_special_tokens):
            raise RuntimeError(f"decoder {Thing()} failed in /usr/lib/python3/site-packages/tok/dec.py")

    state = ServerState(llm=SimpleNamespace(tokenizer=Broken(), max_model_len=512), metrics=ServerMetrics("m", dict),
                        settings=ServerSettings(served_model_names=["m"], model_path="m"))
    r = TestClient(build_app(state), raise_server_exceptions=False).post("/detokenize", json={"tokens": [1]})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": f"RuntimeError: decoder {thing} failed in <path>",
                                 "type": "InternalServerError", "param": None, "code": 500}
    traced = ValueError('Traceback:\n  File "/srv/app/x.py", line 3, in f\n    x = 1\nboom')
    assert internal_error(traced).message == "ValueError: Traceback:\nboom"
    assert api_error_from(KeyError(Thing())).message == f"KeyError: {thing}"
    missing = FileNotFoundError(2, "No such file or directory", "/root/models/r1/config.json")
    assert api_error_from(missing).message == "FileNotFoundError: [Errno 2] No such file or directory: '<path>'"
    assert internal_error(TypeError("1/2 and a/b ratio")).message == "TypeError: 1/2 and a/b ratio"   # no paths


def test_the_server_freezes_the_heap_its_start_made(capsys):
    """The API server's start freezes the heap (vLLM's freeze_gc_heap when its API server
    starts): what exists then (the engine, the app, torch's modules) is left out of the
    collector's later collections, the process's last one at exit included."""
    import gc
    from types import SimpleNamespace

    import uvicorn
    from fastapi import FastAPI

    from deepserve.server.api_server import _Server

    made_before = [0]   # a list: tracked by the collector
    state = SimpleNamespace(settings=SimpleNamespace(served_model_names=["m"]), llm=SimpleNamespace(fatal_error=None))
    server = _Server(uvicorn.Config(FastAPI(), host="127.0.0.1", port=0, lifespan="off", log_level="warning"), state)

    async def start_and_stop() -> None:
        serving = asyncio.create_task(server._serve())   # uvicorn's run, without its signal handlers
        while not server.started:
            await asyncio.sleep(0.01)
        server.should_exit = True
        await serving

    assert any(o is made_before for o in gc.get_objects())
    try:
        asyncio.run(start_and_stop())
        assert not any(o is made_before for o in gc.get_objects())
    finally:
        gc.unfreeze()   # the objects of the tests that follow stay collectable
    assert "deepserve: serving m at http://127.0.0.1:" in capsys.readouterr().out


def test_streams_send_a_chunk_for_each_output_with_tokens():
    """vLLM's streams without a reasoning or tool parser: a chunk per engine output that brings
    tokens, its text "" where the tokens show nothing yet (a pending stop string, a partial
    character); the completions stream skipped those, and the chat stream sent them as delta {}."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from deepserve.config import DEMO_MODEL
    from deepserve.engine.outputs import CompletionOutput, RequestOutput
    from deepserve.engine.tokenizer import Tokenizer
    from deepserve.server.app import build_app
    from deepserve.server.serving_common import ServerSettings, ServerState

    steps = [(" there", [1]), (" there", [1, 2]), (" there was", [1, 2, 3])]   # the 2nd token shows nothing yet

    async def generate(prompt, params, request_id):
        for k, (text, ids) in enumerate(steps):
            last = k == len(steps) - 1
            out = CompletionOutput(0, text, ids, finish_reason="length" if last else None)
            yield RequestOutput(request_id, None, prompt["prompt_token_ids"], [out], last)

    llm = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL), max_model_len=512, vocab_size=512, generate=generate,
                          check_can_accept=lambda: None)
    state = ServerState(llm=llm, settings=ServerSettings(served_model_names=["m"], model_path="m"),
                        metrics=ServerMetrics("m", dict))
    client = TestClient(build_app(state))   # outside `with`: the lifespan (engine start) does not run

    def choices(path: str, **body) -> list[dict]:
        r = client.post(path, json={"model": "m", "stream": True, "max_tokens": 3, "return_token_ids": True, **body})
        assert r.status_code == 200, r.text
        return [json.loads(line[6:])["choices"][0] for line in r.text.splitlines() if line.startswith("data: {")]

    got = choices("/v1/completions", prompt="Once")
    assert [(c["text"], c["token_ids"]) for c in got] == [(" there", [1]), ("", [2]), (" was", [3])]
    got = choices("/v1/chat/completions", messages=[{"role": "user", "content": "Once"}])[1:]
    assert [(c["delta"], c["token_ids"]) for c in got] == [({"content": " there"}, [1]), ({"content": ""}, [2]),
                                                           ({"content": " was"}, [3])]
