"""Pick, per weight shape, the fastest way to multiply one row by it (batch-1 decode).

At one token a projection is a matrix-vector product bound by reading the weight. cuBLAS
chooses its kernel per problem, and for some shapes `F.linear(x, W)` (x W^T, one row) lands
on tiles that read the weight at about half the copy bandwidth (the 8B model's 4096x4096
o_proj: 54% on an H100, benchmarks/profile_decode.py), while the same product posed as
W x (`torch.mv`) may get another kernel. At start-up on a GPU each distinct (N, K, dtype)
of the model's unquantized linear layers is timed both ways with CUDA events, and the
faster is kept for single-row calls (`UnquantizedLinearMethod.apply`). Both are exact
GEMVs with fp32 accumulation; only the summation order differs. Nothing changes on CPU.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("deepserve")


def _time_us(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


@torch.inference_mode()
def tune_single_row_linears(model: nn.Module) -> dict:
    """Set `layer.single_row_mv` on every unquantized linear layer; returns {shape: (us F.linear,
    us torch.mv)} for the log."""
    from deepserve.layers.linear import LinearBase, UnquantizedLinearMethod
    layers = [m for m in model.modules() if isinstance(m, LinearBase)
              and isinstance(m.quant_method, UnquantizedLinearMethod) and m.weight.device.type == "cuda"]
    choice, timings = {}, {}
    for layer in layers:
        w = layer.weight
        key = (tuple(w.shape), w.dtype)
        if key not in choice:
            x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
            t_linear = _time_us(lambda: F.linear(x, w))
            t_mv = _time_us(lambda: torch.mv(w, x[0]))
            choice[key] = t_mv < 0.95 * t_linear   # keep F.linear unless mv is clearly faster
            timings[key] = (round(t_linear, 1), round(t_mv, 1))
        layer.single_row_mv = choice[key]
    faster = {str(k[0]): v for k, v in timings.items() if choice[k]}
    if faster:
        logger.info("single-row projections through torch.mv for shapes (F.linear us, mv us): %s", faster)
    return timings
