"""Triton paged attention (prefill tiles and split-KV decode) against the torch reference.

Batches come from `paged_batch.make_paged_batch`: sequences scattered over a shuffled
paged pool, prefill chunks after cached context mixed with decode rows, GQA, and MLA's
latent cache whose values are a strided view of the keys. CPU cases run interpreted.
"""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch


def compare(pb, scale=0.125, atol=1e-5, rtol=1e-5):
    want = resolve("paged_attention", "torch")[1](*pb.args(scale))
    got = resolve("paged_attention", "triton")[1](*pb.args(scale))
    rows = int(pb.query_start_loc[-1])
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got[:rows].float(), want[:rows].float(), atol=atol, rtol=rtol)
    return got


# ---- CPU, interpreted, tiny ---------------------------------------------------------------

def test_prefill_mixed_batch_gqa(triton_ops, cpu_only):
    # a fresh prompt, a chunk after 17 cached tokens, a decode row, an idle sequence
    compare(make_paged_batch([5, 20, 1, 0], [5, 37, 50, 9], num_heads=4, num_kv_heads=2, head_dim=32))


def test_prefill_head_dim_not_power_of_two(triton_ops, cpu_only):
    # MLA's prefill shape in miniature: qk head dim = nope + rope (24 = 16 + 8), v dim 16
    compare(make_paged_batch([3, 17], [30, 40], num_heads=4, num_kv_heads=4, head_dim=24, v_head_dim=16,
                             block_size=8))


@pytest.mark.parametrize("head_dim", [8, 12])
def test_heads_narrower_than_a_dot_tile(triton_ops, cpu_only, head_dim):
    """Tiny models' heads (stories260k: 8) run in one masked 16-wide block, so CUDA graphs can
    capture them: prefill chunks and decode rows alike."""
    compare(make_paged_batch([5, 20, 1, 0], [5, 37, 50, 9], num_heads=4, num_kv_heads=2, head_dim=head_dim))
    compare(make_paged_batch([1, 1, 1], [5, 37, 60], num_heads=4, num_kv_heads=2, head_dim=head_dim))


def test_mla_rope_tail_narrower_than_a_dot_tile(triton_ops, cpu_only):
    """A tiny MLA latent (32 + an 8-wide rope tail, padded to 16 and masked), prefill and decode."""
    compare(make_paged_batch([3, 1, 1], [30, 40, 9], num_heads=4, num_kv_heads=1, head_dim=40, v_head_dim=32,
                             block_size=8, mla=True))
    compare(make_paged_batch([1, 1, 1], [30, 40, 9], num_heads=4, num_kv_heads=1, head_dim=40, v_head_dim=32,
                             block_size=8, mla=True))


def test_decode_splits_long_context(triton_ops, cpu_only):
    attn = triton_ops.attention
    assert attn.num_decode_splits(3, 1, 600, torch.device("cpu")) == 3    # really split
    compare(make_paged_batch([1, 1, 1], [5, 37, 600], num_heads=4, num_kv_heads=2, head_dim=32))


@pytest.mark.parametrize("mla", [False, True])
def test_decode_graph_sized_splits(triton_ops, cpu_only, mla):
    """Under CUDA graphs max_seq_len is the captured maximum, not the batch's: the splits are
    sized for it, and the splits past a shorter row's end are empty (they store nothing and the
    merge reads nothing from them)."""
    kw = dict(num_heads=16, num_kv_heads=1, head_dim=48, v_head_dim=32, mla=True) if mla else \
        dict(num_heads=4, num_kv_heads=2, head_dim=32)
    pb = make_paged_batch([1, 1, 1], [5, 37, 300], block_size=16, **kw)
    pb.max_seq_len = 4096
    assert triton_ops.attention.num_decode_splits(3, 1, pb.max_seq_len, torch.device("cpu")) > 2
    compare(pb)


def test_decode_merge_of_many_splits(triton_ops, cpu_only):
    """A graph-sized split count at batch 1: 10 non-empty splits of a 2300-token row and 6
    empty ones past its end."""
    pb = make_paged_batch([1], [2300], num_heads=4, num_kv_heads=1, head_dim=16, block_size=16)
    pb.max_seq_len = 4096
    assert triton_ops.attention.num_decode_splits(1, 1, pb.max_seq_len, torch.device("cpu")) == 16
    compare(pb)


def test_decode_with_idle_sequence(triton_ops, cpu_only):
    pb = make_paged_batch([1, 0, 1], [5, 37, 60], num_heads=4, num_kv_heads=1, head_dim=16)
    compare(pb)


def test_decode_mla_shared_latent(triton_ops, cpu_only):
    pb = make_paged_batch([1, 1], [30, 300], num_heads=16, num_kv_heads=1, head_dim=48, v_head_dim=32,
                          mla=True)
    assert pb.v_cache.data_ptr() == pb.k_cache.data_ptr() and not pb.v_cache.is_contiguous()
    compare(pb)


