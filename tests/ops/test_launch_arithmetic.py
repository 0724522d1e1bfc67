"""The kernels' host-side launch arithmetic: `_common.cdiv` / `next_pow2` equal Triton's
(`triton.cdiv`, `triton.next_power_of_2`), and the launch code calls them rather than Triton's,
which are ConstexprFunction objects in Triton 3.6 (~5 us a call, a few dozen a layer in an eager
step)."""
from __future__ import annotations

import ast
from pathlib import Path

import triton

from deepserve.ops.triton._common import cdiv, next_pow2

TRITON_OPS = Path(__file__).resolve().parents[2] / "deepserve" / "ops" / "triton"


def test_equal_to_tritons():
    for n in range(0, 5000):
        assert next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_launch_code_calls_the_plain_helpers():
    slow = []
    for path in sorted(TRITON_OPS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("cdiv", "next_power_of_2") and ast.unparse(node.func.value) == "triton"):
                slow.append(f"{path.name}:{node.lineno}")
    assert slow == [], slow
