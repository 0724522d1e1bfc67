"""MLA's expanded prefill over the paged latent cache (layers/mla.py `prefill_gather`) against
plain causal attention written out here: a decode row and three prompt chunks of different
lengths in one step, two of them over a cached context longer than their new tokens, their
blocks scattered over a pool whose other slots hold NaN; 16-bit and e4m3 pools, torch and
Triton ops (interpreted on the CPU). With an e4m3 pool the prompt chunks attend their own
tokens' latent as computed and the cached context's through e4m3."""
import pytest
import torch

from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.mla import MLAAttention, prefill_gather
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.ops import OpTable
from deepserve.ops.attention import to_cache_dtype
from deepserve.ops.registry import bind
from tests.models.hf_reference import assert_close_rel

H, D, C, NOPE, ROPE, V = 4, 64, 32, 16, 8, 16
BLOCK, POOL_BLOCKS, WIDTH = 4, 40, 8
# (cached context, new tokens) per sequence: a decode row first, then the prompt chunks
SEQS = [(6, 1), (9, 4), (0, 6), (17, 5)]


def _layer(backend: str) -> MLAAttention:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(ROPE, 64, 10000.0, None, is_neox_style=False)
    attn = MLAAttention(D, H, None, C, NOPE, ROPE, V, rotary, scale=0.3)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    attn.process_weights_after_loading()
    bind(attn, OpTable(backend))
    return attn


def _meta(lens: list[tuple[int, int]], tables: torch.Tensor, num_decodes: int, host: bool = True):
    """Metadata of rows (start, count) per sequence: tokens start..start+count-1 are new."""
    q_lens = [n for _, n in lens]
    seq_lens = [s + n for s, n in lens]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    slots = [int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for b, (s, n) in enumerate(lens) for p in range(s, s + n)]
    meta = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables, torch.tensor(slots),
                             (qsl[1:] - 1).long(), max(q_lens), max(seq_lens), num_decodes,
                             seq_lens_host=seq_lens if host else None)
    positions = torch.tensor([p for s, n in lens for p in range(s, s + n)])
    return meta, positions


def _reference(attn: MLAAttention, x: torch.Tensor, pool_dtype, kv_scale: float, cached: int) -> torch.Tensor:
    """One sequence's attention output [L, D], all L tokens at once: the latent of the first
    `cached` tokens through the pool's dtype and back (the others' as computed: a prompt chunk
    attends its own latent unrounded, as vLLM's MLA prefill), keys and values expanded from it,
    causal softmax."""
    L = x.shape[0]
    pos = torch.arange(L)
    q, kv_a = attn.project(x)
    kv_c = attn.kv_a_layernorm(kv_a[:, :C])
    q_pe, k_pe = attn.rotary_emb(pos, q[..., NOPE:].clone(), kv_a[:, None, C:].clone())
    latent = torch.cat((kv_c, k_pe[:, 0]), dim=-1)
    latent[:cached] = to_cache_dtype(latent[:cached], pool_dtype, kv_scale).float() * kv_scale
    kv = attn.kv_b_proj(latent[:, :C]).view(L, H, NOPE + V)
    k = torch.cat((kv[..., :NOPE], latent[:, None, C:].expand(L, H, ROPE)), dim=-1)
    qf = torch.cat((q[..., :NOPE], q_pe), dim=-1)
    scores = torch.einsum("qhd,khd->hqk", qf, k) * attn.scale
    scores.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), kv[..., NOPE:])
    return attn.o_proj(out.flatten(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fp8", [False, True])
def test_prefill_over_cached_context_matches_plain_attention(backend, fp8):
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("CPU tensors: the Triton kernels run interpreted on CPU-only hosts")
    attn = _layer(backend)
    dtype = torch.float8_e4m3fn if fp8 else torch.float32
    if fp8:
        attn.kv_scale = 0.5
    pool = torch.full((POOL_BLOCKS, BLOCK, 1, C + ROPE), float("nan")).to(dtype)
    attn.kv_cache = [pool]
    # each sequence's blocks scattered over the pool; table entries past its end point at NaN blocks
    tables = torch.randperm(POOL_BLOCKS, generator=torch.Generator().manual_seed(3))[:len(SEQS) * WIDTH]
    tables = tables.view(len(SEQS), WIDTH).to(torch.int32)
    xs = [torch.randn(s + n, D, generator=torch.Generator().manual_seed(10 + b)) for b, (s, n) in enumerate(SEQS)]
    with torch.no_grad():
        # the cached contexts: one earlier prefill step of the sequences that have one
        ctx = [(b, s) for b, (s, _) in enumerate(SEQS) if s]
        meta, pos = _meta([(0, s) for _, s in ctx], tables[[b for b, _ in ctx]], 0)
        attn(pos, torch.cat([xs[b][:s] for b, s in ctx]), meta)
        meta, pos = _meta(SEQS, tables, num_decodes=1)
        got = attn(pos, torch.cat([x[s:] for x, (s, _) in zip(xs, SEQS)]), meta)
        # the decode row reads its own latent from the pool too; the prompt chunks their context only
        want = torch.cat([_reference(attn, x, dtype, attn.pool_scale(pool), s + n if b == 0 else s)[s:]
                          for b, (x, (s, n)) in enumerate(zip(xs, SEQS))])
    assert torch.isfinite(got).all()
    # fp8: the Triton decode kernel also rounds the decode row's query to e4m3
    assert_close_rel(got, want, rtol=3e-2 if fp8 and backend == "triton" else 1e-4)


def test_gather_holds_the_used_blocks_only():
    """The gathered buffer has sum(ceil(len / block)) blocks, sequence after sequence, and the
    same from host lengths as from the device's (the fallback off the serving path)."""
    tables = torch.arange(len(SEQS) * WIDTH, dtype=torch.int32).view(len(SEQS), WIDTH) * 3
    gathers = [prefill_gather(_meta(SEQS, tables, 1, host)[0], 1, BLOCK) for host in (True, False)]
    lens = [s + n for s, n in SEQS[1:]]
    per_seq = [-(-n // BLOCK) for n in lens]                      # 4, 2, 6
    want_blocks = torch.cat([tables[1 + b, :k].long() for b, k in enumerate(per_seq)])
    for g in gathers:
        assert torch.equal(g.blocks, want_blocks)
        assert g.tables.shape == (3, max(per_seq))
        starts = [sum(per_seq[:b]) for b in range(3)]
        for b, k in enumerate(per_seq):
            assert g.tables[b, :k].tolist() == list(range(starts[b], starts[b] + k))
        stale = g.stale.flatten().tolist()
        assert stale == [i >= n for n, k in zip(lens, per_seq) for i in range(k * BLOCK)]
    meta = _meta(SEQS, tables, 1)[0]
    assert prefill_gather(meta, 1, BLOCK) is prefill_gather(meta, 1, BLOCK)   # once per step
