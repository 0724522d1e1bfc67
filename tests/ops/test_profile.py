"""--ops-profile (deepserve/ops/profile.py): the kernel time of profiled steps attributed to
triton / blas / torch / memcpy. Each attribution is checked against a reference computed here
from the same profiler events by another route: on the CPU, every event's self time goes to
the Triton launch range above it (walking up its parents) or else to its own op; on CUDA,
device records are summed by name against the set of Triton kernel names."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.ops import profile
from deepserve.server.metrics import ServerMetrics, parse_metrics
from tests.conftest import DEMO_MODEL

BLAS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv"}


def reference_kinds_cpu(events) -> dict[str, float]:
    """µs per kind: each event's self time to the nearest Triton launch range above it (or
    itself), else blas for the BLAS matmuls, else torch; other user ranges hold no op time."""
    out = dict.fromkeys(profile.KINDS, 0.0)
    for e in events:
        node = e
        while node is not None and not node.name.startswith("triton::"):
            node = node.cpu_parent
        if node is not None:
            out["triton"] += e.self_cpu_time_total
        elif not e.is_user_annotation:
            out["blas" if e.name in BLAS else "torch"] += e.self_cpu_time_total
    return out


def assert_kinds_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for kind in want:  # one sum of self times against sums of inclusive times: rounding only
        assert got[kind] == pytest.approx(want[kind], rel=1e-9, abs=1e-6), kind


def test_kernel_kinds_of_cuda_kernel_names():
    """Names as CUPTI reports them on an H100 (benchmarks/profile_decode.py output)."""
    names = {"_rms_norm_kernel"}
    cases = {
        "_rms_norm_kernel": "triton",
        "triton_poi_fused_add_0": "triton",
        "nvjet_tst_128x64_64x8_1x2_h_bz_coopB_NNT": "blas",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)": "blas",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>(...)": "blas",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "blas",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3": "blas",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>(...)": "torch",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...> >(...)": "torch",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4> >(...)": "torch",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "torch",
        "Memcpy DtoD (Device -> Device)": "memcpy",
        "Memset (Device)": "memcpy",
    }
    assert {n: profile.kernel_kind(n, names) for n in cases} == cases


def test_cpu_triton_launch_counts_as_triton():
    """An interpreted Triton kernel counts as its launch's whole CPU time, once per launch;
    the aten ops around it keep their own kinds."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CPU view of a Triton launch: kernels interpreted (tests/ops/conftest.py)")
    from deepserve.ops.triton import norm

    x, w = torch.randn(4, 64), torch.randn(64)
    with profile.capture(cuda=False) as prof:
        norm.rms_norm(x, w, 1e-6)
        norm.rms_norm(x, w, 1e-6)
        y = torch.mm(x, x.T) + 1
    report = profile.OpsTimeReport()
    report.add(profile.cpu_records(prof.events()), steps=1)
    kernel = profile.TRITON_RANGE + profile.kernel_name(norm._rms_norm_kernel)
    assert report.kernels[kernel][0] == 2  # two launches
    assert report.kernels["aten::mm"][0] == 1 and y.shape == (4, 4)
    kinds = report.kinds_us()
    assert_kinds_equal(kinds, reference_kinds_cpu(prof.events()))
    assert kinds["triton"] > 0 and kinds["blas"] > 0 and kinds["torch"] > 0
    assert sum(report.shares().values()) == pytest.approx(1.0)


