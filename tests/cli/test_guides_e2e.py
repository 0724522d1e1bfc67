"""The guides' commands run end to end on a CPU, scaled down (world sizes 2, the MindSpore TP x
PP line 4; short lengths) on a tiny random DeepSeek-V3-shaped checkpoint with an MTP layer: each
server starts (the MindSpore line on a real local Ray cluster), answers the guide's own request
(the curl body as written, sent with the official `openai` client where the guide uses the model
path as the name) with what the in-process engine gives for it, and stops cleanly. The bench
lines run against the same checkpoint. The vllm-ascend lines: test_guides_e2e_ascend.py."""
from __future__ import annotations

import json

import pytest

from deepserve.cli.main import main
from tests.cli.conftest import SHARED
from tests.cli.guide_runs import GREEDY, client, engine, greedy_text, guide, stop_cleanly
from tests.cli.guides import curl_bodies, exports, set_flags, set_model, yaml_blocks
from tests.distributed.local_ray import local_ray_head
from tests.server.conftest import launch, server_env


@pytest.fixture(scope="module")
def fp32_engine(tiny_r1):
    llm = engine(tiny_r1)
    yield llm
    llm.engine.shutdown()


def test_vastai_tp_serve_with_reasoning_and_bench_serve(reference, tiny_r1, fp32_engine, tmp_path):
    serve, bench_serve, _, _ = guide(reference, "vastai-vacc.md")
    argv = set_flags(set_model(serve, str(tiny_r1)), {"--tensor-parallel-size": 2, "--max-model-len": 256,
                                                      "--host": "127.0.0.1"})
    messages = [{"role": "user", "content": "Who won the world series in 2020?"}]
    expected = greedy_text(fp32_engine, messages, 12)
    server = launch(*argv[1:])
    try:
        r = client(server).chat.completions.create(model=str(tiny_r1), messages=messages, max_tokens=12, **GREEDY)
        msg = r.choices[0].message
        # the R1 template opens <think> in the prompt: a random model's reply is all reasoning
        assert (msg.reasoning_content, msg.content, r.model) == (expected, None, str(tiny_r1))

        bench = set_flags(set_model(bench_serve, str(tiny_r1)), {
            "--sonnet-input-len": 96, "--sonnet-prefix-len": 32, "--sonnet-output-len": 6, "--num-prompts": 4,
            "--dataset-path": str(SHARED / "datasets" / "serving" / "sonnet.txt"), "--result-dir": str(tmp_path)})
        assert main(bench + ["--base-url", server.url, "--disable-tqdm"]) == 0
        result = json.loads((tmp_path / "result.json").read_text())
        assert (result["completed"], result["failed"], result["model_id"], result["max_concurrency"]) == \
            (4, 0, str(tiny_r1), 4)
        assert result["backend"] == "openai-chat" and 4 <= result["total_output_tokens"] <= 24
    finally:
        stop_cleanly(server)


def test_mindspore_tp_pp_uneven_fp16_over_local_ray(reference, tiny_r1, monkeypatch):
    doc = reference / "ascend-300i-duo-mindspore.md"
    (cmd,) = guide(reference, doc.name)
    assert exports(doc)["VLLM_PP_LAYER_PARTITION"] == "31,30"
    # uneven as the guide's, on 3 layers; "2,1" would also be the default split (as "31,30" is of
    # 61), "1,2" is not: a rank that missed the variable would run the wrong layers
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,2")
    argv = set_flags(set_model(cmd, str(tiny_r1)), {"--tensor-parallel-size": 2, "--max-model-len": 256,
                                                    "--max-num-batched-tokens": 256})
    assert "--distributed-executor-backend=ray" in argv and "--pipeline_parallel_size=2" in argv
    ((endpoint, body),) = curl_bodies(doc)
    assert endpoint == "/v1/completions" and body["model"] == "/home/ckpt/deepseek_r1_671b"
    body["model"] = str(tiny_r1)
    # `ray start --head`, then serve, which joins that cluster (RAY_ADDRESS: not another cluster on
    # the machine); the head is started without the guide's export: the partition reaches the
    # Ray workers from the server's environment
    head_env = {k: v for k, v in server_env().items() if k != "VLLM_PP_LAYER_PARTITION"}
    with local_ray_head(head_env) as head:
        monkeypatch.setenv("RAY_ADDRESS", head.address)
        # the same layout in spawned processes: the same sums in the same order as over Ray
        with engine(tiny_r1, dtype="float16", tensor_parallel_size=2, pipeline_parallel_size=2) as fp16:
            expected = greedy_text(fp16, body["prompt"], body["max_tokens"])
        server = launch(*argv[1:], timeout=300)
        try:
            r = client(server).completions.create(**body)
            assert r.choices[0].text == expected and r.usage.completion_tokens == 120
            assert len(head.actors("Worker")) == 3   # ranks 1-3 are actors of this cluster
        finally:
            stop_cleanly(server)