@pytest.mark.parametrize("num_heads, block_h", [(24, 32), (128, 64)])
def test_decode_mla_many_heads(triton_ops, cpu_only, num_heads, block_h):
    # R1-like head counts: 24 heads -> one 32-row group with 8 masked rows; 128 -> 2 groups of 64
    assert triton_ops.attention.decode_config(True, num_heads, 16, "interpreter")["BLOCK_H"] == block_h
    compare(make_paged_batch([1, 1], [30, 300], num_heads=num_heads, num_kv_heads=1, head_dim=48,
                             v_head_dim=32, mla=True))


def test_decode_tiles_follow_the_page_size(triton_ops, cpu_only):
    """MLA's 16 heads take 64-key tiles in 64-token pages (one page id per tile) and 32-key
    tiles that span pages in 16-token pages; a tile is one page's rows only if BLOCK_N divides it."""
    cfg = triton_ops.attention.decode_config
    assert (cfg(True, 16, 64, "")["BLOCK_N"], cfg(True, 16, 64, "")["page_tile"]) == (64, True)
    assert (cfg(True, 16, 16, "")["BLOCK_N"], cfg(True, 16, 16, "")["page_tile"]) == (32, False)
    assert cfg(False, 4, 16, "")["page_tile"] is False          # GQA: 64 keys over 16-token pages


def test_decode_warps_follow_the_device(triton_ops, cpu_only):
    """The 16-head MLA tile takes 8 warps on an H200 (faster memory, same compute), 4
    elsewhere; R1's 64-head tile and GQA do not change."""
    cfg = triton_ops.attention.decode_config
    assert cfg(True, 16, 64, "sm90-132sm-144g")["num_warps"] == 8
    assert cfg(True, 16, 64, "sm90-132sm-80g")["num_warps"] == 4
    assert cfg(True, 128, 64, "sm90-132sm-144g") == cfg(True, 128, 64, "sm90-132sm-80g")
    assert cfg(False, 4, 16, "sm90-132sm-144g") == cfg(False, 4, 16, "")


def test_decode_several_tiles_per_page(triton_ops, cpu_only):
    """16-key tiles (interpreted) in 64-token pages: tiles start mid-page, and graph-sized
    splits (max_seq_len 4096) start mid-page too."""
    assert triton_ops.attention.decode_config(True, 16, 64, "interpreter")["page_tile"]
    pb = make_paged_batch([1, 1, 1], [5, 100, 300], num_heads=16, num_kv_heads=1, head_dim=48, v_head_dim=32,
                          block_size=64, mla=True)
    pb.max_seq_len = 4096
    compare(pb)


def test_decode_settings_from_a_trial_table(triton_ops, cpu_only):
    """Settings the tables do not pick here (as a sweep tries them) run and stay exact; a
    table with a bad BLOCK_H or an unknown key is refused by name."""
    attn = triton_ops.attention
    trying = attn.launch_config.trying          # the module the kernel's host code reads
    pb = make_paged_batch([1, 1], [30, 300], num_heads=128, num_kv_heads=1, head_dim=48, v_head_dim=32,
                          mla=True)
    with trying("attention_decode", [{"set": dict(BLOCK_H=16, BLOCK_N=32, programs_per_sm=1)}]):
        assert attn.decode_config(True, 128, 16, "interpreter")["BLOCK_H"] == 16
        assert attn.num_decode_splits(2, 8, 300, pb.q.device, 1) == 1     # 16 programs >= 8 SMs
        compare(pb)                                                         # 8 head groups, one split
    with trying("attention_decode", [{"set": dict(BLOCK_H=24)}]):
        with pytest.raises(ValueError, match="BLOCK_H must be a power of two >= 16, got 24"):
            compare(pb)
    with trying("attention_decode", [{"set": dict(block_n=32)}]):
        with pytest.raises(ValueError, match=r"unknown keys \['block_n'\]"):
            compare(pb)


def test_prefill_tiles_follow_head_width_and_dtype(triton_ops):
    cfg = triton_ops.attention.prefill_config
    assert cfg(False, False, "sm90-132sm-80g") == dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    assert cfg(True, False, "sm90-132sm-144g") == dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    assert cfg(False, True, "") == dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1)
    assert cfg(True, True, "interpreter") == dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)


