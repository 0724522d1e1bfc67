"""benchmarks/trace_steps.py on a synthetic torch-profiler trace: the steps' GPU ranges parsed
from vLLM's annotation names, kernels' busy time (overlaps counted once, parts outside a step
cut off), periods between steps, the groups and the side-by-side ratio."""
from __future__ import annotations

import gzip
import json

import pytest

from conftest import benchmark_module

steps_mod = benchmark_module("trace_steps")


def _trace(step_list, kernels):
    events = []
    for name, ts, dur in step_list:
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "ts": ts - 50, "dur": 40})   # host side
        events.append({"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": ts, "dur": dur})
    events += [{"ph": "X", "cat": "kernel", "name": f"k{i}", "ts": a, "dur": b - a} for i, (a, b) in enumerate(kernels)]
    events.append({"ph": "X", "cat": "gpu_user_annotation", "name": "not_a_step", "ts": 0, "dur": 10})
    return {"traceEvents": events}


DS = _trace([("execute_context_0(0)_generation_100(100)", 1000, 300),
             ("execute_context_0(0)_generation_120(120)", 1400, 300),
             ("execute_context_1(700)_generation_90(90)", 1800, 900)],
            [(990, 1100), (1050, 1200), (1250, 1300),     # step 1: 1000-1200 and 1250-1300 -> 250 us
             (1400, 1700),                                 # step 2: 300 us
             (1800, 2000), (2650, 2800)])                  # step 3: 200 + 50 (cut at 2700)
VLLM = _trace([("execute_context_0(0)_generation_100(100)", 0, 200),
               ("execute_context_0(0)_generation_110(110)", 250, 200)],
              [(0, 200), (250, 450)])


def test_steps_parsed_busy_and_periods(tmp_path):
    steps = steps_mod.steps_of(DS["traceEvents"])
    assert [(s["context"], s["context_tokens"], s["generation"], s["generation_tokens"]) for s in steps] == [
        (0, 0, 100, 100), (0, 0, 120, 120), (1, 700, 90, 90)]
    assert [s["busy_us"] for s in steps] == [250.0, 300.0, 250.0]
    assert [s["period_us"] for s in steps] == [400.0, 400.0, None]
    summary = steps_mod.summarize(steps)
    assert list(summary) == ["decode, batch 65-128", "mixed, 513-1024 prompt tokens"]
    dec = summary["decode, batch 65-128"]
    assert dec["steps"] == 2 and dec["mean_generation"] == 110
    assert dec["span_ms"] == pytest.approx(0.3) and dec["busy_ms"] == pytest.approx(0.275)
    assert dec["period_ms"] == pytest.approx(0.4) and dec["idle_share"] == pytest.approx(1 - 550 / 800)
    assert summary["mixed, 513-1024 prompt tokens"]["period_ms"] is None


