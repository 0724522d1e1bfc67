"""The out-of-tree test platform (tests/platform_pkg, installed in CI by .ci/run) found through
the `deepserve.platforms` entry point: selected at start, its own ops and dist backends used,
and the demo model's greedy text equal to the CPU platform's."""
from __future__ import annotations

import datetime
from importlib.metadata import entry_points

import httpx
import openai
import pytest
import torch
import torch.distributed as dist

import deepserve.platforms as platforms
from deepserve import LLM, SamplingParams
from deepserve.server.metrics import parse_metrics
from tests.conftest import DEMO_MODEL
from tests.server.conftest import launch

if not any(ep.name == "testchip" for ep in entry_points(group="deepserve.platforms")):
    pytest.skip("the test platform is not installed: pip install -e tests/platform_pkg", allow_module_level=True)

PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture
def chip_visible(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_TESTCHIP", "1")
    monkeypatch.delenv("DEEPSERVE_OPS", raising=False)
    monkeypatch.delenv("USE_FLAGGEMS", raising=False)


def _greedy(device: str):
    """The engine, its greedy texts and the op calls of its start-up step."""
    llm = LLM(str(DEMO_MODEL), device=device, max_model_len=128)
    texts = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]
    return llm, texts, dict(llm.engine.runner.ops.counts)


@pytest.fixture(scope="module")
def cpu_texts():
    """The demo model's greedy texts on the built-in cpu platform, torch ops."""
    _, texts, calls = _greedy("cpu")
    assert all(backend == "torch" for _, backend in calls) and all(len(t) > 20 for t in texts)
    return texts


def test_entry_point_platform_is_discovered(monkeypatch):
    import deepserve_testchip
    assert "testchip" in platforms.available_platforms()
    monkeypatch.delenv("DEEPSERVE_TESTCHIP", raising=False)
    with pytest.raises(RuntimeError, match="device 'testchip' requested but not available"):
        platforms.get_platform("testchip")
    assert platforms.get_platform("auto").name != "testchip"      # only where its chip is visible
    monkeypatch.setenv("DEEPSERVE_TESTCHIP", "1")
    chip = platforms.get_platform("auto")
    assert isinstance(chip, deepserve_testchip.TestChipPlatform)
    assert (chip.name, chip.default_ops, chip.dist_backend) == ("testchip", "testchip", "testccl")


def test_demo_model_on_the_test_platform_equals_cpu(cpu_texts, chip_visible):
    llm, got, chip_calls = _greedy("auto")                         # picked at start: the visible chip
    assert llm.engine.platform.name == "testchip"
    assert llm.engine.runner.ops.name == "testchip"
    assert got == cpu_texts
    # the chip's own kernels ran (norms, activation); ops it lacks ran the torch reference
    assert chip_calls[("fused_add_rms_norm", "testchip")] > 0 and chip_calls[("silu_and_mul", "testchip")] > 0
    assert ("fused_add_rms_norm", "torch") not in chip_calls and chip_calls[("linear", "torch")] > 0


def test_the_platform_dist_backend_runs_collectives(chip_visible):
    """What init_distributed does with platform.dist_backend, on one rank (the engine's TP=2 run
    costs two spawned workers; the group is the same)."""
    platform = platforms.get_platform("testchip")
    assert dist.Backend.TESTCCL == platform.dist_backend
    if dist.is_initialized():
        pytest.skip("a process group is already live in this process")
    dist.init_process_group(platform.dist_backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        assert dist.get_backend() == "testccl"
        t = torch.tensor([1.0, 2.0])
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 2.0]
        gathered = [torch.zeros(2)]
        dist.all_gather(gathered, torch.tensor([3.0, 4.0]))
        assert gathered[0].tolist() == [3.0, 4.0]
    finally:
        dist.destroy_process_group()


def test_server_on_the_test_platform_serves_the_cpu_text(cpu_texts, chip_visible):
    """`deepserve serve --device testchip`: the API's greedy completions equal the CPU platform's."""
    server = launch("--model", str(DEMO_MODEL), "--device", "testchip", "--max-model-len", "128")
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="none", max_retries=0, timeout=120)
        got = [client.completions.create(model=client.models.list().data[0].id, prompt=p, max_tokens=24,
                                         temperature=0).choices[0].text for p in PROMPTS]
        metrics = parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)
    finally:
        server.stop()
    assert got == cpu_texts
    calls = {k: v for k, v in metrics.items() if k.startswith("deepserve:op_calls_total")}
    assert len(calls) == 1 and next(iter(calls.values())) > 0       # the chip's ops ran, none as Triton
    assert all(v == 0 for k, v in metrics.items() if k.startswith("deepserve:triton_op_calls_total"))
