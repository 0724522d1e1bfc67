"""Host time of the Triton backend's attention wrappers a mixed MLA step calls per layer, their
launches skipped: argument checks, launch-table lookups, environment flags and temporaries,
what a GPU host spends in our Python before each Triton launch (the launch's own cost is
Triton's and not counted).

The wrappers run on CPU tensors under TRITON_INTERPRET=1 (set here before Triton is imported),
with every kernel's launch (`kernel[grid](...)`) a no-op, on a DeepSeek-V2-Lite-shaped layer
(--heads query heads, a 512 + 64 latent, 128 + 64 query heads, 128-wide values) with --decodes
decode rows and one --prompt-len prompt: one layer's eager attention of a mixed step is the six
calls listed (benchmarks/host_mixed.py times the whole step). Each figure is this thread's CPU
time (other processes on the machine add none) a call, the fastest of --repeats runs of --number
calls.

    python benchmarks/host_wrappers.py
"""
from __future__ import annotations

import argparse
import os
import time
import timeit

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402


def calls(heads: int, decodes: int, prompt_len: int, block_size: int = 64) -> dict:
    """name -> a no-argument call of one wrapper, on inputs made (and views taken) beforehand."""
    from deepserve.ops.triton import attention, mla_prep, rotary
    c, r, nope, v = 512, 64, 128, 128
    t = decodes + prompt_len
    gen = torch.Generator().manual_seed(0)
    blocks = decodes * 2 + 4
    pool = torch.zeros(blocks, block_size, 1, c + r, dtype=torch.bfloat16)
    cos_sin = torch.randn(4096, r, generator=gen)
    kv_b = torch.randn(heads, nope + v, c, generator=gen).to(torch.bfloat16)
    w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
    norm_w = torch.ones(c, dtype=torch.bfloat16)
    q = torch.randn(t, heads, nope + r, generator=gen).to(torch.bfloat16)
    kv_a = torch.randn(t, c + r, generator=gen).to(torch.bfloat16)
    positions = torch.arange(t) + 100
    slots = torch.arange(t)
    out = torch.empty(t, heads, v, dtype=torch.bfloat16)
    q_dec, pos_dec, out_dec = q[:decodes], positions[:decodes], out[:decodes]
    q_pre, pos_pre, out_pre = q[decodes:], positions[decodes:], out[decodes:]
    q_pe = q_pre[..., nope:]
    latent = pool[..., :c]
    dec_starts = torch.arange(decodes + 1, dtype=torch.int32)
    dec_lens = torch.full((decodes,), 200, dtype=torch.int32)
    dec_tables = torch.arange(decodes * 4, dtype=torch.int32).view(decodes, 4) % blocks
    q_abs = torch.empty(decodes, heads, c + r, dtype=torch.bfloat16)
    out_lat = torch.empty(decodes, heads, c, dtype=torch.bfloat16)
    pre_blocks = -(-prompt_len // block_size)
    kv = torch.randn(pre_blocks, block_size, heads, nope + v, generator=gen).to(torch.bfloat16)
    k_nope, v_pre = kv.split([nope, v], dim=-1)
    k_pe = torch.randn(pre_blocks, block_size, 1, r, generator=gen).to(torch.bfloat16)
    pre_starts = torch.tensor([0, prompt_len], dtype=torch.int32)
    pre_lens = torch.tensor([prompt_len], dtype=torch.int32)
    pre_tables = torch.arange(pre_blocks, dtype=torch.int32).view(1, -1)
    scale = 0.1
    return {
        "mla_kv_write": lambda: mla_prep.mla_kv_write(kv_a, positions, cos_sin, False, norm_w, 1e-6, pool, slots),
        "mla_q_absorb": lambda: mla_prep.mla_q_absorb(q_dec, pos_dec, cos_sin, False, w_uk),
        "paged_attention (decode rows)": lambda: attention.paged_attention(
            q_abs, pool, latent, dec_starts, dec_lens, dec_tables, scale, 1, 200, out=out_lat),
        "mla_v_up": lambda: mla_prep.mla_v_up(out_lat, w_uv, out=out_dec),
        "rotary_embedding (prompt q_pe)": lambda: rotary.rotary_embedding(pos_pre, q_pe, None, cos_sin, False,
                                                                          inplace=True),
        "paged_attention (prompt rows)": lambda: attention.paged_attention(
            q_pre, k_nope, v_pre, pre_starts, pre_lens, pre_tables, scale, prompt_len, prompt_len, out=out_pre,
            k_pe=k_pe),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--decodes", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    KernelInterface.__getitem__ = lambda kernel, grid: (lambda *a, **kw: None)
    total = 0.0
    print(f"host us a call, launches skipped ({args.heads} heads, {args.decodes} decodes + a "
          f"{args.prompt_len}-token prompt; fastest of {args.repeats} x {args.number} calls)")
    for name, fn in calls(args.heads, args.decodes, args.prompt_len).items():
        fn()
        us = min(timeit.repeat(fn, timer=time.thread_time, number=args.number, repeat=args.repeats)) / args.number * 1e6
        total += us
        print(f"| {name} | {us:.2f} |")
    print(f"| one layer's eager attention (the calls above) | {total:.2f} |")


if __name__ == "__main__":
    main()
