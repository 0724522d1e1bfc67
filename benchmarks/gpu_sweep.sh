#!/usr/bin/env bash
# GPU sweep for issue 6: r1-distill-llama-8b preset (dummy weights), 1024 in / 256 out.
# Run from the repo root on the GPU machine with .whl (server wheels) and .carry/tok (the
# R1-Distill-Llama tokenizer from ../shared/tokenizers) carried; results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m deepserve serve r1-distill-llama-8b --load-format dummy --tokenizer .carry/tok \
  --max-model-len 2048 --port 8000 --log-level warning > $OUT/server.log 2>&1 &
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8000/health >/dev/null && break; sleep 1; done
common="--base-url http://127.0.0.1:8000 --tokenizer .carry/tok --dataset-name random --random-input-len 1024 --random-output-len 256 --ignore-eos --disable-tqdm"
python3 -m deepserve bench sweep $common --num-prompts 16 --max-concurrency-list 1 8 --result-dir /tmp/low --result-filename sweep-low 2>&1 | tail -25
python3 -m deepserve bench sweep $common --num-prompts 256 --max-concurrency-list 32 128 --result-dir /tmp/high --result-filename sweep-high 2>&1 | tail -25
kill %1; wait
cp /tmp/low/sweep-low.* /tmp/high/sweep-high.* $OUT/; ls $OUT
