#!/bin/bash
# Pipeline micro-batches (issue 17): offline output throughput with two pipeline stages, the
# tree before micro-batches (one batch in flight, eager stages: BEFORE) against this tree, and
# one GPU of this tree as the reference; the same `deepserve bench throughput` line each time.
#
# GPU (the lead's run, two GPUs):
#   TOKENIZER=/path/to/shared/tokenizers/deepseek-r1-distill-llama-8b benchmarks/pp_micro_batches.sh
# CPU smoke test on the demo model:
#   MODEL=deepserve/assets/stories260k ENGINE_ARGS="--block-size 4" INPUT_LEN=16 OUTPUT_LEN=8 \
#     NUM_PROMPTS=8 benchmarks/pp_micro_batches.sh
#
# Environment: MODEL (r1-distill-llama-8b), ENGINE_ARGS (--load-format dummy), INPUT_LEN (1024),
# OUTPUT_LEN (256), NUM_PROMPTS (256), PP (2), BEFORE (e97c44c: main before the micro-batches; the
# tree is taken with git archive, so this runs in a git checkout), OUT (/tmp/pp_micro_batches).
set -eu
MODEL=${MODEL:-r1-distill-llama-8b}
ENGINE_ARGS=${ENGINE_ARGS:---load-format dummy}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
NUM_PROMPTS=${NUM_PROMPTS:-256}
PP=${PP:-2}
BEFORE=${BEFORE:-e97c44c}
OUT=${OUT:-/tmp/pp_micro_batches}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MODEL_PATH=$MODEL
[ -e "$HERE/$MODEL" ] && MODEL_PATH=$HERE/$MODEL
mkdir -p "$OUT/before"
git -C "$HERE" archive "$BEFORE" | tar -x -C "$OUT/before"

run() {  # run TREE LABEL EXTRA-FLAGS...
    local tree=$1 label=$2
    shift 2
    # shellcheck disable=SC2086
    (cd "$tree" && PYTHONPATH="$tree" python -m deepserve.cli.main bench throughput --model "$MODEL_PATH" \
        $ENGINE_ARGS --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" "$@") \
        > "$OUT/$label.log" 2>&1
    echo "$label: $(grep '^Throughput' "$OUT/$label.log")"
}
run "$HERE" "one-gpu" | tee "$OUT/table.txt"
run "$OUT/before" "pp$PP-before-$BEFORE" -pp "$PP" | tee -a "$OUT/table.txt"
run "$HERE" "pp$PP-micro-batches" -pp "$PP" | tee -a "$OUT/table.txt"
