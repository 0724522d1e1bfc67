#!/bin/bash
# GPU tests of ops and engine, the V2-Lite batch-1 graph replay, then the engine figures,
# each case in its own process (decode figures: median of 5 timed runs).
OUT=${OUT:-/tmp/gpu_prefetch}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
pip install -q --no-deps .whl/*.whl > /dev/null 2>&1
[ -n "$SKIP_TESTS" ] || timeout 300 python -m pytest -q -m gpu tests/ops tests/engine > "$OUT/gpu_tests.txt" 2>&1; echo "== gpu tests rc $?"; tail -n 2 "$OUT/gpu_tests.txt"
timeout 150 python benchmarks/profile_decode.py --model deepseek-v2-lite --batch 1 --steps 60 --async-scheduling --out "$OUT/prof.json" > "$OUT/prof.txt" 2>&1
python -c "
import json; d=json.load(open('$OUT/prof.json')); print('graph', round(d['graph']['replay_ms'],4), 'step', round(d['steps_bare']['step']['median_ms'],4))"
i=0
for run in "v2lite --async-scheduling" "v2lite --async-scheduling" "v2lite --async-scheduling" "v2lite" "llama8b --async-scheduling" "llama8b"; do
  i=$((i + 1)); mkdir -p "$OUT/json/$i"
  timeout 240 python benchmarks/bench_engine.py --case $run > "$OUT/engine.txt" 2>&1; echo "== $run rc $?"
  grep -E "^\| [a-z]" "$OUT/engine.txt" | grep -v "^| name"
  cp benchmarks/results/engine_*.json "$OUT/json/$i/"
done
cd "$OUT" && tar czf results.tgz json prof_*.json && rm -rf json prof_*.json