def test_two_traces_side_by_side(tmp_path, capsys):
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    with gzip.open(ds_dir / "rank0.pt.trace.json.gz", "wt") as f:
        json.dump(DS, f)
    vllm = tmp_path / "vllm.json"
    vllm.write_text(json.dumps(VLLM))
    out = tmp_path / "steps.json"
    assert steps_mod.main([str(ds_dir), str(vllm), "--labels", "deepserve,vllm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("| decode, batch 65-128"))
    assert row.rstrip(" |").endswith("| 1.60")              # periods 0.4 vs 0.25 ms
    dump = json.loads(out.read_text())
    assert len(dump["deepserve"]["steps"]) == 3 and len(dump["vllm"]["steps"]) == 2


def test_a_trace_without_steps_is_one_line(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(SystemExit, match="no execute_context"):
        steps_mod.main([str(bare)])


def test_a_cpu_trace_gives_its_host_ranges():
    cpu = [{"ph": "X", "cat": "user_annotation", "name": "execute_context_1(12)_generation_0(0)", "ts": 10, "dur": 5},
           {"ph": "X", "cat": "user_annotation", "name": "execute_context_0(0)_generation_1(1)", "ts": 20, "dur": 3}]
    steps = steps_mod.steps_of(cpu)
    assert [(s["context_tokens"], s["generation"], s["span_us"], s["busy_us"], s["period_us"]) for s in steps] == [
        (12, 0, 5.0, None, 10.0), (0, 1, 3.0, None, None)]


def test_nested_and_fragment_ranges_are_one_step():
    """vLLM's trace: each decode step's range twice, one inside the other; a piecewise step as
    its range with fragments inside it; each is one step, and the period runs to the next."""
    dec, mix = "execute_context_0(0)_generation_235(235)", "execute_context_1(14)_generation_235(235)"
    trace = _trace([(dec, 0, 1000), (dec, 50, 900),
                    (mix, 1100, 1400), (mix, 1150, 4), (mix, 1200, 4), (mix, 2490, 4),
                    (dec, 2600, 1000), (dec, 2650, 900)],
                   [(0, 950), (1100, 1500), (2600, 3500)])
    steps = steps_mod.steps_of(trace["traceEvents"])
    assert [(s["context"], s["start_us"], s["span_us"], s["period_us"]) for s in steps] == [
        (0, 0.0, 1000.0, 1100.0), (1, 1100.0, 1400.0, 1500.0), (0, 2600.0, 1000.0, None)]
    assert [s["busy_us"] for s in steps] == [950.0, 400.0, 900.0]


def test_kernels_a_step_side_by_side(capsys, tmp_path):
    """Per group, each kernel's GPU time a step (mean over the group's steps), the two traces'
    tops together, and every kernel's sum."""
    dec = "execute_context_0(0)_generation_8(8)"
    a = {"traceEvents": _trace([(dec, 0, 100), (dec, 200, 100)], [])["traceEvents"] + [
        {"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d}
        for n, t, d in [("moe", 0, 60), ("attn", 60, 30), ("moe", 200, 80), ("attn", 280, 10)]]}
    b = {"traceEvents": _trace([(dec, 0, 100)], [])["traceEvents"] + [
        {"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": d}
        for n, t, d in [("fused_moe_kernel", 0, 50), ("flash_mla", 50, 20)]]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert steps_mod.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--labels", "ds,vllm",
                           "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "| moe | 0.070 | - |" in text and "| attn | 0.020 | - |" in text
    assert "| fused_moe_kernel | - | 0.050 |" in text and "| all kernels | 0.090 | 0.070 |" in text
    dump = json.loads((tmp_path / "s.json").read_text())
    assert dump["ds"]["summary"]["decode, batch 2-8"]["kernels_ms"] == pytest.approx({"moe": 0.07, "attn": 0.02})
    assert "kernels_us" not in dump["ds"]["steps"][0]


def test_saved_steps_summarized_again(tmp_path, capsys):
    """--steps-json: steps saved before the range merge, nested copies included, summarized as
    steps_of now gives them."""
    dec = "execute_context_0(0)_generation_235(235)"
    trace = _trace([(dec, 0, 1000), (dec, 50, 900), (dec, 1100, 1000), (dec, 1150, 900), (dec, 2200, 1000)],
                   [(0, 950), (1100, 2050), (2200, 3100)])
    unmerged = []
    for ev in trace["traceEvents"]:
        if ev["cat"] == "gpu_user_annotation" and ev["name"] == dec:
            unmerged.append({"context": 0, "context_tokens": 0, "generation": 235, "generation_tokens": 235,
                             "start_us": float(ev["ts"]), "span_us": float(ev["dur"]), "busy_us": 900.0})
    saved = tmp_path / "steps.json"
    saved.write_text(json.dumps({"vllm": {"steps": unmerged}}))
    again = steps_mod.resummarize(json.loads(saved.read_text()))["vllm"]["decode, batch 193-256"]
    direct = steps_mod.summarize(steps_mod.steps_of(trace["traceEvents"]))["decode, batch 193-256"]
    assert again["steps"] == direct["steps"] == 3
    assert again["period_ms"] == direct["period_ms"] == pytest.approx(1.1)
    assert steps_mod.main(["--steps-json", str(saved)]) == 0
    assert "| decode, batch 193-256 | 3 | 235 | 1.00 | 0.90 | 1.10 |" in capsys.readouterr().out
