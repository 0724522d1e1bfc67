"""benchmarks/fp8_mma_sum.py's model of Hopper's e4m3 tensor-core sum, on the CPU: exact where
nothing falls below its 13 kept bits, floored per product and truncated per step where it does."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "fp8_mma_sum", Path(__file__).resolve().parents[2] / "benchmarks" / "fp8_mma_sum.py")
fp8_mma_sum = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp8_mma_sum)


def test_products_within_13_bits_of_the_largest_sum_exactly():
    a = torch.zeros(1, 32)
    b = torch.zeros(32, 1)
    a[0, :3], b[:3, 0] = torch.tensor([448.0, 2.0, -0.5]), torch.tensor([1.0, 1.0, 1.0])
    assert fp8_mma_sum.hopper_sum(a, b).item() == 448.0 + 2.0 - 0.5


def test_a_product_below_the_kept_bits_is_floored_and_the_sum_truncated():
    a = torch.zeros(1, 64)
    b = torch.ones(64, 1)
    a[0, 0], a[0, 1], a[0, 2] = 256.0, 2.0 ** -6, -(2.0 ** -6)      # 2^-6 < 2^(8 - 12): under the kept bits
    got = fp8_mma_sum.hopper_sum(a, b).item()
    assert got == 256.0 - 2.0 ** -4        # +2^-6 floors to 0, -2^-6 to -2^-4 (one step below)
    a = torch.zeros(1, 64)
    a[0, 0], a[0, 32] = 1.0, 2.0 ** -14    # the second step's sum 1 + 2^-14 keeps 13 mantissa bits: 1
    assert fp8_mma_sum.hopper_sum(a, b).item() == 1.0
