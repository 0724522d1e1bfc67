"""Quantized linear ops, torch reference: FP8 block-scaled and INT8 W8A8 GEMMs.

`fp8_block_linear` follows DeepSeek-V3's FP8 recipe (arXiv 2412.19437 section 3.3): the
weight is e4m3 with one fp32 scale per 128x128 block, the activations are quantized at run
time per token and per group of 128 input features (1x128 tiles), and every 128-wide slice
of the reduction is rescaled by (activation scale x weight scale) before it is summed in
fp32. Weight scales are passed row-expanded, `[N, ceil(K/128)]` (each output row carries its
block's scales; see layers/quantization.py for why), so one 128-wide k step needs a scale
per row of A and per column of B, nothing else.

`int8_linear` is W8A8 INT8 with per-output-channel weight scales and dynamic per-token
activation scales (quant/int8.py): y = (x_q @ w_q^T) * s_tok * s_chan, accumulated exactly
in int32 (torch._int_mm on CUDA) or float64 (exact for any realistic K: each product is at
most 127^2, and float64 holds integers up to 2^53).

The torch versions here compute the same function as the kernels (they are their oracle):
they fake-quantize the activations, dequantize the weight, and run one matmul in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from deepserve.ops.registry import register

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0   # largest finite e4m3fn value
INT8_MAX = 127.0  # symmetric int8: -128 is left unused so negation is exact
FP8_GROUP = 128   # activation group = weight block width along K
_MIN_AMAX = 1e-12  # an all-zero row would give scale 0 and 0/0 = NaN


def quant_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], fp32 scale [..., 1]), one symmetric scale per row."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX)
    # Tensor divisor, not a Python float: CUDA would multiply by the reciprocal (1 ulp off)
    # and scales must match bit for bit across devices.
    scale = amax / torch.full_like(amax, INT8_MAX)
    q = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quant_fp8_per_token_group(x: torch.Tensor, group: int = FP8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, ceil(K/group)]) with x ~= q * scale per 1 x group
    tile; scale = amax / 448, so each tile's largest value lands on the top of the e4m3 range."""
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    kb = -(-k // group)
    xf = x.to(torch.float32)
    if kb * group != k:  # zero-pad the partial last group: zeros change no amax
        xf = torch.nn.functional.pad(xf, (0, kb * group - k))
    tiles = xf.view(m, kb, group)
    amax = tiles.abs().amax(dim=-1).clamp(min=_MIN_AMAX)                  # [M, Kb]
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, kb * group)[:, :k], scale


def _expand_k(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[R, ceil(K/group)] -> [R, K]: each scale repeated over its group's columns."""
    return scale.repeat_interleave(group, dim=1)[:, :k]


def check_fp8_operands(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    n, k = weight.shape
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_block_linear: weight must be {FP8_DTYPE}, got {weight.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"fp8_block_linear: x has {x.shape[-1]} features, weight {tuple(weight.shape)} wants {k}")
    want = (n, -(-k // FP8_GROUP))
    if tuple(scale.shape) != want:
        raise ValueError(f"fp8_block_linear: weight scale shape {tuple(scale.shape)}, expected {want} "
                         f"(row-expanded, one per output row and 128-column block)")


@register("fp8_block_linear", "torch")
def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (any float dtype), e4m3 weight [N, K], fp32 weight_scale [N, ceil(K/128)]
    -> [..., N] in x's dtype, with x quantized per token per 128-group as the kernel does."""
    check_fp8_operands(x, weight, weight_scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    q, s = quant_fp8_per_token_group(x2)
    return _dequantized_product(q.to(torch.float32) * _expand_k(s, k, FP8_GROUP), weight, weight_scale, bias,
                                x.dtype, lead)


def _dequantized_product(x_dq: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor], dtype: torch.dtype, lead) -> torch.Tensor:
    """Dequantized activations x_dq [M, K] (fp32) times the e4m3 weight dequantized per
    128-group, plus bias, in fp32 -> [*lead, N] in `dtype`."""
    w_dq = weight.to(torch.float32) * _expand_k(weight_scale.float(), x_dq.shape[1], FP8_GROUP)  # [N, K]
    y = x_dq @ w_dq.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype).reshape(*lead, weight.shape[0])


@register("fp8_weight_only_linear", "torch")
def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K], e4m3 weight [N, K], fp32 weight_scale [N, ceil(K/128)] -> [..., N] in x's dtype:
    the weight dequantized, the activations unquantized (FP8 W8A16)."""
    check_fp8_operands(x, weight, weight_scale)
    k = x.shape[-1]
    w = (weight.to(torch.float32) * _expand_k(weight_scale.float(), k, FP8_GROUP)).to(x.dtype)   # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def quant_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> e4m3 [M, K] with one given activation scale (a checkpoint's static
    `input_scale`): q = e4m3(clamp(x / s, -448, 448)), compressed-tensors' rule (a division,
    rounded to nearest, saturating: calibration need not have seen every activation's max)."""
    s = input_scale.to(device=x.device, dtype=torch.float32).reshape(1, 1)
    return (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@register("fp8_static_linear", "torch")
def fp8_static_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K], e4m3 weight [N, K], fp32 weight_scale [N, ceil(K/128)], fp32 input_scale [1]
    -> [..., N] in x's dtype: the activations quantized with the one static scale (W8A8 FP8 with
    static per-tensor activations, vLLM's Fp8LinearMethod / CompressedTensorsW8A8Fp8), the product
    rescaled per 128-group as fp8_block_linear's."""
    check_fp8_operands(x, weight, weight_scale)
    if input_scale.numel() != 1:
        raise ValueError(f"fp8_static_linear: input_scale holds one value, got shape {tuple(input_scale.shape)}")
    lead, k = x.shape[:-1], x.shape[-1]
    q = quant_fp8_static(x.reshape(-1, k), input_scale)
    return _dequantized_product(q.to(torch.float32) * input_scale.float().reshape(1, 1), weight, weight_scale,
                                bias, x.dtype, lead)


def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch._int_mm needs CUDA and K, N multiples of 8 (M > 16 is met by padding)
    return a.is_cuda and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [N, K]^T -> accumulator [M, N] (int32 on CUDA, float64 else)."""
    if _int_mm_ok(a, b):
        m = a.shape[0]
        if m <= 16:  # _int_mm wants more than 16 rows: pad with zero rows
            a = torch.nn.functional.pad(a, (0, 0, 0, 32 - m))
        return torch._int_mm(a, b.t())[:m]
    return a.to(torch.float64) @ b.to(torch.float64).t()


@register("int8_linear", "torch")
def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] float, int8 weight [N, K], fp32 weight_scale [N, 1] -> [..., N] in x's dtype."""
    n, k = weight.shape
    if weight.dtype != torch.int8:
        raise ValueError(f"int8_linear: weight must be int8, got {weight.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"int8_linear: x has {x.shape[-1]} features, weight {tuple(weight.shape)} wants {k}")
    if tuple(weight_scale.shape) != (n, 1):
        raise ValueError(f"int8_linear: weight scale shape {tuple(weight_scale.shape)}, expected {(n, 1)}")
    lead = x.shape[:-1]
    xq, xs = quant_int8_rows(x.reshape(-1, k))                       # [M, K], [M, 1]
    acc = int8_matmul(xq, weight)                                          # [M, N]
    y = acc.to(torch.float32) * xs * weight_scale.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)
