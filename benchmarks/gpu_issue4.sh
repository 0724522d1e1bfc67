#!/bin/bash
# Issue 4 measurement batch for one GPU call: GPU-marked kernel tests, the R1 MoE-layer
# benchmark (bf16 and fp8, one process each), M=1 projection variants, the v2-lite decode
# profile, then the engine figures. Logs and result JSONs go to $OUT (default
# /tmp/gpu_issue4), short summaries to stdout.
OUT=${OUT:-/tmp/gpu_issue4}; mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { local name=$1; shift; local t0=$SECONDS; timeout "${LIMIT:-200}" "$@" > "$OUT/$name.txt" 2>&1; echo "== $name rc $? $((SECONDS - t0)) s"; }
step gpu_tests python -m pytest -q -m gpu tests/ops/test_triton_fused_moe_small.py tests/ops/test_triton_moe.py tests/ops/test_triton_attention.py tests/ops/test_triton_sampling.py
step moe_layer_bf16 python benchmarks/bench_moe_layer.py --dtypes bf16
step moe_layer_fp8 python benchmarks/bench_moe_layer.py --dtypes fp8
step prof_v2lite python benchmarks/profile_decode.py --model deepseek-v2-lite --batch 1
step engine python benchmarks/bench_engine.py --case llama8b v2lite
cp benchmarks/results/engine_*.json benchmarks/results/moe_layer_*.json benchmarks/results/profile_*.json "$OUT/results/" 2>/dev/null
tail -n 3 "$OUT/gpu_tests.txt"; grep -h "moe_layer_r1" "$OUT"/moe_layer_*.txt
sed -n '/== summary/,$p' "$OUT/prof_v2lite.txt" | head -22
tail -n 12 "$OUT/engine.txt"
