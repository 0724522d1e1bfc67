#!/bin/bash
# Served / offline output throughput (issue 17's target on one GPU: >= 0.95 at concurrency 256,
# >= 0.97 at concurrency 1, TTFT p50 at concurrency 1 no worse than with the engine in the API
# process). For each concurrency C: `deepserve bench throughput` (the engine in this process,
# --max-num-seqs C) against `deepserve bench serve --max-concurrency C` on `deepserve serve` with
# the same engine flags, the server run twice: the engine core in its own process (the default)
# and in the API server's process (DEEPSERVE_ENGINE_CORE_PROCESS=0).
#
# GPU (the lead's run; about 7 minutes on an H100):
#   TOKENIZER=/path/to/shared/tokenizers/deepseek-r1-distill-llama-8b benchmarks/served_vs_offline.sh
# CPU smoke test on the demo model:
#   MODEL=deepserve/assets/stories260k TOKENIZER= ENGINE_ARGS="--block-size 4" INPUT_LEN=16 OUTPUT_LEN=8 \
#     NUM_PROMPTS=8 NUM_PROMPTS_C1=2 CONCURRENCIES="8 1" benchmarks/served_vs_offline.sh
#
# Environment: MODEL (r1-distill-llama-8b), TOKENIZER (a folder with tokenizer.json; empty: the
# model folder's own), ENGINE_ARGS (--load-format dummy), INPUT_LEN (1024), OUTPUT_LEN (256),
# CONCURRENCIES ("256 1"), NUM_PROMPTS (256; at concurrency 1: NUM_PROMPTS_C1, 16), MODES
# ("apart inproc"), PORT (8123), OUT (/tmp/served_vs_offline: result JSONs, logs, table.txt),
# WHL (a folder of the server's wheels to install when fastapi / uvicorn are missing).
set -u
MODEL=${MODEL:-r1-distill-llama-8b}
TOKENIZER=${TOKENIZER-../shared/tokenizers/deepseek-r1-distill-llama-8b}
ENGINE_ARGS=${ENGINE_ARGS:---load-format dummy}
INPUT_LEN=${INPUT_LEN:-1024}; OUTPUT_LEN=${OUTPUT_LEN:-256}
CONCURRENCIES=${CONCURRENCIES:-256 1}
NUM_PROMPTS=${NUM_PROMPTS:-256}; NUM_PROMPTS_C1=${NUM_PROMPTS_C1:-16}
MODES=${MODES:-apart inproc}
PORT=${PORT:-8123}
OUT=${OUT:-/tmp/served_vs_offline}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TOK=(); [ -n "$TOKENIZER" ] && TOK=(--tokenizer "$TOKENIZER")
if ! python3 -c "import fastapi, uvicorn" 2>/dev/null && [ -n "${WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHL"/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
prompts() { [ "$1" = 1 ] && echo "$NUM_PROMPTS_C1" || echo "$NUM_PROMPTS"; }

for c in $CONCURRENCIES; do
  echo "== offline, concurrency $c"
  # shellcheck disable=SC2086  # ENGINE_ARGS is a list of flags
  python3 -m deepserve bench throughput --model "$MODEL" "${TOK[@]}" $ENGINE_ARGS --max-num-seqs "$c" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$(prompts "$c")" --disable-tqdm \
    --output-json "$OUT/offline_c$c.json" > "$OUT/offline_c$c.log" 2>&1 || { echo "offline failed:"; tail -5 "$OUT/offline_c$c.log"; }
done

for mode in $MODES; do
  [ "$mode" = apart ] && apart=1 || apart=0
  echo "== serve, engine core $mode"
  # shellcheck disable=SC2086
  DEEPSERVE_ENGINE_CORE_PROCESS=$apart python3 -m deepserve serve "$MODEL" "${TOK[@]}" $ENGINE_ARGS \
    --port "$PORT" --log-level warning > "$OUT/serve_$mode.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    grep -q "deepserve: serving" "$OUT/serve_$mode.log" && break
    kill -0 "$server" 2> /dev/null || break
    sleep 1
  done
  if ! grep -q "deepserve: serving" "$OUT/serve_$mode.log"; then
    echo "server did not start:"; tail -5 "$OUT/serve_$mode.log"; kill "$server" 2> /dev/null; wait "$server"; continue
  fi
  for c in $CONCURRENCIES; do
    python3 -m deepserve bench serve --base-url "http://127.0.0.1:$PORT" "${TOK[@]}" --dataset-name random \
      --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --ignore-eos --num-prompts "$(prompts "$c")" \
      --max-concurrency "$c" --num-warmups 2 --disable-tqdm --save-result --result-dir "$OUT" \
      --result-filename "serve_${mode}_c$c.json" > "$OUT/bench_${mode}_c$c.log" 2>&1 \
      || { echo "bench serve failed:"; tail -5 "$OUT/bench_${mode}_c$c.log"; }
  done
  kill -TERM "$server"; wait "$server"
done

python3 - "$OUT" "$CONCURRENCIES" "$MODES" << 'EOF' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path
out, concurrencies, modes = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else "no GPU"
print(f"device: {gpu}")
print("| concurrency | engine core | offline out tok/s | served out tok/s | served/offline | TTFT p50 ms |")
print("|---|---|---|---|---|---|")
for c in concurrencies:
    off = load(f"offline_c{c}.json")
    for mode in modes:
        srv = load(f"serve_{mode}_c{c}.json")
        o = off["output_tokens_per_second"] if off else None
        s = srv["output_throughput"] if srv and srv.get("completed") else None
        ratio = f"{s / o:.3f}" if o and s else "-"
        ttft = f"{srv['median_ttft_ms']:.1f}" if srv and srv.get("median_ttft_ms") is not None else "-"
        print(f"| {c} | {mode} | {o or 0:.1f} | {s or 0:.1f} | {ratio} | {ttft} |")
EOF
