#!/bin/bash
# Issue 16 figures on one GPU (benchmarks/bench_r1.py), each engine in its own process.
#   benchmarks/gpu_issue16.sh all [TOKENIZER_FOLDER]  # fp8 + bf16 on the compare cut (with KV tokens),
#       MLA decode over bf16 / fp8 KV, KV tokens with an fp8 pool, the 3 + 8 cut, serve (with a tokenizer)
#   benchmarks/gpu_issue16.sh kv                      # MLA decode bf16 vs fp8 KV, KV tokens auto vs fp8
# Serve needs the server's wheels in $WHL (default .whl: fastapi, starlette, uvicorn, pydantic,
# pydantic_core, annotated_types, typing_inspection, typing_extensions). Logs and the result
# JSONs are tarred into $OUT (logs.tgz, results.tgz); the table of figures is printed last.
# The whole batch stays under $BUDGET seconds (default 560): a step that would not fit is skipped.
OUT=${OUT:-/tmp/gpu_issue16}; RES=$OUT/results; LOGS=$OUT/logs; mkdir -p "$RES" "$LOGS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-560}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$LOGS/gpu.txt" 2>&1
head -2 "$LOGS/gpu.txt"
step() {  # step NAME SECONDS ARGS...: bench_r1.py with at most SECONDS (less if the budget is short)
  local name=$1 lim=$2; shift 2
  local left=$((BUDGET - SECONDS - 15))
  [ "$left" -lt 60 ] && { echo "== $name skipped: ${left}s left of the budget"; return; }
  [ "$lim" -gt "$left" ] && lim=$left
  local t0=$SECONDS
  timeout "$lim" python3 benchmarks/bench_r1.py --out-dir "$RES" "$@" > "$LOGS/$name.txt" 2>&1
  echo "== $name rc $? $((SECONDS - t0)) s (limit $lim)"
  grep -E "^\| [a-z]" "$LOGS/$name.txt" | grep -v "^| figure"
}
# the engine takes --kv-cache-dtype (else the fp8-KV steps are skipped)
python3 -c "from deepserve.config import EngineArgs; EngineArgs(kv_cache_dtype='fp8')" 2>/dev/null && KV=1 || KV=
case "$1" in
experts|all)                            # in order of importance: a short budget drops the last
  # every target of the issue first, on the cut where bf16 fits too, then the 3 + 8 layer cut
  step fp8_compare 130 --case experts --weights fp8 --cut compare
  step bf16_compare 130 --case experts --weights bf16 --cut compare
  [ -n "$KV" ] && step kvattn 90 --case kvattn
  [ -n "$KV" ] && step kv_fp8 120 --case kvcache --weights fp8 --cut compare --kv-cache-dtype fp8
  step fp8_big 190 --case experts --weights fp8 --cut big
  if [ -n "$2" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${WHL:-.whl}"/*.whl > "$LOGS/pip.txt" 2>&1 || echo "== wheels did not install (see logs/pip.txt)"
    PYTHONPATH=/tmp/site:$PWD step serve 240 --case serve --tokenizer "$2"
  fi
  ;;
kv)
  step kvattn 90 --case kvattn
  step kv_auto 150 --case kvcache --weights fp8 --cut big --kv-cache-dtype auto
  step kv_fp8 150 --case kvcache --weights fp8 --cut big --kv-cache-dtype fp8
  ;;
*) echo "usage: $0 all [TOKENIZER] | kv"; exit 2 ;;
esac
python3 benchmarks/bench_r1.py --case table --device cpu --out-dir "$RES" > "$OUT/table.txt" 2>&1
tar czf "$OUT/results.tgz" -C "$OUT" results && tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$RES" "$LOGS"
echo "== $SECONDS s in all"
cat "$OUT/table.txt"
