#!/bin/bash
# The engine figures of docs/PERFORMANCE.md, each model in its own process (an 8B engine's
# memory is not all returned to the allocator before the next case), plus the MLA decode sweep.
OUT=${OUT:-/tmp/gpu_final}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 120 python -m pytest -q -m gpu tests/ops/test_triton_attention.py > "$OUT/gpu_tests.txt" 2>&1; echo "== gpu tests rc $?"; tail -n 2 "$OUT/gpu_tests.txt"
for c in llama8b v2lite; do for a in "" --async-scheduling; do timeout 240 python benchmarks/bench_engine.py --case $c $a > "$OUT/engine_$c$a.txt" 2>&1; echo "== $c $a rc $?"; done; done
timeout 120 python benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1 > "$OUT/prof_8b.txt" 2>&1; echo "== prof rc $?"
timeout 120 python benchmarks/sweep_mla_decode.py --quick > "$OUT/sweep.txt" 2>&1; echo "== sweep rc $?"
tar czf "$OUT/results.tgz" benchmarks/results/engine_*.json
grep -h "^| \|roofline" "$OUT"/engine_*.txt
sed -n '/best per case/,$p' "$OUT/sweep.txt"
sed -n '/== summary/,$p' "$OUT/prof_8b.txt" | head -22