def test_decode_mla_stale_page_rows_stay_out(triton_ops, cpu_only):
    """The rows of a sequence's last page past its length (another sequence's leftovers) are
    NaN here: none of them may reach the output."""
    lens = [5, 70, 300]
    pb = make_paged_batch([1, 1, 1], lens, num_heads=16, num_kv_heads=1, head_dim=48, v_head_dim=32,
                          block_size=64, mla=True)
    for row, length in enumerate(lens):
        page = int(pb.block_tables[row, (length - 1) // 64])
        pb.k_cache[page, length % 64 or 64:] = float("nan")
    assert not compare(pb).isnan().any()


def test_prefill_mla_shared_latent(triton_ops, cpu_only):
    compare(make_paged_batch([3, 17], [30, 40], num_heads=4, num_kv_heads=1, head_dim=48, v_head_dim=32,
                             mla=True))


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [2, 1, 4]])
def test_bf16(triton_ops, cpu_only, query_lens):
    compare(make_paged_batch(query_lens, [5, 37, 300], num_heads=4, num_kv_heads=2, head_dim=32,
                             dtype=torch.bfloat16), atol=2e-2, rtol=2e-2)


def test_host_lengths_may_be_omitted(triton_ops, cpu_only):
    pb = make_paged_batch([1, 3], [8, 20], num_heads=2, num_kv_heads=2, head_dim=16)
    pb.max_query_len = pb.max_seq_len = 0            # read from the tensors (one sync)
    compare(pb)


def test_rejects_mismatched_cache(triton_ops, cpu_only):
    pb = make_paged_batch([1], [8], num_heads=3, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match=r"multiple of KV heads"):
        resolve("paged_attention", "triton")[1](*pb.args(0.1))


# ---- GPU, model sizes ---------------------------------------------------------------------

@pytest.mark.gpu
def test_decode_gqa_gpu(triton_ops):
    lens = [4096 - 37 * i for i in range(64)]
    compare(make_paged_batch([1] * 64, lens, num_heads=32, num_kv_heads=8, head_dim=128,
                             dtype=torch.bfloat16, device="cuda"), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_decode_mla_gpu(triton_ops):
    lens = [4096 - 61 * i for i in range(64)]
    compare(make_paged_batch([1] * 64, lens, num_heads=16, num_kv_heads=1, head_dim=576, v_head_dim=512,
                             block_size=64, dtype=torch.bfloat16, device="cuda", mla=True),
            atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_tiny_heads_gpu(triton_ops):
    """Heads under tl.dot's 16-wide minimum compile on the GPU (masked main block / rope tail)."""
    for hd, vd, kvh, mla in ((8, 8, 2, False), (40, 32, 1, True)):
        compare(make_paged_batch([7, 1, 1], [30, 40, 90], num_heads=4, num_kv_heads=kvh, head_dim=hd,
                                 v_head_dim=vd, block_size=16, device="cuda", mla=mla), atol=1e-4, rtol=1e-4)
        compare(make_paged_batch([1, 1, 1], [30, 40, 90], num_heads=4, num_kv_heads=kvh, head_dim=hd,
                                 v_head_dim=vd, block_size=16, device="cuda", mla=mla), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_prefill_varlen_gpu(triton_ops):
    compare(make_paged_batch([1000, 1, 317, 2048, 1], [1500, 900, 317, 2048, 77], num_heads=32,
                             num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda"),
            atol=1e-2, rtol=1e-2)
    # MLA prefill: 192-wide q/k (128 nope + 64 rope), 128-wide v
    compare(make_paged_batch([700, 1, 300], [700, 500, 1200], num_heads=16, num_kv_heads=16, head_dim=192,
                             v_head_dim=128, dtype=torch.bfloat16, device="cuda"), atol=1e-2, rtol=1e-2)


def test_attention_layer_splits_a_mixed_step(triton_ops, cpu_only, monkeypatch):
    """A step of decode rows and prompt chunks: the layer sends the decode rows to the decode
    kernel (max_query_len 1) and the chunks to the prefill kernel, and their outputs together
    equal the torch op over the whole batch."""
    from deepserve.layers.attention import Attention, AttentionMetadata
    from deepserve.ops import OpTable, bind

    pb = make_paged_batch([1, 1, 1, 6, 19], [40, 9, 70, 6, 30], num_heads=4, num_kv_heads=2, head_dim=32)
    want = resolve("paged_attention", "torch")[1](*pb.args(0.125))
    layer = Attention(4, 32, 2, 0.125)
    table = OpTable("torch", count=False)
    bind(layer, table)
    layer.kv_cache = [pb.k_cache, pb.v_cache]
    meta = AttentionMetadata(pb.query_start_loc, pb.seq_lens, pb.block_tables,
                             slot_mapping=torch.full((pb.q.shape[0],), -1, dtype=torch.long),
                             logits_indices=torch.zeros(0, dtype=torch.long), max_query_len=pb.max_query_len,
                             max_seq_len=pb.max_seq_len, num_decodes=3)
    seen = []
    triton_op = resolve("paged_attention", "triton")[1]
    monkeypatch.setattr(table, "paged_attention", lambda *a, **kw: seen.append((a[0].shape[0], a[7])) or triton_op(*a, **kw))
    monkeypatch.setattr(table, "write_kv_cache", lambda *a, **kw: None)   # the pool already holds K/V
    got = layer(pb.q, None, None, meta).view_as(want)
    assert seen == [(3, 1), (25, 19)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