def test_engine_ops_profile_startup_windows_and_metrics(monkeypatch):
    """The demo model with ops_profile: the start-up report and a serving window, each equal
    to the reference of its own capture's events, summed since start; /metrics shares."""
    monkeypatch.setattr(profile, "FIRST_WINDOW_STEP", 2)
    monkeypatch.setattr(profile, "WINDOW_STEPS", 3)
    llm = LLM(str(DEMO_MODEL), ops="torch", max_model_len=64, ops_profile=True, device="cpu")
    try:
        prof = llm.engine.ops_profiler
        start = dict(prof.report.kinds_us())
        assert prof.report.steps >= 8  # a prefill and 7 decode steps at least
        assert_kinds_equal(start, reference_kinds_cpu(prof.last_profile.events()))
        assert start["blas"] > 0 and start["torch"] > 0 and start["triton"] == 0
        assert llm.engine.gauges()["generation_tokens"] == 0  # the start-up generation is not counted

        startup_profile, startup_steps = prof.last_profile, prof.report.steps
        # 8 steps (a prefill, 7 decodes): the window opens before step 2 and closes before step 5
        llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        assert prof.last_profile is not startup_profile and prof.report.steps == startup_steps + 3
        window = reference_kinds_cpu(prof.last_profile.events())
        assert_kinds_equal(prof.report.kinds_us(), {k: start[k] + window[k] for k in start})

        values = parse_metrics(ServerMetrics("demo", llm.engine.gauges).render())
        shares = {k: values[f'deepserve:ops_time_share{{model_name="demo",engine="0",kind="{k}"}}'] for k in profile.KINDS}
        assert shares == pytest.approx(prof.report.shares()) and sum(shares.values()) == pytest.approx(1.0)
        assert values[f'vllm:ops_time_share{{model_name="demo",engine="0",kind="blas"}}'] == shares["blas"]
        assert values['deepserve:ops_profiled_steps_total{model_name="demo",engine="0"}'] == prof.report.steps
    finally:
        llm.shutdown()


def test_no_ops_profile_no_metric():
    values = parse_metrics(ServerMetrics("demo", lambda: {"op_calls": 3}).render())
    assert not any("ops_time_share" in k for k in values)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton-all"])
