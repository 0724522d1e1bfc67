"""Kernel launch settings as data: the rule tables, device matching, trials and sweeps' writes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from deepserve.ops.triton import launch_config as lc


def test_rules_apply_in_order_and_conditions_read_shapes():
    # the GEMV table: 1 row per program up to 4096 outputs, 1024-wide K steps where K allows
    assert lc.lookup("gemv", "", n=4096, k=4096, elements=4096 * 4096) == dict(BLOCK_N=1, BLOCK_K=1024, num_warps=4)
    assert lc.lookup("gemv", "", n=6144, k=1536, elements=6144 * 1536) == dict(BLOCK_N=2, BLOCK_K=512, num_warps=4)
    assert lc.lookup("gemv", "", n=128256, k=4096, elements=128256 * 4096)["num_warps"] == 8
    # down_slots: a 128 K step only where I is a multiple of 128 and not of 256
    assert lc.lookup("fused_moe_small", "", kernel="down_slots", fp8=False, inter=1408)["BLOCK_K"] == 128
    assert lc.lookup("fused_moe_small", "", kernel="down_slots", fp8=False, inter=2048)["BLOCK_K"] == 256
    # the sorted path by rows per expert: R1 at 8192 tokens (256 rows per expert), bf16 and fp8
    bf16 = dict(fp8=False, per_expert=256.0, elem_bytes=2)
    assert lc.lookup("fused_moe", "", kernel="gate_up", **bf16) == dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, PREQUANT=True)
    assert lc.lookup("fused_moe", "", kernel="down", **bf16)["BLOCK_N"] == 256
    fp8 = dict(fp8=True, per_expert=256.0, elem_bytes=1)
    assert lc.lookup("fused_moe", "", kernel="gate_up", **fp8)["BLOCK_M"] == 64
    assert lc.lookup("fused_moe", "", kernel="gate_up", fp8=True, per_expert=8.0, elem_bytes=1)["PREQUANT"] is False
    # weight-only fp8 (16-bit MMA operands, 128-wide K tiles widened in shared memory): narrow tiles
    a16 = lc.lookup("fused_moe", "", kernel="gate_up", fp8=True, per_expert=256.0, elem_bytes=2)
    assert (a16["BLOCK_K"], a16["BLOCK_N"], a16["num_stages"], a16["PREQUANT"]) == (128, 64, 2, False)


GIB = 2**30
# torch.cuda.get_device_properties of the devices the tables were measured on (total_memory as
# CUDA reports it, a little under the nominal size)
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                       total_memory=int(79.19 * GIB))
H200 = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=int(139.8 * GIB))
H200_NVL = SimpleNamespace(name="NVIDIA H200 NVL", major=9, minor=0, multi_processor_count=132,
                           total_memory=int(139.8 * GIB))
H100_PCIE = SimpleNamespace(name="NVIDIA H100 PCIe", major=9, minor=0, multi_processor_count=114,
                            total_memory=int(79.19 * GIB))
A100 = SimpleNamespace(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108,
                       total_memory=int(79.15 * GIB))
# the rules the tables keyed by device name gave a device named "...H200..." on top of the
# default (configs/<op>/H200.json before the key became the device's properties)
H200_NAMED_RULES = {
    "attention_decode": [{"if": {"mla": True, "heads_lt": 64, "block_size_multiple_of": 64},
                          "set": {"num_warps": 8}}],
    "fused_moe_small": [
        {"if": {"kernel": "gate_up", "fp8": True}, "set": {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 1}},
        {"if": {"kernel": "down", "fp8": True}, "set": {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 1}}],
}
OPS = ["attention_decode", "attention_prefill", "fp8_gemv", "fused_moe", "fused_moe_small", "gemm", "gemv", "int4",
       "mla_decode_fp8", "mla_prep"]


def test_device_keys_from_properties():
    assert lc.properties_key(H100) == "sm90-132sm-80g"
    assert lc.properties_key(H200) == lc.properties_key(H200_NVL) == "sm90-132sm-144g"
    assert lc.properties_key(H100_PCIE) == "sm90-114sm-80g"
    assert lc.properties_key(A100) == "sm80-108sm-80g"
    assert lc.properties_key(H100, hip=True) == "gfx90-132sm-80g"


@pytest.mark.parametrize("op", OPS)
def test_hopper_tables_keep_the_settings_they_had_by_name(op):
    """An H200 (SXM or NVL) gets the default's rules and its own table's (sm90-132sm-144g.json),
    which starts with what its named table held (sweeps' --write appends); the H100 SXM the
    default's and its own measured table's (sm90-132sm-80g.json, written by a sweep); the H100
    PCIe, the A100 and unknown devices the default alone."""
    default = lc.table(op, "")
    measured = {}
    for key in ("sm90-132sm-144g", "sm90-132sm-80g"):
        path = lc.CONFIG_DIR / op / f"{key}.json"
        measured[key] = tuple(json.loads(path.read_text())) if path.is_file() else ()
    named = tuple(H200_NAMED_RULES.get(op, ()))
    assert measured["sm90-132sm-144g"][:len(named)] == named
    assert lc.table(op, lc.properties_key(H200)) == default + measured["sm90-132sm-144g"]
    assert lc.table(op, lc.properties_key(H200_NVL)) == lc.table(op, lc.properties_key(H200))
    assert lc.table(op, lc.properties_key(H100)) == default + measured["sm90-132sm-80g"]
    for props in (H100_PCIE, A100):
        assert lc.table(op, lc.properties_key(props)) == default


@pytest.mark.parametrize("props,swept", [(H200, True), (H200_NVL, True), (H100, True), (H100_PCIE, False),
                                         (A100, False), (None, False)])
def test_launch_settings_follow_the_device_properties(props, swept, monkeypatch):
    """launch_settings on a (fake) CUDA device reads its properties: the fp8 down-kernel rows
    the H200 and H100 SXM sweeps wrote, the default's elsewhere (None: a device without CUDA
    properties)."""
    monkeypatch.setattr(lc, "interpreting", lambda: False)
    monkeypatch.setattr(lc, "device_properties", lambda device: props)
    got = lc.launch_settings("fused_moe_small", torch.device("cuda", 0), kernel="down", fp8=True, inter=2048)
    assert (got["BLOCK_N"], got["BLOCK_K"]) == ((16, 1024) if swept else (8, 256))


def test_a_table_applies_where_every_part_of_its_key_matches(tmp_path, monkeypatch):
    (tmp_path / "gemv").mkdir()
    for key, warps in (("default", 1), ("sm90", 2), ("sm90-132sm", 4), ("sm90-132sm-144g", 8), ("sm80", 16)):
        (tmp_path / "gemv" / f"{key}.json").write_text(lc.dumps([{"set": {"num_warps": warps}}]))
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    lc.tables_changed()
    try:
        warps = {key: [r["set"]["num_warps"] for r in lc.table("gemv", key)]
                 for key in ("sm90-132sm-144g", "sm90-132sm-80g", "sm90-114sm-80g", "sm89-128sm-32g", "")}
    finally:
        lc.tables_changed()
    # broader keys first, so the narrowest table's rules win
    assert warps == {"sm90-132sm-144g": [1, 2, 4, 8], "sm90-132sm-80g": [1, 2, 4], "sm90-114sm-80g": [1, 2],
                     "sm89-128sm-32g": [1], "": [1]}


def test_trying_adds_rules_only_inside_the_block():
    shape = dict(n=64, k=64, elements=64 * 64)
    before = lc.lookup("gemv", "", **shape)
    with lc.trying("gemv", [{"if": {"n_le": 64}, "set": {"num_warps": 2}}]):
        assert lc.lookup("gemv", "", **shape) == dict(before, num_warps=2)
        assert lc.lookup("gemv", "", n=65, k=64, elements=65 * 64)["num_warps"] == 4
    assert lc.lookup("gemv", "", **shape) == before
    with pytest.raises(KeyError, match="'m_le' names no shape variable"):
        with lc.trying("gemv", [{"if": {"m_le": 1}, "set": {}}]):
            lc.lookup("gemv", "", **shape)


def test_save_rules_replaces_same_conditions(tmp_path):
    (tmp_path / "gemv").mkdir()
    (tmp_path / "gemv" / "default.json").write_text(lc.dumps([{"set": {"BLOCK_N": 1}}]))
    rule = {"if": {"n": 8, "k": 64}, "set": {"BLOCK_N": 2}}
    path = lc.save_rules("gemv", "sm90-132sm-80g", [rule], folder=tmp_path)
    assert path == tmp_path / "gemv" / "sm90-132sm-80g.json"
    lc.save_rules("gemv", "sm90-132sm-80g", [dict(rule, set={"BLOCK_N": 4}), {"set": {"num_warps": 8}}], folder=tmp_path)
    assert json.loads(path.read_text()) == [{"if": {"n": 8, "k": 64}, "set": {"BLOCK_N": 4}}, {"set": {"num_warps": 8}}]


def test_range_conditions_share_the_axis_between_points():
    conds = lc.range_conditions("per_expert", [1.5, 6.0, 24.0], below=48)
    # geometric means 3 and 12 between neighbours; the last range stops short of 48
    assert conds == [{"per_expert_le": 3.0}, {"per_expert_gt": 3.0, "per_expert_le": 12.0},
                     {"per_expert_gt": 12.0, "per_expert_lt": 48}]
    owner = lambda v: [i for i, c in enumerate(conds) if all(lc._holds(k, x, {"per_expert": v}) for k, x in c.items())]
    assert [owner(v) for v in (0.5, 3.0, 3.01, 12.0, 47.9, 48.0, 300.0)] == [[0], [0], [1], [1], [2], [], []]
    assert lc.range_conditions("n", [2, 8]) == [{"n_le": 4.0}, {"n_gt": 4.0}]
    # a mean that rounds onto a point keeps its digits
    assert lc.range_conditions("n", [1.0, 1.0001])[0]["n_le"] == pytest.approx(1.00005)
    for points, below in (([], None), ([4.0, 2.0], None), ([0.0, 1.0], None), ([2.0, 2.0], None), ([64.0], 48)):
        with pytest.raises(ValueError, match="range_conditions"):
            lc.range_conditions("n", points, below)


def test_shipped_tables_are_well_formed():
    ops = sorted(p.name for p in lc.CONFIG_DIR.iterdir() if p.is_dir())
    assert ops == OPS
    for op in ops:
        assert (lc.CONFIG_DIR / op / "default.json").is_file()
        for path in (lc.CONFIG_DIR / op).glob("*.json"):
            assert lc.dumps(json.loads(path.read_text())) == path.read_text(), path   # as sweeps write them


def test_an_empty_table_is_written_as_an_empty_list(tmp_path):
    path = lc.save_rules("gemv", "sm90-132sm-80g", [], folder=tmp_path)
    assert path.read_text() == "[]\n" and lc._read(path) == []


def test_attention_and_mla_tables():
    # MLA decode: 16 heads take 64-key tiles in 64-token pages, 32-key ones in 16-token pages;
    # 128 heads 64 per program; the H200 gives the 16-head tile 8 warps
    mla16 = lc.lookup("attention_decode", lc.properties_key(H100), mla=True, heads=16, block_size=64)
    assert mla16 == dict(BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=4)
    assert lc.lookup("attention_decode", "", mla=True, heads=16, block_size=16)["BLOCK_N"] == 32
    assert lc.lookup("attention_decode", "", mla=True, heads=128, block_size=64) == dict(
        BLOCK_H=64, BLOCK_N=32, num_warps=8, num_stages=3, programs_per_sm=1)
    assert lc.lookup("attention_decode", lc.properties_key(H200), mla=True, heads=16, block_size=64)["num_warps"] == 8
    assert lc.lookup("attention_decode", lc.properties_key(H200), mla=False, heads=16, block_size=64)["num_warps"] == 4
    # the fp8-pool MLA decode (e4m3 MMAs): 16 heads a program at 4 warps, 32 at 8 warps from 32
    # heads on (64 a program spills at 8 warps; sm_90 SASS); the interpreter's 16-key tiles
    fp8 = dict(batch=64, ctx=4096, block_size=64)
    assert lc.lookup("mla_decode_fp8", "", heads=16, **fp8) == dict(
        BLOCK_H=16, BLOCK_N=64, num_warps=4, num_stages=3, programs_per_sm=4, min_split=256, maxnreg=0, dv_run=1,
        fused_merge=0, qk_promote=0)
    assert lc.lookup("mla_decode_fp8", "", heads=128, **fp8)["BLOCK_H"] == 32
    assert lc.lookup("mla_decode_fp8", "interpreter", heads=16, **fp8)["BLOCK_N"] == 16
    assert lc.lookup("mla_prep", "", kernel="v_up") == dict(num_warps=4, BLOCK_C=128, BLOCK_T_MAX=64, BLOCK_V=32)
    assert lc.lookup("mla_prep", "", kernel="kv_write") == dict(num_warps=4)
