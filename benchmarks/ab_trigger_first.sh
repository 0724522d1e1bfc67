#!/bin/bash
# End-to-end A/B of the PDL launch signal's place (DEEPSERVE_PDL_TRIGGER_FIRST=0: after the
# wait, the old order; 1: before it, the default): V2-Lite with async scheduling, alternating,
# each run in its own process. GPU: bash benchmarks/ab_trigger_first.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for tf in 0 1 0 1; do
  DEEPSERVE_PDL_TRIGGER_FIRST=$tf timeout 200 python benchmarks/bench_engine.py --case v2lite --async-scheduling \
    > /tmp/ab_trigger_first.txt 2>&1
  echo "== trigger_first=$tf rc $?"
  grep -E "^\| v2" /tmp/ab_trigger_first.txt
done