def test_cuda_ops_profile_attributes_kernel_time(backend):
    """CUDA: the start-up capture's kernel time by kind equals the device records summed here
    by name; the torch path spends none in Triton kernels and some in cuBLAS, triton-all some
    in Triton kernels."""
    llm = LLM(str(DEMO_MODEL), ops=backend, max_model_len=64, ops_profile=True, device="cuda")
    try:
        prof = llm.engine.ops_profiler
        names = prof.report.triton_names
        want = dict.fromkeys(profile.KINDS, 0.0)
        for e in prof.last_profile.events():
            if str(e.device_type).endswith("CUDA") and not e.name.startswith("cuda"):
                low = e.name.lower()
                kind = ("memcpy" if "memcpy" in low or "memset" in low else "triton" if e.name in names
                        else "blas" if any(s in low for s in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas"))
                        else "torch")
                want[kind] += e.time_range.elapsed_us()
        assert_kinds_equal(prof.report.kinds_us(), want)
        if backend == "torch":
            assert want["triton"] == 0 and want["blas"] > 0
        else:
            assert want["triton"] > 0
    finally:
        llm.shutdown()


def test_ops_cli_profile_table(capsys):
    """`deepserve ops --profile MODEL`: the kinds' shares (summing to 100%) and the top kernels;
    a bad --hf-overrides is a one-line error."""
    from deepserve.cli.main import main

    assert main(["ops", "--profile", str(DEMO_MODEL), "--ops", "torch", "--device", "cpu", "--max-model-len", "64",
                 "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("--ops torch") and "steps profiled" in lines[1]
    shares = {ln.split()[0]: float(ln.split()[2].rstrip("%")) for ln in lines[3:3 + len(profile.KINDS)]}
    assert set(shares) == set(profile.KINDS) and sum(shares.values()) == pytest.approx(100, abs=0.3)
    kernels = lines[4 + len(profile.KINDS):]
    assert len(kernels) == 3 and all(ln.split()[1] in profile.KINDS for ln in kernels)
    assert main(["ops", "--profile", str(DEMO_MODEL), "--hf-overrides", "[2]"]) == 2
    assert capsys.readouterr().err.strip() == "deepserve ops: error: --hf-overrides must be a JSON object, got '[2]'"


def test_ops_profile_flag_and_yaml_key(tmp_path):
    import argparse

    from deepserve.config import EngineArgs
    from deepserve.server.config_file import load_serve_config

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--ops-profile"])).ops_profile is True
    assert EngineArgs.from_cli_args(parser.parse_args([])).ops_profile is False
    path = tmp_path / "serve.yaml"
    path.write_text("engine_args:\n  model: demo\n  ops-profile: true\n")
    assert load_serve_config(path).engine_args["ops_profile"] is True


def test_window_that_cannot_start_leaves_steps_running(monkeypatch, caplog):
    """A profiler already running (torch allows one): the step goes on, a warning says so,
    and no later window tries again."""
    prof = profile.OpsProfiler(cuda=False)
    tries = []

    def busy(cuda):
        tries.append(cuda)
        raise RuntimeError("Profiler is already enabled on this thread")
    monkeypatch.setattr(profile, "capture", busy)
    for step in range(2 * profile.EVERY_STEPS):
        prof.tick(step)
    assert tries == [False] and prof.report.steps == 0
    assert "no more step windows profiled: Profiler is already enabled" in caplog.text


def test_kernel_names_through_wrappers_and_live_kernels():
    """A kernel wrapped by autotune / heuristics is named by its function; one made at run
    time outside deepserve (as FlagGems generates its pointwise kernels) is found alive."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({}, num_warps=1)], key=["n"])
    @triton.heuristics({"EVEN": lambda args: args["n"] % 2 == 0})
    @triton.jit
    def _made_at_run_time_kernel(x_ptr, n, EVEN: tl.constexpr):
        pass

    assert profile.kernel_name(_made_at_run_time_kernel) == "_made_at_run_time_kernel"
    assert profile.kernel_name(_made_at_run_time_kernel.fn) == "_made_at_run_time_kernel"
    assert profile.kernel_name(torch.nn.Linear(2, 2)) is None and profile.kernel_name("x") is None
    assert "_made_at_run_time_kernel" in profile.live_triton_kernel_names()
    assert "_made_at_run_time_kernel" not in profile.triton_kernel_names()
    assert "_rms_norm_kernel" in profile.triton_kernel_names()


class _FakeDeviceEvent:
    """What device_records reads of a CUDA profiler event."""

    device_type = "DeviceType.CUDA"

    def __init__(self, name, us):
        self.name, self.us = name, us
        self.time_range = self

    def elapsed_us(self):
        return self.us


def test_unknown_kernel_found_among_live_triton_kernels():
    """A CUDA capture naming a kernel deepserve does not define (FlagGems' generated ones): the
    live Triton kernels are looked up once, and it counts as triton; cuBLAS and aten stay apart."""
    triton = pytest.importorskip("triton")

    @triton.jit
    def _generated_elsewhere_kernel(x_ptr):
        pass

    events = [_FakeDeviceEvent("_generated_elsewhere_kernel", 5.0), _FakeDeviceEvent("nvjet_tst_64x8_NNT", 3.0),
              _FakeDeviceEvent("void at::native::vectorized_elementwise_kernel<4>", 2.0),
              _FakeDeviceEvent("cudaLaunchKernel", 7.0), _FakeDeviceEvent("Memcpy HtoD (Pinned -> Device)", 1.0)]
    prof = profile.OpsProfiler(cuda=True)
    assert "_generated_elsewhere_kernel" not in prof.report.triton_names
    prof._record(type("P", (), {"events": lambda self: events})(), steps=1)
    assert prof.report.kinds_us() == {"triton": 5.0, "blas": 3.0, "torch": 2.0, "memcpy": 1.0}
    assert prof.gauges() == {"ops_time_us_triton": 5.0, "ops_time_us_blas": 3.0, "ops_time_us_torch": 2.0,
                             "ops_time_us_memcpy": 1.0, "ops_profiled_steps": 1}


def test_collectives_are_comm_and_not_looked_up_among_live_kernels(monkeypatch):
    """NCCL kernels and gloo / c10d ops form the group "comm" (kind torch): a window naming only
    them besides known kernels does not walk the process's objects for Triton kernels."""
    names = ["ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "gloo:all_reduce",
             "c10d::allreduce_"]
    assert {profile.kernel_group(n, set()) for n in names} == {"comm"}
    assert {profile.kernel_kind(n, set()) for n in names} == {"torch"}

    def no_lookup():
        raise AssertionError("live Triton kernels looked up for a collective")

    monkeypatch.setattr(profile, "live_triton_kernel_names", no_lookup)
    prof = profile.OpsProfiler(cuda=True)
    events = [_FakeDeviceEvent(names[0], 4.0), _FakeDeviceEvent("nvjet_tst_64x8_NNT", 3.0)]
    prof._record(type("P", (), {"events": lambda self: events})(), steps=1)
    assert prof.report.kinds_us() == {"triton": 0.0, "blas": 3.0, "torch": 4.0, "memcpy": 0.0}
