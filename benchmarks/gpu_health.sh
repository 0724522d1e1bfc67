#!/bin/bash
# The docs/PERFORMANCE.md figures that the attention / MLA launch tables and the settled PDL
# switches touch, re-measured in one GPU call: the MLA and GQA decode kernels and the prefill
# kernels (bench_ops), the decode sweep's defaults, the V2-Lite batch-1 graph replay and the
# engine figures. With BASE=/path/to/an/older/checkout each step runs there too, right after
# this tree's, so the two codes are compared in the same call (A/B).
#   bash benchmarks/gpu_health.sh                     # this tree
#   BASE=/tmp/base bash benchmarks/gpu_health.sh      # and a baseline checkout, alternating
OUT=${OUT:-/tmp/gpu_health}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TREES=("$PWD"); [ -n "$BASE" ] && TREES+=("$BASE")
step() {
  local name=$1; shift
  for tree in "${TREES[@]}"; do
    local tag; tag=$([ "$tree" = "$PWD" ] && echo new || echo base)
    local t0=$SECONDS
    (cd "$tree" && PYTHONPATH=$tree timeout "${LIMIT:-300}" "$@") > "$OUT/${name}_$tag.txt" 2>&1
    echo "== $name ($tag) rc $? $((SECONDS - t0)) s"
  done
}
step gpu_tests python -m pytest -q -m gpu tests/ops/test_triton_attention.py tests/ops/test_triton_mla_prep.py
step ops_decode python benchmarks/bench_ops.py --only decode_,prefill_ --no-torch --out-dir "$OUT/ops"
step sweep_defaults python benchmarks/sweep_mla_decode.py --quick
step prof_v2lite python benchmarks/profile_decode.py --model deepseek-v2-lite --batch 1 --steps 60 --async-scheduling
step engine_v2lite_async python benchmarks/bench_engine.py --case v2lite --async-scheduling
step engine_llama8b_async python benchmarks/bench_engine.py --case llama8b --async-scheduling
for f in "$OUT"/*.txt; do echo "--- $(basename "$f")"; grep -E "^\| |default|graph|% copy|passed|failed" "$f" | tail -n 12; done
