#!/bin/bash
# FlagGems on one GPU (issue 24 item 3), from the repo root, carrying .flaggems: the wheels of
# flag_gems 5.0.2 and the two packages it needs that the GPU image lacks (python 3.12, x86_64):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .flaggems flag_gems==5.0.2 sqlalchemy==2.0.48 greenlet
# (flag_gems pins sqlalchemy 2.0.48; it also pins numpy 1.26.4 and packaging 26.0, and runs on the
# image's numpy and packaging.) Three calls of at most 10 minutes each, most important first:
#   benchmarks/gpu_flaggems.sh ops        # the gpu test of --ops-profile; which aten ops FlagGems takes
#                                         # (its registration list vs the ops the steps run and the
#                                         # kernels each launched, benchmarks/flaggems_ops.py) on the
#                                         # r1-distill-llama-8b preset cut to 2 layers and deepseek-v2-lite
#                                         # cut to 3 (1 dense + 2 MoE); the 8B cut's --ops-profile shares
#   benchmarks/gpu_flaggems.sh validate   # deepserve validate --ops torch vs --ops flaggems on both cuts
#   benchmarks/gpu_flaggems.sh vspeed     # validate on the 8B cut, then its tok/s with USE_FLAGGEMS=1 (one call)
#   benchmarks/gpu_flaggems.sh tok        # decode tok/s at batch 1 and 64, default then USE_FLAGGEMS=1,
#                                         # both with decode graphs of sizes 1 and 64 only (each captured
#                                         # size has FlagGems autotune its GEMMs cold), about 6 minutes
#   benchmarks/gpu_flaggems.sh speed      # --ops-profile shares under triton / torch beside flaggems,
#                                         # ops_share.py --ops flaggems at batch 1 and 64 (CUDA graphs),
#                                         # decode tok/s with USE_FLAGGEMS=1 (bench_engine.py --case llama8b)
# Each step's log lands in $OUT (default /tmp/gpu_flaggems), the JSONs in $OUT/results.tgz; the
# logs' ends are printed last. A step that would not fit in $BUDGET seconds (default 560) is skipped.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_flaggems}; BUDGET=${BUDGET:-560}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .flaggems/*.whl 2>&1 | grep -v WARN | tail -3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1
python3 -c "import torch, triton, flag_gems; print('torch', torch.__version__, 'triton', triton.__version__, \
'flag_gems', getattr(flag_gems, '__version__', '?'))" 2>&1 | tail -1

LLAMA=(--model r1-distill-llama-8b --hf-overrides '{"num_hidden_layers": 2}')
V2LITE=(--model deepseek-v2-lite --hf-overrides '{"num_hidden_layers": 3}')
STEPS=()
step() {  # step NAME SECONDS COMMAND...: COMMAND with at most SECONDS (less if the budget is short)
  local name=$1 lim=$2; shift 2
  local left=$((BUDGET - SECONDS - 10))
  [ "$left" -lt 40 ] && { echo "== $name skipped: ${left}s left of the budget"; return; }
  [ "$lim" -gt "$left" ] && lim=$left
  local t0=$SECONDS
  timeout "$lim" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc $? $((SECONDS - t0)) s (limit $lim)"
  STEPS+=("$name")
}
profile() {  # profile NAME SECONDS MODEL OVERRIDES OPS: deepserve ops --profile (--ops-profile's start-up report)
  step "$1" "$2" python3 -m deepserve.cli.main ops --profile "$3" --hf-overrides "$4" --ops "$5" --max-model-len 512 --top 20
}
case "${1:-}" in
ops)
  step ops_llama 300 python3 benchmarks/flaggems_ops.py "${LLAMA[@]}" --out "$OUT/flaggems_ops_llama.json"
  step ops_v2lite 180 python3 benchmarks/flaggems_ops.py "${V2LITE[@]}" --out "$OUT/flaggems_ops_v2lite.json"
  step gpu_test 90 python3 -m pytest -q -m gpu tests/ops/test_profile.py
  profile profile_llama_flaggems 90 r1-distill-llama-8b '{"num_hidden_layers": 2}' flaggems
  ;;
