#!/bin/bash
# Stage the git-ignored folders the GPU scripts carry to the device machine (which has no network
# and no ../shared), from the repo root on this machine:
#   benchmarks/stage_carry.sh peerd      # .peerd: data.tar.xz (tokenizers, ShareGPT first 500 and filtered 500,
#                                        # the demo model) and wx/ (xgrammar + apache-tvm-ffi)
#   benchmarks/stage_carry.sh flaggems   # .flaggems: flag_gems 5.0.2 and what it needs beyond the image
#   benchmarks/stage_carry.sh vllm       # .peer1 ... .peerN: vLLM 0.26.0 and its dependencies (../shared/scripts),
#                                        # one tar in pieces of $PIECE_MB MiB (default 44): a call carries the
#                                        # project's tracked files too, and the device tool takes 64 MiB in all
#   benchmarks/stage_carry.sh repack     # the same repacking over .peer1 ... .peer6 already downloaded
# The GPU image runs Python 3.12 on x86_64; wheels are fetched for that, binary only.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$@"; }
mkdir -p .git/info
for d in '/.peer*/' '/.flaggems/'; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
case "${1:-}" in
peerd)
  rm -rf .peerd && mkdir -p .peerd/wx
  tmp=$(mktemp -d); mkdir -p "$tmp/datasets/serving" "$tmp/models"
  cp -r "$SHARED/tokenizers" "$tmp/"
  cp "$SHARED/datasets/serving/ShareGPT_V3_unfiltered_cleaned_split.first500.json" \
     "$SHARED/datasets/serving/ShareGPT_V3_filtered_500.json" "$tmp/datasets/serving/"
  cp -r "$SHARED/models/stories260k" "$tmp/models/"
  tar -C "$tmp" -cJf .peerd/data.tar.xz tokenizers datasets models
  get .peerd/wx xgrammar apache-tvm-ffi
  # the server's dependencies and the openai client with theirs (the image has none of them; the
  # GPU test run collects the server tests): resolved, all wheels; openai 1.x imports httpx
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .peerd/wx fastapi uvicorn prometheus-client pyzmq "openai==1.109.1"
  du -sh .peerd ;;
flaggems)
  rm -rf .flaggems && mkdir -p .flaggems
  get .flaggems flag_gems==5.0.2 sqlalchemy==2.0.48 greenlet
  ls .flaggems ;;
vllm|repack)
  [ "$1" = vllm ] && bash "$SHARED/scripts/peer-vllm-wheels.sh"
  tmp=$(mktemp -d); mkdir -p "$tmp/b/deps"
  cat .peer[1-5]/vllm.part* > "$tmp/b/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl"
  cp .peer6/*.whl "$tmp/b/deps/"
  rm -rf .peer[0-9]*
  tar -C "$tmp/b" -cf - . | split -b "${PIECE_MB:-44}M" -d -a 2 - "$tmp/bundle.part"
  i=1; for p in "$tmp"/bundle.part*; do mkdir -p .peer$i && mv "$p" .peer$i/; i=$((i+1)); done
  rm -rf "$tmp"; du -sh .peer[0-9]* ;;
*) echo "usage: $0 peerd|flaggems|vllm|repack"; exit 2 ;;
esac
