"""Which part of the fp8-pool MLA decode (attention_decode._mla_decode_fp8_kernel) moves its
output from the torch reference: the case of tests/ops/test_kv_fp8_ops.py's R1-shape GPU test
(128 heads, 8 decode rows of 1 to 4,000 tokens, 64-token pages, an unscaled e4m3 pool), run
with the device table's settings and with one setting changed at a time. Each line gives the
largest |kernel - reference| of every row (the reference over q rounded the kernel's way) and
how many elements fall outside the test's tolerance (2e-2 absolute + 2e-2 relative).

    python benchmarks/diag_mla_fp8.py              # on a GPU
    TRITON_INTERPRET=1 python benchmarks/diag_mla_fp8.py --device cpu --heads 32   # the logic only

--as-test runs the test's calls alone, in a process that imported no Triton module before them,
as `pytest -m gpu -k "r1_and_8b and mla_decode"` does: which backend resolve("paged_attention",
"triton") gives, and the test's two checks (the element of greatest relative difference among
those outside tolerance, with the references over q and over q rounded). While resolve did not
import the kernels, that backend was torch: the test compared the reference over q with the
reference over the rounded q (6,998 outside, largest 0.129, greatest relative at (3, 113, 449)).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

VARIANTS = {                      # name: settings over the table's
    "table": {},
    "qk_promote 128": {"qk_promote": 128},
    "qk_promote 64": {"qk_promote": 64},
    "one split": {"programs_per_sm": 1, "min_split": 8192},
    "dv_run 1": {"dv_run": 1},
    "16 heads, 4 warps": {"BLOCK_H": 16, "num_warps": 4},
    "16 heads, 4 warps, one split": {"BLOCK_H": 16, "num_warps": 4, "programs_per_sm": 1, "min_split": 8192},
    "fused merge": {"fused_merge": 1},
}
SEQS = [100, 900, 4000, 31, 2048, 1, 700, 1500]


def as_test(args) -> int:
    """test_gpu_attention_over_an_fp8_pool_at_r1_and_8b_shapes[mla_decode]'s calls, nothing
    imported before them but what the test module imports."""
    from deepserve.ops.registry import resolve
    from tests.ops.paged_batch import make_paged_batch
    from tests.ops.test_kv_fp8_ops import fp8_pool, q_rounded_to_e4m3, rel_err

    loaded = "deepserve.ops.triton.attention" in sys.modules
    backend, op = resolve("paged_attention", "triton")
    print(f"Triton kernels imported before resolve: {loaded}; resolve gave backend {backend!r}")
    pb = fp8_pool(make_paged_batch([1] * len(SEQS), SEQS, args.heads, 1, 576, 512, mla=True, block_size=64,
                                   dtype=torch.bfloat16, device=args.device))
    ref = resolve("paged_attention", "torch")[1]
    got = op(*pb.args(0.07)).float()
    want_q = ref(*pb.args(0.07)).float()
    want = ref(*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.07)).float()
    err = (got - want).abs()
    bad = err > 2e-2 + 2e-2 * want.abs()
    print(f"rel_err vs the reference over q: {rel_err(got, want_q):.4f} (test: < 0.06); vs over q rounded: "
          f"{int(bad.sum())} of {bad.numel()} outside 2e-2 + 2e-2 relative, largest {float(err.max()):.4f}")
    if bad.any():
        rel = torch.where(bad, err / want.abs(), torch.zeros_like(err))
        at = tuple(int(i) for i in torch.unravel_index(rel.flatten().argmax(), rel.shape))
        print(f"greatest relative difference {float(rel[at]):.1f} at {at}: kernel {float(got[at]):.6g}, "
              f"reference over q {float(want_q[at]):.6g}, over q rounded {float(want[at]):.6g}")
    return 0 if backend == "triton" and not bad.any() else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--as-test", action="store_true", help="only the GPU test's calls, in a fresh process")
    args = ap.parse_args()
    if args.as_test:
        return as_test(args)
    from deepserve.ops.registry import resolve
    from deepserve.ops.triton import attention as tri_attention
    from deepserve.ops.triton.launch_config import trying
    from tests.ops.paged_batch import make_paged_batch
    from tests.ops.test_kv_fp8_ops import fp8_pool, q_rounded_to_e4m3

    torch.manual_seed(0)
    pb = fp8_pool(make_paged_batch([1] * len(SEQS), SEQS, args.heads, 1, 576, 512, mla=True, block_size=64,
                                   dtype=torch.bfloat16, device=args.device))
    want = resolve("paged_attention", "torch")[1](*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.07)).float()
    table = tri_attention.mla_fp8_decode_config(args.heads, len(SEQS), max(SEQS), 64, tri_attention.table_key(pb.q.device))
    print(f"table settings: {table}")
    print(f"rows' tokens: {SEQS}; |reference| mean per row: "
          + " ".join(f"{v:.3f}" for v in want.abs().mean(dim=(1, 2)).tolist()))
    op = resolve("paged_attention", "triton")[1]
    print("| variant | outside tolerance | max abs error per row |\n|---|---:|---|")
    for name, change in VARIANTS.items():
        with trying("mla_decode_fp8", [{"set": {**table, **change}}]):
            got = op(*pb.args(0.07)).float()
        err = (got - want).abs()
        bad = int((err > 2e-2 + 2e-2 * want.abs()).sum())
        print(f"| {name} | {bad} | " + " ".join(f"{v:.4f}" for v in err.amax(dim=(1, 2)).tolist()) + " |")
    # the GPU test's order: the kernel on a freshly built pool first (no trial rules), the
    # references after; then the same with a synchronize and a copy of the output between
    print("| order | outside tolerance | max abs error per row |\n|---|---:|---|")
    for name, sync in (("test order", False), ("test order, synchronized copy", True)):
        pb = fp8_pool(make_paged_batch([1] * len(SEQS), SEQS, args.heads, 1, 576, 512, mla=True, block_size=64,
                                       dtype=torch.bfloat16, device=args.device))
        got = op(*pb.args(0.07))
        if sync:
            torch.cuda.synchronize() if args.device == "cuda" else None
            got = got.clone()
        resolve("paged_attention", "torch")[1](*pb.args(0.07))
        want = resolve("paged_attention", "torch")[1](*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.07))
        err = (got.float() - want.float()).abs()
        bad = int((err > 2e-2 + 2e-2 * want.float().abs()).sum())
        print(f"| {name} | {bad} | " + " ".join(f"{v:.4f}" for v in err.amax(dim=(1, 2)).tolist()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
