#!/bin/bash
# Issue 25 (vLLM beside deepserve) and issue 19 (structured-output overhead) on one GPU.
# vLLM 0.26.0 and its dependencies come as one tar in pieces of 44 MiB (`benchmarks/stage_carry.sh
# vllm`: .peer1 ... .peer8), each carried by its own call to one warm machine and kept in /tmp/peer;
# then:
#   benchmarks/gpu_peer.sh piece N           # carry .peerN: keep its piece in /tmp/peer
#   benchmarks/gpu_peer.sh setup             # carry .peerd: install vLLM + deps, unpack data
#   benchmarks/gpu_peer.sh setup_ds          # the same without vLLM (no pieces): for `variants` alone
#   benchmarks/gpu_peer.sh structured        # issue 19: bench_structured.py on the 8B preset
#   benchmarks/gpu_peer.sh peer PRESET SERVERS [CASES]   # peer_vllm.py; results + logs into $OUT
#                                      (PEER_ARGS: more peer_vllm.py flags, e.g. --random-weights;
#                                       DS_ARGS: deepserve serve's extra flags, one string;
#                                       PEER_ARGS="--profile c256:3:60,sharegpt:5:150": both servers'
#                                       steps, benchmarks/trace_steps.py, into $OUT/steps_PRESET_CASE.json)
#   VARIANTS="a=FLAGS|b=FLAGS" benchmarks/gpu_peer.sh variants PRESET [CASES]   # deepserve alone, per variant
# .peerd holds data.tar.xz (tokenizers, ShareGPT first 500, the demo model from ../shared) and
# wx/ (xgrammar + apache-tvm-ffi wheels for deepserve's structured outputs).
set -u
export PYTHONUNBUFFERED=1
D=/tmp/d; SITE=/tmp/vsite; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "$1" in
piece)
  mkdir -p /tmp/peer && cp ".peer$2"/* /tmp/peer/ && ls -la /tmp/peer
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
setup|setup_ds)   # setup_ds: the server's dependencies without vLLM (deepserve alone: `variants`)
  vllm=(); deps=()
  if [ "$1" = setup ]; then
    mkdir -p /tmp/pb && cat /tmp/peer/bundle.part* | tar -C /tmp/pb -xf -
    vllm=(/tmp/pb/vllm-*.whl); deps=(/tmp/pb/deps/*.whl)
  fi
  # wx/ repeats some of the dependencies (openai & co.); pip refuses a distribution given twice,
  # so a wheel whose distribution the bundle has is left out
  extra=(); for w in .peerd/wx/*.whl; do
    n=$(basename "$w"); n=${n%%-*}; compgen -G "/tmp/pb/deps/$n-*.whl" > /dev/null || extra+=("$w"); done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
    "${vllm[@]}" "${deps[@]}" "${extra[@]}" 2>&1 | grep -v WARN | tail -3
  mkdir -p $D && tar -C $D -xJf .peerd/data.tar.xz && ls $D/*
  [ "$1" = setup ] && PYTHONPATH=$SITE python3 -c "import vllm, xgrammar, fastapi, zmq; print('vllm', vllm.__version__)" 2>&1 | tail -2
  python3 - <<'PY'
import torch
n = 1 << 30; a = torch.empty(n, dtype=torch.bfloat16, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); s.record()
for _ in range(10): b.copy_(a)
e.record(); torch.cuda.synchronize()
print(f"copy bandwidth {2 * n * 2 / (s.elapsed_time(e) / 1e4) / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}")
PY
  ;;
structured)
  PYTHONPATH=$SITE:$PWD python3 benchmarks/bench_structured.py --tokenizer $D/tokenizers/deepseek-r1-distill-llama-8b \
    --out-dir "$OUT/structured" 2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -15 ;;
peer)
  tok=$D/tokenizers/deepseek-r1-distill-llama-8b; [ "$2" = deepseek-v2-lite ] && tok=$D/tokenizers/deepseek-r1
  PYTHONPATH=$PWD python3 benchmarks/peer_vllm.py "$2" --tokenizer $tok --servers "$3" --cases "${4:-c1,c64,c256,sharegpt}" \
    --sharegpt $D/datasets/serving/ShareGPT_V3_unfiltered_cleaned_split.first500.json \
    --vllm-path $SITE --deps-path $SITE --out-dir /tmp/po ${PEER_ARGS:-} ${DS_ARGS:+"--deepserve-args=$DS_ARGS"}
  cp /tmp/po/peer_*.json "$OUT/" 2>/dev/null
  # PEER_ARGS="--profile CASE:DELAY_S:STEPS[,...]": each profiled case's steps of the servers side by
  # side (trace_<server>/<case>), into $OUT/steps_PRESET_CASE.json; not the traces
  for c in $(echo "${4:-c1,c64,c256,sharegpt}" | tr , ' '); do
    traces=(); labels=()
    for s in ${3//,/ }; do [ -d "/tmp/po/trace_$s/$c" ] && traces+=("/tmp/po/trace_$s/$c") && labels+=("$s"); done
    [ ${#traces[@]} -eq 0 ] && continue
    labels_csv=$(IFS=,; echo "${labels[*]}")
    echo "== steps of $c"
    python3 benchmarks/trace_steps.py "${traces[@]}" --labels "$labels_csv" --json "$OUT/steps_$2_$c.json"
  done
  tar czf "$OUT/peer_logs_$2_${3//,/_}.tgz" -C /tmp/po --exclude='model-*' --exclude='trace_*' . ;;
variants)  # deepserve alone, one server per variant: VARIANTS="label=flags|label=flags" (after setup)
  DEPS=$SITE OUT=$OUT bash benchmarks/gpu_served.sh variants "$2" "${3:-c256,sharegpt}" ;;
*) echo "usage: $0 piece N | setup | setup_ds | structured | peer PRESET SERVERS [CASES] | variants PRESET [CASES]"; exit 2 ;;
esac
