#!/bin/bash
# One GPU call for several issues' figures, most important first; a step that would not fit in
# $BUDGET seconds (default 330) is skipped. Needs .peerd (xgrammar wheels, tokenizers: see
# gpu_peer.sh) and, for the A/B of moved launch settings, .abold (the tree before the move:
# `git archive 5f2acc2 deepserve benchmarks tests pyproject.toml | tar -x -C .abold`).
#   issue 19  structured-output overhead at batch 64         (bench_structured.py)
#   issue 22  attention / MLA kernels, tree before vs after the launch-settings move (bench_ops.py)
#   issue 18  the CUDA-graph verify steps' GPU tests; bench_spec.py (step costs, n-gram speedup, MTP projection)
#   issue 21  4-bit kernels, decode and MoE against their rooflines (bench_int4.py)
#   issue 16  the fp8 small-batch MoE launch settings on this device (sweep_moe_small.py --fp8 --write)
#   issue 16  MLA decode over bf16 / e4m3 pools, split vs e4m3-MMA kernel (bench_r1.py --case kvattn)
#   issue 25  prefill / decode / mixed engine steps of the 8B at batch 64, with kernels (profile_mixed.py)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; BUDGET=${BUDGET:-330}; mkdir -p "$OUT/res"
# PIECE=N (carrying .peerN): also keep vLLM's wheel piece N for gpu_peer.sh setup on this warm machine
[ -n "${PIECE:-}" ] && mkdir -p /tmp/peer && cp ".peer$PIECE"/* /tmp/peer/ && echo "kept piece $PIECE"
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .peerd/wx/*.whl 2>&1 | grep -v WARN | tail -2
mkdir -p /tmp/d && tar -C /tmp/d -xJf .peerd/data.tar.xz
[ -e ../shared ] || ln -s /tmp/d ../shared 2>/dev/null || true   # the scripts' ../shared (tokenizers, datasets)
STEPS=${STEPS:-structured ops_new ops_old spec_gpu_tests kvattn mixed}   # which steps, in this order of the script
step() {  # step NAME SECONDS DIR COMMAND...: run COMMAND in DIR with at most SECONDS
  local name=$1 lim=$2 dir=$3; shift 3
  [[ " $STEPS " == *" $name "* ]] || return
  local left=$((BUDGET - SECONDS - 10))
  [ "$left" -lt 40 ] && { echo "== $name skipped: ${left}s left"; return; }
  [ "$lim" -gt "$left" ] && lim=$left
  local t0=$SECONDS
  (cd "$dir" && PYTHONPATH=/tmp/site:$PWD timeout "$lim" "$@") > "$OUT/$name.txt" 2>&1
  echo "== $name rc $? $((SECONDS - t0)) s"
}
#   issue 22  the GEMV / small-batch MoE / sorted MoE settings' move into tables (e4c7526): the trees just
#             before and after it (carry .abmvold .abmvnew: `git archive e4c7526^` / `e4c7526`), same call
step mv_engine_old 150 .abmvold python3 benchmarks/bench_engine.py --case llama8b v2lite --repeats 3
step mv_engine_new 150 .abmvnew python3 benchmarks/bench_engine.py --case llama8b v2lite --repeats 3
step mv_ops_old 60 .abmvold python3 benchmarks/bench_ops.py --only fused_moe --no-torch --out-dir "$OUT/mv_ops_old"
step mv_ops_new 60 .abmvnew python3 benchmarks/bench_ops.py --only fused_moe --no-torch --out-dir "$OUT/mv_ops_new"
#   every GPU test of the kernels and quantized serving (resolve() imports the kernels it names since
#   df457f8: before, a GPU test run without the triton_ops fixture could compare the torch reference with itself)
step gpu_tests 300 . python3 -m pytest -q -m gpu tests/ops tests/quant -rf -p no:cacheprovider
step gpu_tests_rest 240 . python3 -m pytest -q -m gpu tests --ignore=tests/ops --ignore=tests/quant -rf -p no:cacheprovider
#   the kernels changed since their last GPU run, against their torch references; the warm-up's coverage
step kern_tests 170 . python3 -m pytest -q -m gpu tests/ops/test_triton_attention.py tests/ops/test_triton_pointwise.py \
  tests/ops/test_fused_moe_shared.py tests/ops/test_triton_mla_prep.py tests/ops/test_triton_moe.py \
  tests/engine/test_graph_memory.py
step warm_v2 130 . python3 benchmarks/check_warm_up.py --model deepseek-v2-lite --load-format dummy
#   issue 25  V2-Lite's 1,088-token mixed steps, eager and as piecewise graphs (limit 2048)
step mixed_v2_pw 200 . python3 benchmarks/profile_mixed.py --model deepseek-v2-lite --batch 64 --mixed-lens 1024 \
  --piecewise-max-tokens 2048 --profile 0 --out "$OUT/res/profile_mixed_v2lite_pw2048.json"
step structured 80 . python3 benchmarks/bench_structured.py --tokenizer /tmp/d/tokenizers/deepseek-r1-distill-llama-8b \
  --batches 64 --repeats 3 --out-dir "$OUT/res"
step ops_new 45 . python3 benchmarks/bench_ops.py --only decode_,prefill_ --no-torch --out-dir "$OUT/ops_new"
step ops_old 45 .abold python3 benchmarks/bench_ops.py --only decode_,prefill_ --no-torch --out-dir "$OUT/ops_old"
step spec_gpu_tests 90 . python3 -m pytest -q -m gpu tests/engine/test_spec_decode_graphs.py \
  tests/ops/test_triton_attention.py::test_tiny_heads_gpu -o log_cli=true \
  --log-cli-level=WARNING
step spec_bench 220 . python3 benchmarks/bench_spec.py --out "$OUT/res/spec.json"
#   issue 25  the host's time in eager and piecewise 128-token mixed steps (cProfile), with their kernels
step mixed_host 150 . python3 benchmarks/profile_mixed.py --model r1-distill-llama-8b --batch 64 --mixed-lens 64 \
  --profile 3 --profile-len 64 --profile-eager --host-profile 3 --top 25 --out "$OUT/res/profile_mixed_128.json"
#   issue 21  the W4A16 launch settings swept into this device's table, then the 4-bit kernels timed with it
step int4_sweep 130 . python3 benchmarks/sweep_int4.py --write
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
step int4 200 . python3 benchmarks/bench_int4.py
#   issue 21  the GEMV's K splits and the W4A8 tiles first (neither swept on the current kernels), then
#   the 8B decode W4A16 against bf16 and the dense kernels with the new table
step int4_sweep_gemv 200 . python3 benchmarks/sweep_int4.py --write --kernels gemv,w4a8
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
step int4_decode 240 . python3 benchmarks/bench_int4.py --part decode dense
#   the same without the W4A8 tiles (the GEMV's settings alone, then the figures)
step int4_sweep_gemv_only 150 . python3 benchmarks/sweep_int4.py --write --kernels gemv
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
step int4_decode_after 240 . python3 benchmarks/bench_int4.py --part decode dense
#   issue 21  the weights-first W4A8 kernel: GPU tests at model shapes, its tiles swept against the
#   weights-second kernel at 1,024 rows, then the dense kernels' figures with that table
step w4a8_tests 150 . python3 -m pytest -q -m gpu tests/ops/test_triton_int4.py
step int4_sweep_w4a8 200 . python3 benchmarks/sweep_int4.py --write --kernels w4a8
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
step int4_dense 150 . python3 benchmarks/bench_int4.py --part dense
#   issue 21  the GEMV's and small-batch MoE's DEQ 2 candidates swept, then the 8B decode and the MoE figures
step int4_sweep_deq 220 . python3 benchmarks/sweep_int4.py --write --kernels gemv,moe_gate_up,moe_down
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
step int4_decode_moe 260 . python3 benchmarks/bench_int4.py --part decode moe
#   issue 21  the GEMV's packed reads alone (same access pattern, no arithmetic) beside the GEMV
step gemv_read 180 . python3 benchmarks/gemv_read_only.py
#   issue 21  the MoE down's all-slots tiles (SLOTS) and the bf16-pair GEMM / sorted MoE (PAIRS) swept
step int4_sweep_next 260 . python3 benchmarks/sweep_int4.py --write --kernels moe_down,moe_sorted,gemm
#   issue 21  the small-batch int4 MoE in packed fp16 (DEQ 3) against its table, written where it wins
step int4_moe_tests 60 . python3 -m pytest -q -m gpu tests/ops/test_triton_moe_int4.py -rf -p no:cacheprovider
step int4_sweep_moe_deq3 150 . python3 benchmarks/sweep_int4.py --write --kernels moe_gate_up,moe_down --deq 3
step int4_moe 60 . python3 benchmarks/bench_int4.py --part moe
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/" 2>/dev/null
#   issue 16  the fp8-pool MLA decode against the reference, one setting changed at a time (the R1-shape
#             GPU test's case: which setting moves the 128-head, several-split output)
step mla_fp8_diag 90 . python3 benchmarks/diag_mla_fp8.py
#   issue 16  the R1-shape fp8 MLA GPU test as `pytest -m gpu` runs it (first, no Triton module imported:
#             resolve gave the torch reference, compared with itself), then the file's GPU tests
step mla_fp8_pytest 200 . bash -c 'python3 benchmarks/diag_mla_fp8.py --as-test; \
  python3 -m pytest -q -m gpu tests/ops/test_kv_fp8_ops.py 2>&1 | tail -8'
#   issue 16  R1's fp8 batch-1 step without PDL (each kernel's own time, no overlap with its predecessor)
step r1_share_nopdl 90 . env DEEPSERVE_PDL=0 python3 benchmarks/ops_share.py --model deepseek-r1 --quantization fp8 \
  --ops triton --batch 1 --hf-overrides '{"num_hidden_layers": 5}'
#   issue 16  R1's fp8 projections at one row: the op (tensor-core GEMM) beside the CUDA-core GEMV
#   (--write: each shape's fastest one-row kernel into this device's fp8_gemv table, for the steps after it)
#   issue 16  the one-row fp8 GEMV in packed fp16 (H2): its PTX at R1's shapes against the torch op, the worst case
step fp8_h2_tests 150 . python3 -m pytest -q -m gpu tests/ops/test_triton_quant_gemm.py -rf -p no:cacheprovider
step fp8_gemv 260 . python3 benchmarks/bench_quant_gemm.py --m 1 --out-dir "$OUT/res" --write
mkdir -p "$OUT/fp8_gemv_cfg" && cp deepserve/ops/triton/configs/fp8_gemv/*.json "$OUT/fp8_gemv_cfg/" 2>/dev/null
#   issue 16  the fp8 KV kernels (the merge by the last split among them) at model sizes
step fp8_kv_tests 120 . python3 -m pytest -q -m gpu tests/ops/test_kv_fp8_ops.py
#   issue 21  where the W4A16 decode step's time goes, beside the bf16 one (kernels, graph, host)
step profile_w4a16 150 . python3 benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1 \
  --quantization compressed-tensors --out "$OUT/res/profile_8b_w4a16_b1.json"
step profile_bf16 150 . python3 benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1 \
  --out "$OUT/res/profile_8b_bf16_b1.json"
#   issue 16  the sorted fused MoE at R1's decode sizes (32-512 tokens) into this device's table
step moe_sweep_r1 120 . python3 benchmarks/sweep_fused_moe.py --decode --shape r1 --write
mkdir -p "$OUT/fused_moe_cfg" && cp deepserve/ops/triton/configs/fused_moe/*.json "$OUT/fused_moe_cfg/" 2>/dev/null
# the sweep writes the package's own table, so the R1 figures after it run with the new settings
step moe_small_fp8 150 . python3 benchmarks/sweep_moe_small.py --fp8 --write
#   issue 16  the fp8 down kernel with every slot in one step (R1's routed + shared experts), swept into
#   this device's table, then the small path's GPU tests with that table
step moe_small_fp8_slots 160 . python3 benchmarks/sweep_moe_small.py --fp8 --kernels down_slots --write
step moe_small_tests 100 . python3 -m pytest -q -m gpu tests/ops/test_triton_fused_moe_small.py \
  tests/ops/test_fused_moe_shared.py
cp -r deepserve/ops/triton/configs/fused_moe_small "$OUT/moe_small_cfg" 2>/dev/null
#   issue 16  the fp8 linear op (one row: the GEMV quantizing its row) against the torch reference
step fp8_op_tests 100 . python3 -m pytest -q -m gpu tests/quant/test_serving.py -k fp8_kernel
#   issue 16  batch 1 alone on the compare cut (the one-row fp8 GEMV quantizing its row, q_a / kv_a stacked)
step r1_fp8_b1 110 . python3 benchmarks/bench_r1.py --out-dir "$OUT/res/b1" --case experts --weights fp8 --cut compare \
  --batches 1
step r1_fp8 130 . python3 benchmarks/bench_r1.py --out-dir "$OUT/res" --case experts --weights fp8 --cut compare
#   the same with the one-row fp8 GEMV off (DEEPSERVE_FP8_GEMV=0: the tensor-core GEMM for every fp8 projection)
step r1_fp8_gemm 130 . env DEEPSERVE_FP8_GEMV=0 python3 benchmarks/bench_r1.py --out-dir "$OUT/res/gemm" --case experts \
  --weights fp8 --cut compare --batches 1
#   and on (DEEPSERVE_FP8_GEMV=1: the GEMV for every fp8 projection at one row, on a device whose table has no rule)
step r1_fp8_gemv 130 . env DEEPSERVE_FP8_GEMV=1 python3 benchmarks/bench_r1.py --out-dir "$OUT/res/gemv" --case experts \
  --weights fp8 --cut compare --batches 1
step r1_bf16 130 . python3 benchmarks/bench_r1.py --out-dir "$OUT/res" --case experts --weights bf16 --cut compare
#   bf16 on 3 + 2 as well: with the compare cut, the line a + m * c that gives bf16 on the big fp8 cut
#   (`bench_r1.py --case table` over both folders: fp8_over_bf16_3d8m_*_extrapolated)
step r1_bf16_m2 110 . python3 benchmarks/bench_r1.py --out-dir "$OUT/res" --case experts --weights bf16 --moe-layers 2
#   the most MoE layers fp8 fits (3 dense + 8 on an H200): per-layer bytes, the MoE layer in the model, decode
step r1_fp8_big 170 . python3 benchmarks/bench_r1.py --out-dir "$OUT/res/big" --case experts --weights fp8 --cut big
#   issue 16  the fp8 MLA decode's settings with the merge by the last split (fused_merge) among them, then kvattn
step mla_fp8_sweep 200 . python3 benchmarks/sweep_mla_decode.py --fp8 --write
mkdir -p "$OUT/mla_fp8_cfg" && cp deepserve/ops/triton/configs/mla_decode_fp8/*.json "$OUT/mla_fp8_cfg/" 2>/dev/null
step kvattn 70 . python3 benchmarks/bench_r1.py --case kvattn --out-dir "$OUT/res"
step mixed 100 . python3 benchmarks/profile_mixed.py --model r1-distill-llama-8b --batch 64 --out "$OUT/profile_mixed.json"
# the same script over the tree before (.abold's deepserve first on the path)
step mixed_old 100 .abold python3 ../benchmarks/profile_mixed.py --model r1-distill-llama-8b --batch 64 \
  --profile 0 --out "$OUT/profile_mixed_old.json"
#   issue 25  piecewise CUDA graphs: GPU tests and the mixed-step figure (profile_mixed.py)
step piecewise_tests 100 . python3 -m pytest -q -m gpu tests/engine/test_piecewise_graphs.py tests/ops/test_profile.py
step piecewise_fig 200 . python3 benchmarks/profile_mixed.py --model r1-distill-llama-8b --batch 64 --profile 0 \
  --mixed-lens 64,192,448,1024 --piecewise-max-tokens 1152 --out "$OUT/res/profile_mixed_piecewise.json"
#   issue 24  the Triton GEMM against cuBLAS (tests, sweep into the device table), op-call and GPU-time shares
#   (the sweep writes a rule per swept shape and bucket, decode's buckets first, each bucket as it is done)
step gemm_tests 90 . python3 -m pytest -q -m gpu tests/ops/test_triton_gemm.py tests/ops/test_triton_gemv.py
step gemm_sweep 150 . python3 benchmarks/sweep_gemm.py --models llama8b --out "$OUT/res/sweep_gemm.json" --write
cp -r deepserve/ops/triton/configs/gemm "$OUT/gemm_cfg" 2>/dev/null
step share_8b_all 60 . python3 benchmarks/ops_share.py --model r1-distill-llama-8b --ops triton-all --batch 1 64
step share_8b 60 . python3 benchmarks/ops_share.py --model r1-distill-llama-8b --ops triton --batch 1 64
step share_r1_all 80 . python3 benchmarks/ops_share.py --model deepseek-r1 --quantization fp8 --ops triton-all \
  --batch 1 64 --hf-overrides '{"num_hidden_layers": 5}'
step share_r1 80 . python3 benchmarks/ops_share.py --model deepseek-r1 --quantization fp8 --ops triton \
  --batch 1 64 --hf-overrides '{"num_hidden_layers": 5}'
#   issue 24  decode tok/s of the 8B, default ops against every op in Triton (--ops triton-all)
step engine_8b 100 . python3 benchmarks/bench_engine.py --case llama8b --repeats 3
step engine_8b_all 100 . env DEEPSERVE_OPS=triton-all python3 benchmarks/bench_engine.py --case llama8b --repeats 3
step gemm_sweep_more 200 . python3 benchmarks/sweep_gemm.py --models r1 v2lite --out "$OUT/res/sweep_gemm_more.json" --write
mkdir -p "$OUT/gemm_cfg" && cp deepserve/ops/triton/configs/gemm/*.json "$OUT/gemm_cfg/" 2>/dev/null
mkdir -p "$OUT/res"; cp benchmarks/results/int4_*.json "$OUT/res/" 2>/dev/null
mkdir -p "$OUT/int4_cfg" && cp deepserve/ops/triton/configs/int4/*.json "$OUT/int4_cfg/"   # after every int4 sweep step
keep="res ops_new ops_old mla_fp8_cfg moe_small_cfg gemm_cfg int4_cfg fused_moe_cfg mv_old mv_new mv_ops_old mv_ops_new"
cd "$OUT" && tar czf results.tgz $keep 2>/dev/null; rm -rf $keep
for f in $STEPS; do echo "==== $f"; grep -v -E "^(INFO|DEBUG|WARNING)|USDT" "$OUT/$f.txt" 2>/dev/null | tail -28; done
