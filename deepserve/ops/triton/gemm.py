"""Dense linear layer of several rows (y = x W^T + b) as a Triton GEMM, beside cuBLAS.

With this kernel every dense projection of R1 and the distills can run as Triton (the one-row
case is the GEMV, gemv.py; fp8 block weights have their own GEMM, quant_gemm.py), so a chip
with a Triton backend needs no vendor BLAS. On NVIDIA GPUs cuBLAS is the bar: which of the two
runs a shape is data, the `backend` setting ("triton" or "cublas") of the device's launch table
(configs/gemm/: the default table says cuBLAS everywhere, since no device has measured the
kernel faster yet; a sweep writes a device's rules). `--ops triton-all` (DEEPSERVE_OPS=triton-all)
takes the Triton kernel at every shape (its op table passes `force_triton`).

The kernel is the classic tiled GEMM (Triton's matmul tutorial): a [BLOCK_M, BLOCK_N] output
tile per program, programs ordered in groups of GROUP_M row tiles so neighbouring programs
reuse the same weight tiles from L2, K stepped by BLOCK_K through tensor-core dots with fp32
accumulation. Rounding matches the torch reference `F.linear(x.to(W.dtype), W, b)`: x is cast
to the weight's dtype, products accumulate in fp32, the bias joins in fp32, one rounding to
the weight's dtype (fp32 weights, the MoE router, use exact fp32 products, not TF32).

Split-K (the SPLIT_K setting; 1 is the plain kernel). With few rows a GEMM is a weight read,
and it reaches the copy bandwidth only when every SM streams: at decode batch 64 an [N, K] =
[4096, 14336] down projection in 64 x 64 tiles gives 64 programs to 132 SMs. With SPLIT_K = S
the K range is cut into S contiguous pieces (whole BLOCK_K steps) and the grid gets a second
axis of S programs per output tile, each storing its fp32 partial tile in a [S, M, N]
workspace; a second kernel (`_split_k_sum`) adds the S partials in a fixed order, then the
bias, and rounds once. The extra traffic is 8 * S * M * N bytes (L2-resident at the sizes
where split-K pays) against the 2 * N * K of the weight. Chosen over fp32 atomic adds (the
Triton tutorial's way) because the result is deterministic and the output needs no zeroing
launch; the workspace is an ordinary torch.empty, as the split-KV attention's partials, so it
is CUDA-graph safe (the caching allocator serves it from the graph's pool, no host sync). On
Hopper the GEMM lets the sum kernel launch early (PDL), so the sum waits resident in
`griddepcontrol.wait` rather than paying a launch.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.triton._common import as_rows, cdiv, dot_dtype, dot_precision, interpreting, pdl_begin, pdl_launch
from deepserve.ops.triton import launch_config

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles sweep the
    column tiles together, so each weight tile is read from L2 by the whole group."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, y_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SPLIT_K: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr):
    """y = x W^T (+ b) for one output tile; with SPLIT_K > 1, program (tile, s) sums the s-th
    piece of K and y is the fp32 [SPLIT_K, M, N] workspace (no bias: the sum kernel adds it)."""
    if LAUNCH_DEPENDENTS:               # the sum kernel may start and wait resident (PDL)
        tl.extra.cuda.gdc_launch_dependents()
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_stride + offs_k[None, :]        # [BM, BK]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * w_stride + offs_k[:, None]        # [BK, BN] = W^T tile
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        split = tl.program_id(1)
        piece = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K     # whole K steps per split
        k_lo = split * piece
        k_hi = tl.minimum(k_lo + piece, K)
        x_ptrs += k_lo
        w_ptrs += k_lo
        y_ptr += split.to(tl.int64) * M * y_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # x rounded to the weight's dtype first, as the reference's x.to(W.dtype)
        x = x.to(w_ptr.dtype.element_ty)
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * y_stride + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _split_k_sum(ws_ptr, b_ptr, y_ptr, MN, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """y = sum over s of ws[s] (+ b), flat over the M * N outputs: the partials in order
    s = 0, 1, ... (the same sum every run), the bias in fp32, one rounding."""
    pdl_begin(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.load(ws_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


SUM_BLOCK = 1024


def gemm_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """backend ("triton" | "cublas"), BLOCK_M/N/K, GROUP_M, SPLIT_K, num_warps, num_stages of
    an [M, K] x [N, K]^T product, from the launch table (configs/gemm/). Shared between calls
    (every linear of several rows asks, cuBLAS's too): read, never changed."""
    return launch_config.shared_lookup("gemm", launch_config.device_key(device), m=m, n=n, k=k)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         cfg: Optional[dict] = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N] in the weight's dtype (= F.linear(x.to(weight.dtype),
    weight, bias)), one launch of the Triton kernel whatever the table's backend says."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"gemm: x has {x.shape[-1]} features, weight {tuple(weight.shape)} takes {k}")
    x2 = as_rows(x)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    if m and n:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        cfg = dict(cfg or gemm_config(m, n, k, x.device))
        cfg.pop("backend", None)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        split = cfg.pop("SPLIT_K", 1)
        if not isinstance(split, int) or split < 1:
            raise ValueError(f"gemm: SPLIT_K is a positive integer, got {split!r}")
        tiles = cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"])
        common = dict(DOT_DTYPE=dot_dtype(weight.dtype), DOT_PRECISION=dot_precision(weight.dtype),
                      num_warps=warps, num_stages=stages, **cfg)
        if split == 1:
            _gemm_kernel[(tiles,)](x2, w, bias if bias is not None else w, out, m, n, k,
                                   x2.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                   SPLIT_K=1, LAUNCH_DEPENDENTS=False, **common)
        else:
            partials = torch.empty(split, m, n, dtype=torch.float32, device=x.device)   # [S, M, N]
            pdl = pdl_launch(x.device)
            _gemm_kernel[(tiles, split)](x2, w, w, partials, m, n, k, x2.stride(0), w.stride(0), n,
                                         HAS_BIAS=False, SPLIT_K=split, LAUNCH_DEPENDENTS=pdl["USE_PDL"],
                                         **common)
            _split_k_sum[(cdiv(m * n, SUM_BLOCK),)](
                partials, bias if bias is not None else out, out, m * n, n, HAS_BIAS=bias is not None,
                SPLIT_K=split, BLOCK=SUM_BLOCK, num_warps=4, **pdl)
    return out.reshape(*x.shape[:-1], n)


def use_gemm(x: torch.Tensor, weight: torch.Tensor, force_triton: bool = False) -> Optional[dict]:
    """The launch settings when linear() takes the Triton GEMM for this product (floats on a
    Triton device, and the device's table picks Triton for the shape or `force_triton`, as
    --ops triton-all sets it), else None (cuBLAS)."""
    if not (weight.dim() == 2 and weight.dtype in FLOAT_DTYPES and x.dtype in FLOAT_DTYPES
            and (x.is_cuda or interpreting())):
        return None
    n, k = weight.shape
    cfg = gemm_config(x.numel() // max(k, 1), n, k, x.device)
    return cfg if force_triton or cfg["backend"] == "triton" else None
