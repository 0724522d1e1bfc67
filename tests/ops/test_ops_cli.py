"""`deepserve ops` lists every op of the registry with its backends."""
from __future__ import annotations

from deepserve.cli.main import main


def test_ops_command_lists_backends(triton_ops, capsys):
    assert main(["ops"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "backends"]
    table = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:] if line.strip()}
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "write_kv_cache",
               "paged_attention", "moe_route", "fused_moe", "sample"):
        assert table[op].startswith("torch, triton"), (op, table[op])
