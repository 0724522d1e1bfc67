"""benchmarks/sweep_fused_moe.py's decode mode: the candidates it builds (vLLM's tiles among them)
and the launch-table rules it writes, read back through the op's own lookup."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import benchmark_module
from deepserve.ops.triton import fused_moe as fm
from deepserve.ops.triton import launch_config as lc

sweep = benchmark_module("sweep_fused_moe")
H200 = SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=int(139.8 * 2**30))
V2LITE = dict(experts=64, inter=1408)


def test_vllm_tiles_translate_to_our_kernels():
    # V2-Lite at batch 64: vLLM's default (the batch is no larger than the 64 experts) and the tuned
    # files' entries for M=64; at 128 its default turns to 64-row blocks
    tiles = sweep.vllm_tiles("v2lite", "bf16", 64, 64)
    assert tiles == {"vLLM default": (16, 32, 64, 1, 4, 3), "vLLM E=64,N=1408 B200": (16, 64, 128, 1, 4, 2),
                     "vLLM fork E=64,N=1408 H100": (16, 128, 128, 1, 8, 4),
                     "vLLM E=64,N=1280 H200": (16, 128, 128, 1, 8, 3)}
    assert sweep.vllm_tiles("v2lite", "bf16", 128, 64)["vLLM default"][:4] == (64, 64, 32, 8)
    assert sweep.vllm_tiles("r1", "fp8", 100, 256)["vLLM E=256,N=256 H200 fp8 (R1 at TP8)"] == (16, 128, 128, 16, 4, 3)
    # vLLM's BLOCK_SIZE_N spans gate and up: gate_up takes half of it as columns of each
    cand = sweep.from_vllm(*tiles["vLLM default"])
    assert cand == {"BLOCK_M": 16, "gate_up": dict(BLOCK_N=16, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
                    "down": dict(BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)}
    # tiles that leave a partial column block or step past K are not tried
    assert sweep.fits(cand, 2048, 1408)
    assert not sweep.fits({"gate_up": sweep.kernel(256, 64, 8, 3)}, 2048, 1408)     # 1408 = 5.5 x 256
    assert not sweep.fits({"down": sweep.kernel(64, 256, 4, 2)}, 128, 128)          # K step past I


def test_decode_stages_build_on_the_best_so_far():
    stages = sweep.decode_stages({"v": (16, 32, 64, 1, 4, 3)}, sweep.DECODE_TILES, False,
                                 lambda over: (over or {}).get("BLOCK_M", 16),
                                 lambda over: sweep.fits(over, 2048, 1408), lambda pairs: pairs)
    best = {"BLOCK_M": 32, "gate_up": {"BLOCK_N": 64}}
    assert stages[0](None) == [("v", sweep.from_vllm(16, 32, 64, 1, 4, 3))]
    gate_up = [c for _, c in stages[1](best)]
    assert len(gate_up) == len(sweep.DECODE_TILES["gate_up"]) - 1        # the 256-column tile does not fit
    assert gate_up[0] == {"BLOCK_M": 32, "gate_up": sweep.kernel(*sweep.DECODE_TILES["gate_up"][0])}
    down = [c for _, c in stages[2](best)]
    assert down[0] == dict(best, down=sweep.kernel(*sweep.DECODE_TILES["down"][0]))
    assert [c for _, c in stages[3](best)] == [
        {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 64}}, dict(best, W_TMA=False),
        {"BLOCK_M": 32, "gate_up": {"BLOCK_N": 64, "GROUP_M": 8}, "down": {"GROUP_M": 8}}]


def test_written_decode_rules_hold_only_over_their_range(tmp_path, monkeypatch):
    """Rules for V2-Lite bf16 measured at 1.5, 3, 6 and 24 rows per expert (the table's settings
    won at 3), saved as --write saves them, then read by the op on an H200: each winner's settings
    over its share of per_expert, the shipped table's elsewhere: between the winners, at 48 and
    more rows per expert (the compute-bound rules), for another I, for fp8."""
    device = torch.device("cuda", 0)
    monkeypatch.setattr(lc, "interpreting", lambda: False)
    monkeypatch.setattr(lc, "device_properties", lambda dev: H200)
    tiles = lambda per_expert, inter=1408, fp8=False: fm.sorted_tiles(  # noqa: E731
        round(per_expert * 64), 64, inter, fp8, 1 if fp8 else 2, device)
    shipped = {pe: tiles(pe) for pe in (3.0, 48.0, 64.0, 256.0)}

    def won(block_m, n, warps):
        return sweep.whole_settings(
            dict(shipped[3.0][0], BLOCK_M=block_m, BLOCK_N=n), dict(shipped[3.0][1], BLOCK_M=block_m, num_warps=warps))

    a, b, c = won(16, 32, 2), won(16, 128, 8), won(32, 64, 8)
    assert "BLOCK_M" not in a["down"] and a["BLOCK_M"] == 16
    rules = sweep.decode_rules([(1.5, a), (3.0, None), (6.0, b), (24.0, c)],
                               {"fp8": False, "elem_bytes": 2, "inter": 1408})
    (tmp_path / "fused_moe").mkdir()
    (tmp_path / "fused_moe" / "default.json").write_text((lc.CONFIG_DIR / "fused_moe" / "default.json").read_text())
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    lc.tables_changed()
    try:
        path = lc.save_rules("fused_moe", lc.device_key(device), rules)
        assert path == tmp_path / "fused_moe" / "sm90-132sm-144g.json"
        assert json.loads(path.read_text()) == rules
        for per_expert, want in ((1.0, a), (1.5, a), (2.1, a), (6.0, b), (11.9, b), (12.1, c), (24.0, c),
                                 (47.9, c)):
            gate_up, down = tiles(per_expert)
            assert gate_up == dict(want["gate_up"], BLOCK_M=want["BLOCK_M"], PREQUANT=want["PREQUANT"]), per_expert
            assert {key: down[key] for key in want["down"]} == want["down"], per_expert
        assert tiles(2.2) == tiles(3.0) == shipped[3.0]                  # the table's won here
        for per_expert in (48.0, 64.0, 256.0):
            assert tiles(per_expert) == shipped[per_expert]
        assert tiles(6.0, inter=2048) != tiles(6.0) and tiles(6.0, inter=2048)[0]["BLOCK_N"] == 64
        assert tiles(6.0, fp8=True)[0]["BLOCK_K"] == 128 and tiles(6.0, fp8=True)[1]["num_warps"] == 4
    finally:
        lc.tables_changed()


@pytest.mark.parametrize("tokens,message", [([4], "take fused_moe_small"), ([16, 512], "48 rows per expert")])
def test_decode_refuses_token_counts_outside_the_sorted_decode_regime(tokens, message):
    with pytest.raises(SystemExit, match=message):
        sweep.sweep_decode(SimpleNamespace(), "cpu", 2048, 1408, 64, 6, tokens)
    with pytest.raises(SystemExit, match="comma-separated integers"):
        sweep.token_list("16,x")
