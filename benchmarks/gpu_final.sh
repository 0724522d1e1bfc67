#!/bin/bash
# The engine figures of docs/PERFORMANCE.md, each model in its own process (an 8B engine's
# memory is not all returned to the allocator before the next case), plus the MLA decode sweep.
OUT=${OUT:-/tmp/gpu_final}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for c in llama8b v2lite; do timeout 240 python benchmarks/bench_engine.py --case $c > "$OUT/engine_$c.txt" 2>&1; echo "== $c rc $?"; done
timeout 120 python benchmarks/sweep_mla_decode.py --quick > "$OUT/sweep.txt" 2>&1; echo "== sweep rc $?"
tar czf "$OUT/results.tgz" benchmarks/results/engine_*.json
for c in llama8b v2lite; do grep "^| \|roofline" "$OUT/engine_$c.txt"; done
sed -n '/best per case/,$p' "$OUT/sweep.txt"
