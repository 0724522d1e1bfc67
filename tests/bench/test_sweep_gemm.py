"""benchmarks/sweep_gemm.py: the candidates it times (split-K where output tiles leave SMs idle),
the rule it writes for every swept bucket (the best Triton tiles, backend by the margin), and a
whole interpreted run whose written table the GEMM then reads."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import benchmark_module
from deepserve.ops.triton import launch_config as lc

sweep = benchmark_module("sweep_gemm")
H100 = SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=int(79.6 * 2**30))


def test_split_k_is_tried_where_output_tiles_leave_sms_idle():
    tile = sweep.setting(64, 64, 128, 4, 3)
    # 8B at decode batch 64: o_proj and down give 64 output tiles to 132 SMs
    assert sweep.split_ks(tile, 64, 4096, 4096, 132) == [2, 4, 8]
    assert sweep.split_ks(tile, 64, 4096, 14336, 132) == [2, 4, 8]
    assert sweep.split_ks(tile, 64, 6144, 4096, 132) == [2, 4]          # 96 tiles: at most 4 programs an SM
    assert sweep.split_ks(tile, 64, 28672, 4096, 132) == []             # 448 tiles: every SM busy
    assert sweep.split_ks(tile, 64, 4096, 1024, 132) == [2]             # 8 K steps: 4 a split at least
    assert sweep.split_ks(tile, 512, 4096, 4096, 132) == []             # past SPLIT_MAX_M rows
    assert [c["BLOCK_M"] for c in sweep.tile_candidates(4)] == [16] * 4
    assert {c["BLOCK_N"] for c in sweep.tile_candidates(64)} == {32, 64, 128}
    assert all(c["SPLIT_K"] == 1 for m in (16, 64, 256, 4096) for c in sweep.tile_candidates(m))


def test_every_bucket_gets_a_rule_with_the_best_tiles():
    best = sweep.setting(64, 32, 128, 4, 4, split=4)
    faster = sweep.bucket_rule(16, 64, 4096, 14336, cublas_ms=0.050, best_ms=0.045, best=best, margin=0.02)
    assert faster == {"if": {"m_gt": 16, "m_le": 64, "n": 4096, "k": 14336}, "set": {"backend": "triton", **best}}
    within = sweep.bucket_rule(16, 64, 4096, 14336, cublas_ms=0.050, best_ms=0.0495, best=best, margin=0.02)
    assert within["set"] == {"backend": "cublas", **best}        # not by the margin: cuBLAS, same tiles
    assert sweep.read_bound_ms(64, 4096, 14336, 2e12) == pytest.approx(
        (4096 * 14336 + 64 * 14336 + 64 * 4096) * 2 / 2e12 * 1e3)
    with pytest.raises(SystemExit, match="--shapes takes NxK"):
        sweep.parse_shape("4096")


def test_written_rules_reach_the_forced_triton_path(tmp_path, monkeypatch):
    """Rules saved as --write saves them, read on an H100: the bucket's tiles for every M in it,
    the default table's outside, and `use_gemm(force_triton=True)` hands them to the kernel."""
    from deepserve.ops.triton import gemm as gemm_mod
    device = torch.device("cuda", 0)
    monkeypatch.setattr(lc, "interpreting", lambda: False)
    monkeypatch.setattr(lc, "device_properties", lambda dev: H100)
    (tmp_path / "gemm").mkdir()
    (tmp_path / "gemm" / "default.json").write_text((lc.CONFIG_DIR / "gemm" / "default.json").read_text())
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    lc.tables_changed()
    try:
        split = sweep.setting(64, 64, 128, 4, 3, split=4)
        wide = sweep.setting(64, 128, 64, 4, 4)
        rules = [sweep.bucket_rule(16, 64, 4096, 14336, 0.050, 0.052, split, 0.02),
                 sweep.bucket_rule(16, 64, 28672, 4096, 0.100, 0.090, wide, 0.02)]
        path = lc.save_rules("gemm", lc.device_key(device), rules)
        assert path == tmp_path / "gemm" / "sm90-132sm-80g.json" and json.loads(path.read_text()) == rules
        for m in (17, 48, 64):
            assert gemm_mod.gemm_config(m, 4096, 14336, device) == {"backend": "cublas", **split}
            assert gemm_mod.gemm_config(m, 28672, 4096, device) == {"backend": "triton", **wide}
        assert gemm_mod.gemm_config(65, 4096, 14336, device)["SPLIT_K"] == 1       # the default's beyond
        assert gemm_mod.gemm_config(64, 4096, 4096, device)["SPLIT_K"] == 1        # another shape
        x, w = torch.empty(64, 14336, dtype=torch.bfloat16), torch.empty(4096, 14336, dtype=torch.bfloat16)
        monkeypatch.setattr(gemm_mod, "interpreting", lambda: True)             # x on the CPU passes as a device
        assert gemm_mod.use_gemm(x, w) is None
        assert gemm_mod.use_gemm(x, w, force_triton=True) == {"backend": "cublas", **split}
    finally:
        lc.tables_changed()


def test_interpreted_sweep_writes_its_rules(tmp_path, capsys):
    """The script end to end under the interpreter (its logic; the timings mean nothing): one
    shape, one bucket, split-K among the candidates, the rule written and the summary printed."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreted run is for CPU-only hosts")
    out = tmp_path / "sweep.json"
    assert sweep.main(["--device", "cpu", "--shapes", "16x896", "--buckets", "16", "--write",
                       "--config-dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["m"], row["n"], row["k"]) == (16, 16, 896)
    assert any(name.split()[1] == "s2" for name in row["all_ms"])          # a split-K setting was timed
    (rule,) = json.loads((tmp_path / "gemm" / "interpreter.json").read_text())
    assert rule["if"] == {"m_gt": 4, "m_le": 16, "n": 16, "k": 896}
    assert {k: rule["set"][k] for k in sweep.SETTING_KEYS} == row["triton_cfg"]
    assert "| 16x896 | 16 |" in capsys.readouterr().out


def test_the_best_setting_is_tiles_only_when_the_tables_own_setting_wins(monkeypatch):
    """The table's setting is timed first and carries a backend; when it is the fastest, the
    best setting returned (the rule's tiles, the row's triton_cfg) is its tiles alone."""
    pytest.importorskip("triton")
    monkeypatch.setattr(sweep, "try_setting", lambda *a, **k: (next(clock), 0.0, ""))
    clock = iter(range(1, 1000))     # each setting timed slower than the one before
    x, w = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(16, 64, dtype=torch.bfloat16)
    table_cfg = {"backend": "cublas", **sweep.setting(32, 64, 64, 1, 1)}
    best_ms, best, table_ms, _ = sweep.sweep_bucket(x, [w], table_cfg, 2, None, limit=2)
    assert best_ms == table_ms == 1
    assert best == {key: table_cfg[key] for key in sweep.SETTING_KEYS}
