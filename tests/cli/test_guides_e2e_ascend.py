"""The vllm-ascend W8A8 guide's lines end to end on a CPU, scaled down (DP 2 x EP, TP 1, short
lengths) on the tiny R1 checkpoint stored as msModelSlim W8A8 with an MTP layer: the two-"node"
serve lines (a `--headless` second process tree on 127.0.0.1), DP x EP with MTP speculation and
the guide's compilation config, answer the guide's curl body with what the in-process engine
gives for it, take the guide's bench line and stop cleanly. The single-node serve line is node
0's line without the multi-node flags (checked), so that run serves it too."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from deepserve.cli.main import main
from tests.cli.conftest import REPO
from tests.cli.guide_runs import client, engine, greedy_text, guide, stop_cleanly
from tests.cli.guides import curl_bodies, set_flags, set_model
from tests.engine.test_dp_multinode import free_ports
from tests.server.conftest import launch, server_env


@pytest.fixture(scope="module")
def tiny_r1_w8a8(tiny_r1, tmp_path_factory):
    """The tiny R1 as vllm-ascend's DeepSeek-R1-W8A8 is stored: msModelSlim W8A8 (int8 weights,
    quant_model_description.json)."""
    from deepserve.quant import quantize_checkpoint
    from tests.quant.test_modelslim import to_modelslim

    root = tmp_path_factory.mktemp("w8a8")
    quantize_checkpoint(tiny_r1, root / "ct", "w8a8-int8", progress=False)
    return to_modelslim(root / "ct", root / "DeepSeek-R1-W8A8")


@pytest.fixture(scope="module")
def ascend_request(reference, tiny_r1_w8a8):
    """The guide's curl body and what one in-process engine answers it with on the W8A8 checkpoint."""
    ((_, body),) = curl_bodies(reference / "vllm-ascend-w8a8.md")
    assert body == {"model": "deepseek_r1", "prompt": "The future of AI is", "max_completion_tokens": 50,
                    "temperature": 0}
    with engine(tiny_r1_w8a8, quantization="ascend") as w8a8:
        return body, greedy_text(w8a8, body["prompt"], 50)


def ask_ascend(server, body: dict):
    """The guide's request; the openai client's completions.create has no max_completion_tokens,
    so that field is sent as written in the body."""
    fields = {k: v for k, v in body.items() if k != "max_completion_tokens"}
    r = client(server).completions.create(**fields, extra_body={"max_completion_tokens": body["max_completion_tokens"]})
    return r.choices[0].text, r.usage.completion_tokens, r.model


def draft_tokens(server) -> float:
    """Draft tokens the server's engine cores proposed so far (vLLM's /metrics counter)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(re.search(r"^vllm:spec_decode_num_draft_tokens_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_vllm_ascend_single_node_line_is_node0_without_the_node_flags(reference):
    cmd, node0, _, _ = guide(reference, "vllm-ascend-w8a8.md")
    rest = list(node0)
    for flag in ("--data-parallel-size-local", "--data-parallel-address", "--data-parallel-rpc-port"):
        at = rest.index(flag)
        del rest[at:at + 2]   # the flag and its value
    assert rest == cmd


def test_vllm_ascend_two_nodes_headless_on_loopback_and_bench(reference, tiny_r1_w8a8, ascend_request, tmp_path):
    """Node 0 serves the API and DP rank 0; node 1 (`--headless`, start rank 1) runs DP rank 1;
    both "nodes" are process trees on 127.0.0.1, as the guide's two scripts with the sizes halved.
    The guide's `vllm bench serve` line then runs against node 0."""
    _, node0, node1, bench_serve = guide(reference, "vllm-ascend-w8a8.md")
    assert "--headless" in node1 and "--headless" not in node0
    port = free_ports(4)   # the rpc port and the ones after it that the DP ranks take
    scaled = {"--data-parallel-size": 2, "--data-parallel-size-local": 1,
              "--data-parallel-start-rank": 1, "--data-parallel-address": "127.0.0.1",
              "--data-parallel-rpc-port": port, "--tensor-parallel-size": 1, "--max-model-len": 256,
              "--max-num-batched-tokens": 256}
    node0, node1 = (set_flags(set_model(c, str(tiny_r1_w8a8)), scaled) for c in (node0, node1))
    assert "--data-parallel-start-rank" not in node0 and node1[node1.index("--data-parallel-start-rank") + 1] == "1"
    body, expected = ascend_request
    log = tmp_path / "node1.log"
    with log.open("w") as out:
        headless = subprocess.Popen([sys.executable, "-m", "deepserve", *node1], env=server_env(), cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = launch(*node0[1:], timeout=300)
        try:
            assert ask_ascend(server, body) == (expected, 50, "deepseek_r1")
            assert draft_tokens(server) > 0   # the MTP layer drafted, verified to plain greedy's text

            # `vllm bench serve --model path/DeepSeek-R1-W8A8 ...` against the deepseek_r1 server
            bench = set_flags(set_model(bench_serve, str(tiny_r1_w8a8)), {
                "--random-input": 16, "--num-prompts": 3, "--request-rate": 50, "--result-dir": str(tmp_path)})
            assert main(bench + ["--random-output-len", "4", "--base-url", server.url, "--disable-tqdm"]) == 0
            (saved,) = tmp_path.glob("openai-50.0qps-DeepSeek-R1-W8A8-*.json")
            result = json.loads(saved.read_text())
            assert (result["completed"], result["failed"], result["total_input_tokens"]) == (3, 0, 48)
        finally:
            stop_cleanly(server)
        # node 0's shutdown stops node 1's engine cores
        assert headless.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if headless.poll() is None:
            headless.kill()
            headless.wait()
