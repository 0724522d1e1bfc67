"""Token sampling (temperature / top-k / top-p / min-p, exponential race) as one Triton kernel.

Same signature and semantics as the torch reference `deepserve.ops.sampling.sample`, which
sorts the whole vocabulary per row; this kernel never sorts. One program owns one row and
makes a few passes over it:

1. max, argmax (the greedy token), min and the softmax normaliser Z of logits / temperature;
2. top-k: the k-th largest logit found by a 16-way threshold search over the logits' ordered
   int32 keys (float bits with negative values flipped, so integer order = float order).
   Each pass counts, for 16 thresholds at once, the tokens above each and their mass
   exp(x - max); the interval that must hold the answer shrinks 17x per pass, and the search
   stops as soon as it holds a single token (usually after 4-5 passes, at most 8);
3. top-p: the same search on the mass above each threshold: the kept set is the longest
   prefix of the sorted top-k tokens whose mass *before* each token is <= top_p x Z_k,
   exactly the reference's `cum - p > top_p` rule, without materialising the sorted order;
4. the draw: argmax over the vocabulary of keep ? exp(x - max) / noise : 0, with min-p as
   exp(x - max) >= min_p (the top token's exp is 1), first index on ties as torch.argmax.

The kernel decides everything on the device (no `.item()`, no host sync), so it can run
inside a CUDA graph. Tokens tied in value at a top-k/top-p boundary are all kept, where the
reference keeps whichever its sort put first; probabilities are summed in another order,
so a top-p boundary within float rounding of top_p may fall one token apart. Rows with
top_p >= 1 skip the top-p search (the reference's fp32 cumsum may then drop tail tokens whose
exclusive prefix rounds above 1.0: probabilities far too small to be drawn).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.ops.registry import register
from deepserve.ops.triton._common import next_pow2

N_THRESHOLDS = 16      # thresholds tested per pass of the search (17-way split of the interval)
MAX_BLOCK = 1024       # vocab entries per loop step of a program (tests lower it to cover the loop)
INT32_MAX = tl.constexpr(2 ** 31 - 1)


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same order (-0.0 sorts just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _search(row_ptr, vocab, temp, m, lo, lo_cnt, lo_mass, hi, hi_cnt, hi_mass, target,
            BY_MASS: tl.constexpr, BLOCK: tl.constexpr, NT: tl.constexpr):
    """Shrink (lo, hi] around the answer key a: the smallest token key whose count (top-k) or
    mass (top-p) of tokens strictly above it is below `target`. Invariant: lo < a <= hi, with
    cnt/mass of tokens > lo and > hi. Returns lo, cnt(> lo), mass(> lo): keeping the tokens
    with key > lo keeps exactly those with key >= a."""
    j = tl.arange(0, NT).to(tl.int64)
    while (hi - lo > 1) & (lo_cnt - hi_cnt > 1):
        span = hi - lo
        thr = lo + ((j + 1) * span) // (NT + 1)                      # [NT] in [lo, hi)
        thr32 = thr.to(tl.int32)
        cnt = tl.zeros([NT], dtype=tl.int32)
        mass = tl.zeros([NT], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < vocab
            x = tl.div_rn(tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32), temp)
            key = _ordered_key(x)
            above = (key[:, None] > thr32[None, :]) & valid[:, None]  # [BLOCK, NT]
            cnt += tl.sum(above.to(tl.int32), axis=0)
            # the mass is needed by top-k too: the top-p search that follows starts from it
            e = tl.exp(x - m)
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
        if BY_MASS:
            too_low = mass > target
        else:
            too_low = cnt >= target
        # too_low holds for a prefix of the (ascending) thresholds; cnt and mass fall with thr
        lo_cnt_new = tl.min(tl.where(too_low, cnt, lo_cnt), axis=0)
        lo_mass_new = tl.min(tl.where(too_low, mass, lo_mass), axis=0)
        hi_cnt_new = tl.max(tl.where(too_low, hi_cnt, cnt), axis=0)
        hi_mass_new = tl.max(tl.where(too_low, hi_mass, mass), axis=0)
        lo_new = tl.max(tl.where(too_low, thr, lo), axis=0)
        hi = tl.min(tl.where(too_low, hi, thr), axis=0)
        lo = lo_new
        lo_cnt = lo_cnt_new
        lo_mass = lo_mass_new
        hi_cnt = hi_cnt_new
        hi_mass = hi_mass_new
    return lo, lo_cnt, lo_mass


@triton.jit
def _sample_kernel(logits_ptr, noise_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr,
                   vocab, logits_stride, noise_stride,
                   BLOCK: tl.constexpr, NT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    noise_row = noise_ptr + row * noise_stride
    temperature = tl.load(temp_ptr + row).to(tl.float32)
    sampling = temperature > 0
    temp = tl.where(sampling, temperature, 1.0)
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)

    # pass 1: max (and its first index: the greedy token), min key, online softmax sum
    # loop-carried values start as typed tensors (a compiled loop needs one type throughout)
    m = tl.full([], -float("inf"), tl.float32)
    z = tl.zeros([], dtype=tl.float32)
    best_idx = tl.zeros([], dtype=tl.int32)
    key_min = tl.full([], INT32_MAX, tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        x = tl.div_rn(tl.load(row_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32), temp)
        block_max = tl.max(x, axis=0)
        block_idx = tl.argmax(x, axis=0)
        if block_max > m:
            best_idx = start + block_idx
        m_new = tl.maximum(m, block_max)
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        key_min = tl.minimum(key_min, tl.min(tl.where(valid, _ordered_key(x), INT32_MAX), axis=0))
    key_max = _ordered_key(m).to(tl.int64)

    # the kept set is "key > lo"; start with every token kept
    lo = key_min.to(tl.int64) - 1
    lo_cnt = tl.zeros([], dtype=tl.int32) + vocab
    lo_mass = z
    no_cnt = tl.zeros([], dtype=tl.int32)
    no_mass = tl.zeros([], dtype=tl.float32)
    if sampling:
        if (top_k > 0) & (top_k < vocab):
            lo, lo_cnt, lo_mass = _search(row_ptr, vocab, temp, m, lo, lo_cnt, lo_mass,
                                          key_max, no_cnt, no_mass, top_k, False, BLOCK, NT)
        if top_p < 1.0:
            # lo_mass is now Z_k, the mass of the top-k tokens; the top-p answer lies above lo
            lo, lo_cnt, lo_mass = _search(row_ptr, vocab, temp, m, lo, lo_cnt, lo_mass,
                                          key_max, no_cnt, no_mass, top_p * lo_mass, True, BLOCK, NT)

    # the exponential race over the kept tokens (dropped ones score 0, as in the reference)
    best_score = tl.full([], -1.0, tl.float32)
    drawn = tl.zeros([], dtype=tl.int32)
    lo32 = lo.to(tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < vocab
        x = tl.div_rn(tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32), temp)
        q = tl.load(noise_row + cols, mask=valid, other=1.0).to(tl.float32)
        e = tl.exp(x - m)
        keep = (_ordered_key(x) > lo32) & (e >= min_p)
        score = tl.where(valid, tl.where(keep, tl.div_rn(e, q), 0.0), -1.0)
        block_best = tl.max(score, axis=0)
        block_idx = tl.argmax(score, axis=0)
        if block_best > best_score:
            drawn = start + block_idx
            best_score = block_best
    tl.store(out_ptr + row, tl.where(sampling, drawn, best_idx).to(tl.int64))


def _check(name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape != (batch,):
        raise ValueError(f"sample: {name} must have shape ({batch},), got {tuple(t.shape)}")
    return t.contiguous()


@register("sample", "triton")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; temperature/top_p/min_p [B] fp32; top_k [B] int (0 = off);
    noise [B, V] Exp(1) draws -> token ids [B] (int64)."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if noise.shape != logits.shape:
        raise ValueError(f"sample: noise shape {tuple(noise.shape)} != logits shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    params = [_check(n, t, batch) for n, t in
              (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))]
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if vocab == 0:
        raise ValueError("sample: logits have an empty vocab dimension")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if noise.stride(-1) != 1:
        noise = noise.contiguous()
    block = min(next_pow2(vocab), MAX_BLOCK)
    _sample_kernel[(batch,)](logits, noise, *params, out, vocab, logits.stride(0), noise.stride(0),
                             BLOCK=block, NT=N_THRESHOLDS, num_warps=8)
    return out
