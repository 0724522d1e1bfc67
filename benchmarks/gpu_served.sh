#!/bin/bash
# deepserve's served figures on one GPU without vLLM (issues 25 and 17): the same
# `deepserve bench serve` cases as peer_vllm.py, one server per engine variant, back to back,
# then served vs offline (served_vs_offline.sh). Carry .svo (the server's wheels) and .peerd
# (tokenizers, ShareGPT first 500: see gpu_peer.sh).
#   benchmarks/gpu_served.sh variants [PRESET] [CASES]    # VARIANTS="label=flags|label=flags"
#   benchmarks/gpu_served.sh svo                          # served_vs_offline.sh (SVO_ENGINE_ARGS)
#   benchmarks/gpu_served.sh hop                          # ttft_hop.py: the core apart vs in-process at c1
set -u
export PYTHONUNBUFFERED=1
# DEPS: where the server's wheels are installed (gpu_peer.sh's setup puts them in /tmp/vsite)
OUT=${OUT:-/tmp/out}; D=/tmp/d; DEPS=${DEPS:-/tmp/site}; mkdir -p "$OUT" $D
[ -d .svo ] && python3 -m pip install -q --no-index --no-deps --no-compile --target "$DEPS" .svo/*.whl 2>&1 | grep -v WARN | tail -2
[ -e .peerd/data.tar.xz ] && tar -C $D -xJf .peerd/data.tar.xz
[ -e ../shared ] || ln -s $D ../shared 2>/dev/null || true
case "$1" in
variants)
  preset=${2:-r1-distill-llama-8b}
  tok=$D/tokenizers/deepseek-r1-distill-llama-8b; [ "$preset" = deepseek-v2-lite ] && tok=$D/tokenizers/deepseek-r1
  IFS='|' read -ra variants <<< "${VARIANTS:-sync=--no-async-scheduling|async=|async_pw=--cudagraph-mode FULL_AND_PIECEWISE}"
  for v in "${variants[@]}"; do
    label=${v%%=*}; flags=${v#*=}
    echo "== $label: $flags"
    mkdir -p "/tmp/po_$label"   # a peer run's random checkpoint (gpu_peer.sh peer), when there is one, serves every variant
    [ -d "/tmp/po/model-$preset" ] && ln -sfn "/tmp/po/model-$preset" "/tmp/po_$label/model-$preset"
    PYTHONPATH=$PWD python3 benchmarks/peer_vllm.py "$preset" --tokenizer "$tok" --servers deepserve \
      --cases "${3:-c64,c256}" --deps-path "$DEPS" --out-dir "/tmp/po_$label" \
      --sharegpt $D/datasets/serving/ShareGPT_V3_unfiltered_cleaned_split.first500.json \
      --deepserve-args="$flags" ${PEER_ARGS:-} 2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -12
    mkdir -p "$OUT/$label" && cp /tmp/po_$label/peer_*.json "$OUT/$label/" 2>/dev/null
    tar czf "$OUT/logs_$label.tgz" -C /tmp/po_$label --exclude='model-*' . 2>/dev/null
  done ;;
svo)
  OUT="$OUT/svo" PYTHONPATH=/tmp/site TOKENIZER=$D/tokenizers/deepseek-r1-distill-llama-8b \
    ENGINE_ARGS="--load-format dummy ${SVO_ENGINE_ARGS:-}" bash benchmarks/served_vs_offline.sh ;;
hop)  # what the engine core's own process adds to TTFT at concurrency 1 (benchmarks/ttft_hop.py)
  tok=$D/tokenizers/deepseek-r1-distill-llama-8b
  PYTHONPATH=$PWD:/tmp/site python3 benchmarks/ttft_hop.py --engine --model r1-distill-llama-8b --tokenizer "$tok" \
    --engine-kwargs '{"load_format": "dummy", "kv_cache_memory_bytes": 8589934592}' --prompt-len 1024 --max-tokens 1 \
    --requests "${HOP_REQUESTS:-64}" 2>&1 | grep -v -E "^(INFO|DEBUG)" | tee "$OUT/ttft_hop_engine.txt" | tail -6
  PYTHONPATH=$PWD:/tmp/site python3 benchmarks/ttft_hop.py --model r1-distill-llama-8b --tokenizer "$tok" \
    --engine-args "--load-format dummy --kv-cache-memory-bytes 8589934592" --prompt-len 1024 \
    --requests "${HOP_REQUESTS:-64}" 2>&1 | tee "$OUT/ttft_hop_http.txt" | tail -5 ;;
*) echo "usage: $0 variants [PRESET] [CASES] | svo | hop"; exit 2 ;;
esac
