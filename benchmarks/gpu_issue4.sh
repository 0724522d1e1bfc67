#!/bin/bash
# Issue 4 measurement batch for one GPU call: MLA decode sweep, GPU-marked kernel tests
# (attention, sampling), decode-step profiles, the R1 MoE-layer benchmark. Logs go to $OUT
# (or /tmp/gpu_issue4), the short summaries to stdout.
OUT=${OUT:-/tmp/gpu_issue4}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { local name=$1; shift; local t0=$SECONDS; timeout "${LIMIT:-150}" "$@" > "$OUT/$name.txt" 2>&1; echo "== $name rc $? $((SECONDS - t0)) s"; }
step sweep_mla python benchmarks/sweep_mla_decode.py ${SWEEP_ARGS}
step gpu_tests python -m pytest -q -m gpu tests/ops/test_triton_attention.py tests/ops/test_triton_sampling.py
step prof_v2lite python benchmarks/profile_decode.py --model deepseek-v2-lite --batch 1
step prof_8b python benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1
step moe_layer python benchmarks/bench_moe_layer.py
mkdir -p "$OUT/results"; cp benchmarks/results/*.json "$OUT/results/" 2>/dev/null
tail -n 30 "$OUT/sweep_mla.txt"; tail -n 4 "$OUT/gpu_tests.txt"
for f in prof_v2lite prof_8b; do echo "--- $f"; sed -n '/== summary/,$p' "$OUT/$f.txt" | head -30; done
echo "--- moe_layer"; tail -n 12 "$OUT/moe_layer.txt"
