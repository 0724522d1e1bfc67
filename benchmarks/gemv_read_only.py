"""Is the W4A16 GEMV bound by its reads or by its arithmetic? The packed weights of the 8B's
batch-1 projections read by a kernel with the GEMV's access pattern and no arithmetic beside
the real GEMV (ops/triton/int4_gemm.py, the device's table), each as CUDA-graph replays over
enough weight copies (>= 256 MB) that they come from HBM, against a 2 GiB device copy.

    python benchmarks/gemv_read_only.py
    TRITON_INTERPRET=1 python benchmarks/gemv_read_only.py --device cpu --tiny   # the logic

The read-only kernel (`_read_words_kernel`) walks each program's BLOCK_N rows in steps of STEPS
slices of SUB_C words, a word per thread and row as the GEMV's loads do (int4_rows_dot), and
folds the words with XOR into one value a row so that no load is dead. If it reaches about
copy bandwidth where the GEMV does not, the GEMV's arithmetic or its dependency chain holds
it; if it stops where the GEMV does, the access pattern or the grid does. Three orders of the
same bytes tell which part of the pattern: the GEMV's (4-byte loads, sm_90 SASS LDG.E), word
order (the compiler's 16-byte loads, LDG.E.128) and each program's rows read as one linear
stretch (16-byte loads, one DRAM stream a program: the layout a repacking at load would give);
a fourth, four adjacent words a thread as two 8-byte loads, is the pattern of the GEMV's
packed fp16 setting (DEQ 3, WORDS 4), which is timed beside it (HALF2_SETTINGS).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_ops import copy_bandwidth, graph_time_ms  # noqa: E402

import deepserve.ops.triton._common  # noqa: E402,F401  (the interpreter's numpy patch, before @triton.jit)

SHAPES = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
# BLOCK_N, SUB_C, STEPS, warps, ORDER: 1 the GEMV's word order, 0 rows in parallel in word
# order, 2 the program's rows as one linear stretch, 3 four adjacent words a thread (two 8-byte loads)
TILES = [(8, 128, 2, 4, 1), (4, 128, 2, 4, 1), (16, 128, 2, 4, 1), (8, 256, 1, 8, 1), (8, 128, 2, 4, 0), (8, 512, 1, 4, 0),
         (8, 128, 2, 4, 2), (16, 128, 2, 4, 2), (8, 128, 1, 4, 3), (16, 128, 1, 4, 3)]
ORDER_NAMES = {0: "", 1: " swap", 2: " linear", 3: " 4 words"}
# the GEMV's packed fp16 settings (DEQ 3: ops/triton/int4_half2.py), WORDS 4 as ORDER 3 reads
HALF2_SETTINGS = [dict(BLOCK_N=n, SUB_C=128, STEPS=1, num_warps=4, SPLIT_K=1, DEQ=3, WORDS=4) for n in (8, 16)]
# GEMV settings timed on the usual words and on tile_words' layout (TILED: 16-byte loads and one
# linear stretch a program; 4-row blocks, where sm_90 needs no shared memory for it)
TILED_SETTINGS = [dict(BLOCK_N=4, SUB_C=128, STEPS=2, num_warps=4, SPLIT_K=1, DEQ=d) for d in (1, 2)]


@triton.jit
def _read_words_kernel(qw_ptr, out_ptr, N, KW, stride_qn, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr,
                       STEPS: tl.constexpr, ORDER: tl.constexpr):
    """ORDER 1: neighbour words swapped as the GEMV visits them (one 4-byte load a word); 0: in
    word order, where the compiler may widen a thread's adjacent words into 16-byte loads; both
    read the BLOCK_N rows side by side, a slice of each a step, and fold a value a row. ORDER 2:
    the program's BLOCK_N rows (contiguous in memory) read as one stretch, BLOCK_N x SUB_C
    consecutive words a step (the bytes a program reads in a layout tiled for it), folded into
    one value for the program, stored at out[program]."""
    if ORDER == 2:
        chunk: tl.constexpr = BLOCK_N * SUB_C
        start = tl.program_id(0).to(tl.int64) * BLOCK_N * stride_qn
        length = tl.minimum(BLOCK_N, N - tl.program_id(0) * BLOCK_N) * stride_qn
        flat = tl.zeros([chunk], tl.int32)
        for c0 in range(0, length, chunk * STEPS):
            for sub in tl.static_range(STEPS):
                offs = c0 + sub * chunk + tl.arange(0, chunk)
                flat ^= tl.load(qw_ptr + start + offs, mask=offs < length, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.xor_sum(flat, axis=0))
        return
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.minimum(rows, N - 1).to(tl.int64)
    qw_rows = qw_ptr + r * stride_qn
    if ORDER == 3:      # words 4i .. 4i + 3 of a slice of 4 SUB_C words in thread i (KW a multiple of 4)
        pairs = tl.zeros([SUB_C, BLOCK_N], tl.int64)
        for c0 in range(0, KW, 4 * SUB_C * STEPS):
            for sub in tl.static_range(STEPS):
                offs_c = c0 + sub * 4 * SUB_C + 4 * tl.arange(0, SUB_C)
                ptrs = (qw_rows[None, :] + offs_c[:, None]).to(tl.pointer_type(tl.int64))
                ok = (offs_c < KW)[:, None]
                pairs ^= tl.load(ptrs, mask=ok, other=0) ^ tl.load(ptrs + 1, mask=ok, other=0)
        acc = pairs.to(tl.int32) ^ (pairs >> 32).to(tl.int32)
        tl.store(out_ptr + rows, tl.xor_sum(acc, axis=0), mask=rows < N)
        return
    acc = tl.zeros([SUB_C, BLOCK_N], tl.int32)
    perm = tl.arange(0, SUB_C) ^ 1 if ORDER == 1 else tl.arange(0, SUB_C)
    for c0 in range(0, KW, SUB_C * STEPS):
        for sub in tl.static_range(STEPS):
            offs_c = c0 + sub * SUB_C + perm
            acc ^= tl.load(qw_rows[None, :] + offs_c[:, None], mask=(offs_c < KW)[:, None], other=0)
    tl.store(out_ptr + rows, tl.xor_sum(acc, axis=0), mask=rows < N)


def read_words(qweight: torch.Tensor, out: torch.Tensor, tile: tuple) -> None:
    block_n, sub_c, steps, warps, order = tile
    n, kw = qweight.shape
    assert order != 2 or qweight.stride(0) == kw, "the linear order reads each program's rows as one stretch"
    assert order != 3 or (kw % 4 == 0 and qweight.stride(0) % 4 == 0), "4 words a thread: rows of whole 4-word runs"
    _read_words_kernel[(triton.cdiv(n, block_n),)](qweight, out, n, kw, qweight.stride(0), BLOCK_N=block_n,
                                                   SUB_C=sub_c, STEPS=steps, ORDER=order, num_warps=warps)


def expected_fold(row_folds: torch.Tensor, tile: tuple) -> torch.Tensor:
    """What the read-only kernel stores for this tile, from the xor of each row's words: the
    rows' own, or (ORDER 2) one value for each program's BLOCK_N rows."""
    if tile[4] != 2:
        return row_folds
    folds = []
    for group in row_folds.split(tile[0]):
        fold = torch.zeros((), dtype=row_folds.dtype, device=row_folds.device)
        for row in group:
            fold ^= row
        folds.append(fold)
    return torch.stack(folds)


def tiled_cells(x: torch.Tensor, ws: list, nbytes: int, bw: float, dev: str) -> list[str]:
    """The GEMV at each of TILED_SETTINGS on the usual words, then on tile_words' layout of the
    same words (checked equal to the first within fp32 order): time (% of copy), or ok on CPU."""
    from deepserve.ops.triton.int4_gemm import gemv_slice_words, int4_gemv, tile_words
    from deepserve.ops.triton.launch_config import trying
    cells = []
    for setting in TILED_SETTINGS:
        with trying("int4", [{"if": {"kernel": "gemv"}, "set": setting}]):
            sub = gemv_slice_words(setting, ws[0][0].shape[1])
            tiled = [tile_words(q, setting["BLOCK_N"], sub) for q, _ in ws]
            plain = int4_gemv(x, ws[0][0], ws[0][1], None, None, 128, None).float()
            got = int4_gemv(x, ws[0][0], ws[0][1], None, None, 128, None, tiled=tiled[0]).float()
            if not torch.allclose(got, plain, rtol=1e-2, atol=1e-2 * plain.abs().max().item()):
                cells += ["-", "WRONG"]
                continue
            if dev != "cuda":
                cells += ["ok", "ok"]
                continue
            for words in (None, tiled):
                us = graph_time_ms(lambda: [int4_gemv(x, q, s, None, None, 128, None,
                                                      tiled=None if words is None else words[i])
                                            for i, (q, s) in enumerate(ws)], reps=1) * 1e3 / len(ws)
                cells.append(f"{us:.1f} ({nbytes / (us * 1e-6) / bw:.0%})")
    return cells


def half2_cells(x: torch.Tensor, ws: list, nbytes: int, bw: float, dev: str) -> list[str]:
    """The GEMV at each of HALF2_SETTINGS (checked against the table's setting within bf16
    rounding): time (% of copy), or ok on CPU."""
    from deepserve.ops.triton.int4_gemm import int4_gemv
    from deepserve.ops.triton.launch_config import trying
    plain = int4_gemv(x, ws[0][0], ws[0][1], None, None, 128, None).float()
    cells = []
    for setting in HALF2_SETTINGS:
        with trying("int4", [{"if": {"kernel": "gemv"}, "set": setting}]):
            got = int4_gemv(x, ws[0][0], ws[0][1], None, None, 128, None).float()
            if not torch.allclose(got, plain, rtol=1e-2, atol=1e-2 * plain.abs().max().item()):
                cells.append("WRONG")
            elif dev != "cuda":
                cells.append("ok")
            else:
                us = graph_time_ms(lambda: [int4_gemv(x, q, s, None, None, 128, None) for q, s in ws],
                                   reps=1) * 1e3 / len(ws)
                cells.append(f"{us:.1f} ({nbytes / (us * 1e-6) / bw:.0%})")
    return cells


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 64 (for --device cpu)")
    args = ap.parse_args(argv)
    from deepserve.ops.registry import resolve
    gemv = resolve("int4_linear", "triton")[1]
    dev = args.device
    bw = copy_bandwidth() if dev == "cuda" else float("nan")
    if dev == "cuda":
        print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s")
    tiled_names = [f"GEMV 4 rows DEQ {t['DEQ']}{kind}" for t in TILED_SETTINGS for kind in ("", " tiled")]
    tiled_names += [f"GEMV {t['BLOCK_N']} rows DEQ 3 WORDS {t['WORDS']}" for t in HALF2_SETTINGS]
    print("| shape | N x K | GEMV us (% of copy) | " + " | ".join(f"read-only {t[0]}x{t[1]}x{t[2]} w{t[3]}{ORDER_NAMES[t[4]]}" for t in TILES)
          + " | " + " | ".join(tiled_names) + " |")
    print("|---|---|---:|" + "---:|" * (len(TILES) + len(tiled_names)))
    for name, n, k in SHAPES:
        if args.tiny:
            n, k = max(n // 64, 16), max(k // 64, 128)
        nbytes = n * k // 2 + n * (k // 128) * 2           # packed words and bf16 scales
        copies = 1 if dev == "cpu" else max(1, min(64, (256 << 20) // nbytes))
        gen = torch.Generator(device=dev).manual_seed(n + k)
        ws = [(torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), generator=gen, device=dev, dtype=torch.int64)
               .to(torch.int32), torch.full((n, k // 128), 0.004, dtype=torch.bfloat16, device=dev))
              for _ in range(copies)]
        x = torch.randn(1, k, generator=gen, device=dev).bfloat16()
        out = torch.empty(n, dtype=torch.int32, device=dev)
        want = torch.zeros(n, dtype=torch.int64, device=dev)
        for w in ws[0][0].unbind(1):                        # the read-only kernel's fold, in torch
            want ^= w.to(torch.int64) & 0xFFFFFFFF
        cells = []
        for tile in TILES:
            read_words(ws[0][0], out, tile)
            expect = expected_fold(want, tile)
            if not torch.equal(out[:len(expect)].to(torch.int64) & 0xFFFFFFFF, expect):
                cells.append("WRONG")
                continue
            if dev == "cpu":
                cells.append("ok")
                continue
            us = graph_time_ms(lambda t=tile: [read_words(q, out, t) for q, _ in ws], reps=1) * 1e3 / copies
            cells.append(f"{us:.1f} ({n * k // 2 / (us * 1e-6) / bw:.0%})")
        if dev == "cuda":
            us = graph_time_ms(lambda: [gemv(x, q, s, None, None, 128) for q, s in ws], reps=1) * 1e3 / copies
            g = f"{us:.1f} ({nbytes / (us * 1e-6) / bw:.0%})"
        else:
            g = "-"
        cells += tiled_cells(x, ws, nbytes, bw, dev) + half2_cells(x, ws, nbytes, bw, dev)
        print(f"| {name} | {n}x{k} | {g} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