speed)
  profile profile_llama_triton 70 r1-distill-llama-8b '{"num_hidden_layers": 2}' triton
  profile profile_llama_torch 70 r1-distill-llama-8b '{"num_hidden_layers": 2}' torch
  step ops_share_llama 150 python3 benchmarks/ops_share.py "${LLAMA[@]}" --ops flaggems --batch 1 64
  cp benchmarks/results/ops_share_*flaggems*.json "$OUT/" 2>/dev/null
  step tok_s_llama 220 env USE_FLAGGEMS=1 python3 benchmarks/bench_engine.py --case llama8b --repeats 3
  mkdir -p "$OUT/engine_flaggems" && cp benchmarks/results/engine_llama8b*.json "$OUT/engine_flaggems/" 2>/dev/null
  ;;
tok)
  # max_num_batched_tokens 2048: fewer distinct step sizes in the profile run and warm-up, each of
  # which has FlagGems autotune its GEMMs cold
  EA='{"cuda_graph_sizes": [1, 64], "cudagraph_mode": "FULL_DECODE_ONLY", "max_num_seqs": 64, "max_num_batched_tokens": 2048}'
  step tok_s_default 90 python3 benchmarks/bench_engine.py --case llama8b --repeats 3 --engine-args "$EA"
  step tok_s_flaggems 450 env USE_FLAGGEMS=1 DEEPSERVE_LOG_LEVEL=info python3 -W ignore \
    benchmarks/bench_engine.py --case llama8b --repeats 1 --engine-args "$EA"
  ;;
validate|vspeed)
  # token-id prompts (no tokenizer needed): 8 x 64 ids inside both presets' vocabularies
  python3 -c "
import json, random
random.seed(0)
with open('$OUT/prompts.jsonl', 'w') as f:
    for _ in range(8):
        f.write(json.dumps({'prompt_token_ids': [random.randrange(1000, 30000) for _ in range(64)]}) + '\n')"
  # random weights give near-flat distributions: bf16 rounding flips near ties (see deepserve validate --help)
  cuts="llama v2lite"; [ "$1" = vspeed ] && cuts=llama
  for cut in $cuts; do
    if [ $cut = llama ]; then args=("${LLAMA[@]}"); else args=("${V2LITE[@]}"); fi
    lim=270; [ $cut = llama ] && lim=400   # the first run compiles FlagGems' kernels (cold: over 270 s)
    step "validate_$cut" $lim python3 -m deepserve.cli.main validate "${args[@]}" --max-model-len 512 \
      --prompts "$OUT/prompts.jsonl" --a "--ops torch" --b "--ops flaggems" \
      --max-top1-mismatch 0.05 --max-kl 1e-2 --output "$OUT/validate_$cut.json"
  done
  if [ "$1" = vspeed ]; then  # one call: the 8B cut's validation, then its decode tok/s with FlagGems on
    step tok_s_llama 220 env USE_FLAGGEMS=1 python3 benchmarks/bench_engine.py --case llama8b --repeats 3
    mkdir -p "$OUT/engine_flaggems" && cp benchmarks/results/engine_llama8b*.json "$OUT/engine_flaggems/" 2>/dev/null
  fi
  ;;
*)
  echo "usage: benchmarks/gpu_flaggems.sh ops|validate|vspeed|tok|speed   (carry .flaggems)"; exit 2 ;;
esac
(cd "$OUT" && tar czf results.tgz --remove-files $(ls -d *.json *.jsonl engine_flaggems 2>/dev/null) 2>/dev/null)
for name in "${STEPS[@]}"; do
  echo "==== $name"; grep -v -E "^(INFO|DEBUG)|USDT|^WARNING" "$OUT/$name.txt" | tail -30
done