def test_flagos_yaml_answers_the_metax_request(reference, tiny_r1, tmp_path):
    blocks = {b.split(":", 1)[0].split()[0]: b for b in yaml_blocks(reference / "flagos-nvidia-h100.md")}
    conf = tmp_path / "examples" / "deepseek_r1" / "conf"
    (conf / "serve").mkdir(parents=True)
    # one machine, one rank (TP x PP runs in the MindSpore test): no hostfile; the loopback for
    # gloo; FlagGems is not installed in CI
    experiment = blocks["defaults"].replace("    hostfile: examples/deepseek_r1/conf/hostfile.txt", "")
    experiment = experiment.replace("GLOO_SOCKET_IFNAME=bond0", "GLOO_SOCKET_IFNAME=lo")
    experiment = experiment.replace(" && export USE_FLAGGEMS=1", "")
    (conf / "config_deepseek_r1.yaml").write_text(experiment)
    (conf / "serve" / "deepseek_r1.yaml").write_text(
        blocks["-"].replace("/nfs/deepseek_r1", str(tiny_r1)).replace("tensor_parallel_size: 8", "tensor_parallel_size: 1")
        .replace("pipeline_parallel_size: 4", "pipeline_parallel_size: 1").replace("32768", "48"))
    (cmd,) = guide(reference, "flagos-nvidia-h100.md")
    ((endpoint, body),) = curl_bodies(reference / "flagos-metax.md")
    assert endpoint == "/v1/chat/completions" and body["model"] == "<model path>" and "max_tokens" not in body
    body["model"] = str(tiny_r1)
    server = launch(*cmd[1:], cwd=tmp_path)
    try:
        r = client(server).chat.completions.create(**body)
        # no max_tokens: the reply may run to the end of the context (vLLM's default)
        assert r.usage.prompt_tokens + r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length"
        assert r.model == str(tiny_r1)
    finally:
        stop_cleanly(server)


@pytest.mark.parametrize("kind", ["throughput", "latency"])
def test_vastai_offline_bench_lines(reference, tiny_r1, tmp_path, kind):
    cmd = next(c for c in guide(reference, "vastai-vacc.md") if c[:2] == ["bench", kind])
    argv = set_flags(set_model(cmd, str(tiny_r1)), {"--tensor-parallel-size": 1, "--max-model-len": 64,
                                                    "--num-prompts": 3, "--input-len": 16, "--output-len": 5,
                                                    "--num-iters": 2})
    out = tmp_path / "out.json"
    assert main(argv + ["--output-json", str(out), "--disable-tqdm"]
                + (["--num-iters-warmup", "1"] if kind == "latency" else [])) == 0
    result = json.loads(out.read_text())
    if kind == "throughput":
        assert (result["num_requests"], result["total_prompt_tokens"], result["total_output_tokens"]) == (3, 48, 15)
    else:
        assert len(result["latencies"]) == 2 and result["avg_latency"] > 0
