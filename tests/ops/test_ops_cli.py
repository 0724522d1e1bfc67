"""`deepserve ops` lists every op of the registry with its backends and the one that runs
under the chosen --ops (or DEEPSERVE_OPS), resolved as the engine resolves it."""
from __future__ import annotations

import pytest

from deepserve.cli.main import main
from deepserve.ops.registry import resolve


def _table(capsys, argv):
    assert main(["ops", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    chosen = lines[0].split()[1]
    assert lines[1].split() == ["op", "backends", "runs"]
    rows = {}
    for line in lines[2:]:
        if ":" in line or not line.strip():
            break
        op, rest = line.split(None, 1)
        backends, runs = rest.rsplit("  ", 1)
        rows[op] = ([b.strip() for b in backends.split(",")], runs.strip())
    return chosen, rows


@pytest.fixture
def no_ops_env(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_OPS", raising=False)
    monkeypatch.delenv("USE_FLAGGEMS", raising=False)
    monkeypatch.delenv("DEEPSERVE_TESTCHIP", raising=False)


def test_ops_command_lists_backends(triton_ops, capsys, no_ops_env):
    chosen, rows = _table(capsys, ["--ops", "triton"])
    assert chosen == "triton"
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "write_kv_cache",
               "paged_attention", "moe_route", "fused_moe", "sample", "linear"):
        assert rows[op][0][:2] == ["torch", "triton"], (op, rows[op])       # built-ins first
    for op, (backends, runs) in rows.items():
        # an op without a Triton kernel runs its torch reference
        assert runs == ("triton" if "triton" in backends else "torch"), (op, backends, runs)
        assert runs == resolve(op, "triton")[0]


def test_ops_command_resolves_env_and_auto(triton_ops, capsys, monkeypatch, no_ops_env):
    monkeypatch.setenv("DEEPSERVE_OPS", "torch")
    chosen, rows = _table(capsys, [])
    assert chosen == "torch" and {runs for _, runs in rows.values()} == {"torch"}
    monkeypatch.setenv("DEEPSERVE_OPS", "triton-all")
    chosen, rows = _table(capsys, [])
    assert chosen == "triton-all" and rows["linear"][1] == "triton"
    monkeypatch.delenv("DEEPSERVE_OPS")
    chosen, rows = _table(capsys, ["--device", "cpu"])               # auto on the CPU platform: torch
    assert chosen == "torch" and rows["paged_attention"][1] == "torch"
    chosen, rows = _table(capsys, ["--ops", "flaggems"])
    # deepserve's Triton kernels run; FlagGems takes the aten ops beneath the torch references
    for op, (_, ran) in rows.items():
        expected = resolve(op, "triton")[0]
        assert ran == ("torch (aten under FlagGems)" if expected == "torch" else expected), (op, ran)
    assert rows["rms_norm"][1] == "triton" and rows["paged_attention"][1] == "triton"


def test_ops_command_bad_backend_is_one_line(capsys, no_ops_env):
    assert main(["ops", "--ops", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == ("deepserve ops: error: ops must be auto, torch, triton, "
                                               "triton-all or flaggems, got 'cuda'")
