"""benchmarks/bench_r1's fp8 / bf16 ratio on a cut too big for bf16 experts: the bf16 step read
off the line through two measured bf16 cuts (a decode step is a + m * c in its MoE layers m)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.bench.conftest import benchmark_module

br = benchmark_module("bench_r1")


def figure(name: str, value: float, device: str = "GPU A") -> dict:
    return {"name": name, "value": value, "unit": "tok/s", "device": device, "date": "d", "command": name}


def test_line_through_two_bf16_cuts():
    a, c = 1.5e-3, 0.4e-3                  # seconds a step: dense part, and per MoE layer
    rate = lambda m, batch=1: batch / (a + m * c)   # noqa: E731
    found = [figure("bf16_3d2m_decode_b1", rate(2)), figure("bf16_3d4m_decode_b1", rate(4)),
             figure("fp8_3d8m_decode_b1", 1000.0), figure("fp8_3d4m_decode_b1", 900.0),
             figure("bf16_3d2m_decode_b64", rate(2, 64)), figure("bf16_3d4m_decode_b64", rate(4, 64)),
             figure("fp8_3d8m_decode_b64", 9000.0)]
    out = {e["name"]: e for e in br.extrapolated_ratios(found)}
    assert set(out) == {"fp8_over_bf16_3d8m_decode_b1_extrapolated",
                        "fp8_over_bf16_3d8m_decode_b64_extrapolated"}
    b1 = out["fp8_over_bf16_3d8m_decode_b1_extrapolated"]
    assert b1["bf16_tok_s_extrapolated"] == pytest.approx(rate(8), rel=1e-12)
    assert b1["value"] == pytest.approx(1000.0 / rate(8), rel=1e-12)
    assert b1["bf16_ms_per_moe_layer"] == pytest.approx(c * 1e3, rel=1e-9)
    assert b1["target"] == br.TARGETS["fp8_over_bf16_b1"]
    b64 = out["fp8_over_bf16_3d8m_decode_b64_extrapolated"]
    assert b64["value"] == pytest.approx(9000.0 / rate(8, 64), rel=1e-12)
    assert b64["bf16_ms_per_moe_layer"] == pytest.approx(c * 1e3, rel=1e-9)
    assert b64["target"] is None


def test_needs_two_bf16_cuts_on_the_same_device():
    found = [figure("bf16_3d2m_decode_b1", 400.0), figure("bf16_3d4m_decode_b1", 300.0, device="GPU B"),
             figure("fp8_3d8m_decode_b1", 500.0)]
    assert br.extrapolated_ratios(found) == []


def test_table_writes_the_extrapolated_ratio(tmp_path, capsys):
    for name, value in [("bf16_3d2m_decode_b1", 400.0), ("bf16_3d4m_decode_b1", 320.0),
                        ("fp8_3d8m_decode_b1", 400.0)]:
        (tmp_path / f"r1_{name}.json").write_text(json.dumps(figure(name, value)))
    br.case_table(SimpleNamespace(out_dir=str(tmp_path)), [])
    entry = json.loads((tmp_path / "r1_fp8_over_bf16_3d8m_decode_b1_extrapolated.json").read_text())
    # 1/400 + 2 x (1/320 - 1/400) / 2 layers a step ... at 8 layers: 1/400 + 6 x 3.125e-4 s a token
    assert entry["bf16_tok_s_extrapolated"] == pytest.approx(1 / (1 / 400 + 6 * (1 / 320 - 1 / 400) / 2))
    assert "fp8_over_bf16_3d8m_decode_b1_extrapolated" in capsys.readouterr().out
