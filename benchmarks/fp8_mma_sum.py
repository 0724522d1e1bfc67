"""How the e4m3 tensor cores sum: one fp8 `tl.dot` (K = 128, the fused MoE's fp32 promotion
interval) against the exact sum of the same e4m3 products, and against a model of Hopper's
adder (DeepSeek-V3 report, section 3.5.2): each MMA step of 32 products aligns them to the
largest and keeps 13 bits from its top down, shifted with sign fill (rounded toward -inf);
the partial sum in the accumulator keeps 13 bits too, truncated (SageAttention2 measured an
"fp22" accumulator: one bit more; the model's numbers barely move with it).

Why it matters: the sorted fp8 fused MoE and the torch op (its oracle, exact fp32 sums) round
at the same points, yet differed by ~1.75% on an H100 (tests/ops/test_triton_moe.py,
test_fused_moe_gpu). That model, emulated at those shapes, gives 1.72%. This script checks the
model against the hardware on one dot: if the GPU's sums equal `hopper_sum`'s (and not the
exact ones), the gap is the tensor cores' and no rounding of deepserve's.

    python benchmarks/fp8_mma_sum.py          # a GPU with e4m3 tensor cores (sm89+)
"""
from __future__ import annotations

import argparse
import json

import torch

MMA_K = 32          # products one fp8 MMA step sums
KEEP_BITS = 13      # significant bits kept from the top of each step's largest product down


def _truncate(v: torch.Tensor, top: torch.Tensor, floor: bool) -> torch.Tensor:
    """v to multiples of 2^(top - KEEP_BITS + 1): floored (sign-fill shift) or toward zero."""
    ulp = torch.ldexp(torch.ones_like(v), top - KEEP_BITS + 1)
    q = v / ulp
    return (torch.floor(q) if floor else torch.trunc(q)) * ulp


def _exponent(v: torch.Tensor) -> torch.Tensor:
    """floor(log2 |v|), 0 for v == 0."""
    return torch.frexp(torch.where(v == 0, torch.ones_like(v), v.abs()))[1].long() - 1


def hopper_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] of e4m3 values (any float dtype holding them), K a multiple of 32,
    summed as the model above says Hopper's fp8 tensor cores do, in fp64 -> [M, N]."""
    a, b = a.double(), b.double()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for k0 in range(0, a.shape[1], MMA_K):
        p = a[:, None, k0:k0 + MMA_K] * b[k0:k0 + MMA_K].t()[None]        # [M, N, 32], exact
        top = _exponent(p.abs().amax(-1))[..., None]
        total = acc + _truncate(p, top, floor=True).sum(-1)
        acc = torch.where(total == 0, total, _truncate(total, _exponent(total), floor=False))
    return acc


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_mma_sum: needs a CUDA GPU with e4m3 tensor cores")
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))

    g = torch.Generator(device="cuda").manual_seed(args.seed)
    # the fused MoE's operands: activations on e4m3's full range, weights of a normal spread
    x = torch.randn(args.m, 128, generator=g, device="cuda")
    a = (x / x.abs().amax(1, keepdim=True) * 448).to(torch.float8_e4m3fn)
    b = torch.randn(128, args.n, generator=g, device="cuda").to(torch.float8_e4m3fn)
    c = torch.empty(args.m, args.n, dtype=torch.float32, device="cuda")
    dot_kernel[(1,)](a, b, c, M=args.m, N=args.n, K=128)
    exact = a.double() @ b.double()
    model = hopper_sum(a, b)
    print(json.dumps({"device": torch.cuda.get_device_name(), "gpu_vs_exact": _rel(c, exact),
                      "model_vs_exact": _rel(model, exact), "gpu_vs_model": _rel(c, model),
                      "equal_to_model": (c.double() == model).float().mean().item(),
                      "equal_to_exact": (c.double() == exact.float().double()).float().mean().item()}))


if __name__ == "__main__":
    main()
