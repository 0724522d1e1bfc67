"""Host time of the Triton backend's attention wrappers a mixed MLA step calls per layer:
argument checks, launch-table lookups, environment flags and temporaries, what a GPU host
spends in our Python before each Triton launch, the launches skipped (every kernel's
`kernel[grid](...)` a no-op); with --device cuda also with the launches made (Triton's own
launch code and the driver's added: the host's whole cost of the call).

On --device cpu (the default) the wrappers run on CPU tensors under TRITON_INTERPRET=1 (set
here before the kernels are imported). The layer is DeepSeek-V2-Lite-shaped (--heads query
heads, a 512 + 64 latent, 128 + 64 query heads, 128-wide values, bf16) with --decodes decode rows
and one --prompt-len prompt: one layer's eager attention of a mixed step is the six calls listed
(benchmarks/host_mixed.py times the whole step). Each figure is this thread's CPU time (other
processes on the machine add none) a call, the fastest of --repeats runs of --number calls.

    python benchmarks/host_wrappers.py
    python benchmarks/host_wrappers.py --device cuda        # skipped and made launches
"""
from __future__ import annotations

import argparse
import os
import time
import timeit

import torch


def calls(heads: int, decodes: int, prompt_len: int, block_size: int = 64, device: str = "cpu") -> dict:
    """name -> a no-argument call of one wrapper, on inputs made (and views taken) beforehand on
    `device` (on the CPU: TRITON_INTERPRET=1 must be set before the kernels are imported)."""
    from deepserve.ops.triton import attention, mla_prep, rotary
    c, r, nope, v = 512, 64, 128, 128
    t = decodes + prompt_len
    gen = torch.Generator().manual_seed(0)
    blocks = decodes * 2 + 4
    pool = torch.zeros(blocks, block_size, 1, c + r, dtype=torch.bfloat16, device=device)
    cos_sin = torch.randn(4096, r, generator=gen).to(device)
    kv_b = torch.randn(heads, nope + v, c, generator=gen).to(device, torch.bfloat16)
    w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
    norm_w = torch.ones(c, dtype=torch.bfloat16, device=device)
    q = torch.randn(t, heads, nope + r, generator=gen).to(device, torch.bfloat16)
    kv_a = torch.randn(t, c + r, generator=gen).to(device, torch.bfloat16)
    positions = torch.arange(t, device=device) + 100
    slots = torch.arange(t, device=device)
    out = torch.empty(t, heads, v, dtype=torch.bfloat16, device=device)
    q_dec, pos_dec, out_dec = q[:decodes], positions[:decodes], out[:decodes]
    q_pre, pos_pre, out_pre = q[decodes:], positions[decodes:], out[decodes:]
    q_pe = q_pre[..., nope:]
    latent = pool[..., :c]
    dec_starts = torch.arange(decodes + 1, dtype=torch.int32, device=device)
    dec_lens = torch.full((decodes,), 200, dtype=torch.int32, device=device)
    dec_tables = torch.arange(decodes * 4, dtype=torch.int32, device=device).view(decodes, 4) % blocks
    q_abs = torch.randn(decodes, heads, c + r, generator=gen).to(device, torch.bfloat16)
    out_lat = torch.empty(decodes, heads, c, dtype=torch.bfloat16, device=device)
    pre_blocks = -(-prompt_len // block_size)
    kv = torch.randn(pre_blocks, block_size, heads, nope + v, generator=gen).to(device, torch.bfloat16)
    k_nope, v_pre = kv.split([nope, v], dim=-1)
    k_pe = torch.randn(pre_blocks, block_size, 1, r, generator=gen).to(device, torch.bfloat16)
    pre_starts = torch.tensor([0, prompt_len], dtype=torch.int32, device=device)
    pre_lens = torch.tensor([prompt_len], dtype=torch.int32, device=device)
    pre_tables = torch.arange(pre_blocks, dtype=torch.int32, device=device).view(1, -1)
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


def per_call_us(fn, number: int, repeats: int) -> float:
    """This thread's CPU time a call of fn, the fastest of `repeats` runs of `number` calls."""
    fn()
    return min(timeit.repeat(fn, timer=time.thread_time, number=number, repeat=repeats)) / number * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--decodes", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before Triton is imported (and decorates)
    from triton.runtime.jit import KernelInterface
    fns = calls(args.heads, args.decodes, args.prompt_len, device=args.device)
    made = {}
    if args.device == "cuda":        # launches made (compiled by the first call), then skipped
        made = {name: per_call_us(fn, args.number, args.repeats) for name, fn in fns.items()}
        torch.cuda.synchronize()
    launch = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: (lambda *a, **kw: None)
    try:
        skipped = {name: per_call_us(fn, args.number, args.repeats) for name, fn in fns.items()}
    finally:
        KernelInterface.__getitem__ = launch
    print(f"host us a call ({args.device}; {args.heads} heads, {args.decodes} decodes + a {args.prompt_len}-token "
          f"prompt; this thread's CPU time, fastest of {args.repeats} x {args.number} calls)")
    print("| call | launches skipped |" + (" launches made |" if made else "") + "\n|---|---:|" + ("---:|" if made else ""))
    for name in list(fns) + ["one layer's eager attention (the calls above)"]:
        row = [sum(skipped.values()) if name not in fns else skipped[name]]
        if made:
            row.append(sum(made.values()) if name not in fns else made[name])
        print(f"| {name} | " + " | ".join(f"{us:.2f}" for us in row) + " |")


if __name__ == "__main__":
    main()
