"""`vllm serve` 0.26 flags that `deepserve serve` has no option for: each is taken by the parser
(hidden from --help) so that giving it is one line naming the flag and why, not argparse's
"unrecognized arguments". A value that asks for what deepserve does anyway passes (`--runner
generate`, `--tokenizer-mode hf`), and so do the switches that turn off something deepserve does
not have (`--disable-custom-all-reduce`, `--no-enable-lora`).

The flags are vLLM's (engine/arg_utils.py EngineArgs.add_cli_args, entrypoints/openai/cli_args.py),
grouped by the feature they belong to.
"""
from __future__ import annotations

import argparse
from typing import Iterable, Mapping, Optional

_LOADER = "a setting of vLLM's weight loader; deepserve's loader reads the folder's safetensors and has none"
_SCHEDULER = "a setting of vLLM's scheduler that deepserve's scheduler does not have"
_METRICS = "deepserve has none of vLLM's extra tracing and metrics (its metrics are at /metrics)"
_KERNELS = "kernel backends are chosen with --ops (auto | torch | triton | triton-all | flaggems)"
_HUB = "deepserve serves local model folders and downloads nothing from the Hugging Face Hub"
_CODE = "it loads user code (a plugin, class or import path), which deepserve does not run"
_DP_LB = ("deepserve has no external or hybrid load balancing over data-parallel ranks: one server (with "
          "--api-server-count front ends) serves every rank")

# (why, flags): the flags refused for that reason
_GROUPS = (
    ("deepserve serves no LoRA adapters",
     ("--lora-modules", "--enable-lora", "--max-loras", "--max-lora-rank", "--lora-dtype",
      "--enable-tower-connector-lora", "--max-cpu-loras", "--fully-sharded-loras", "--lora-target-modules",
      "--default-mm-loras", "--specialize-active-lora", "--enable-mixed-moe-lora-format",
      "--enable-moe-shared-loras")),
    ("deepserve serves text models, no multi-modal inputs",
     ("--allowed-local-media-path", "--allowed-media-domains", "--language-model-only", "--limit-mm-per-prompt",
      "--enable-mm-embeds", "--media-io-kwargs", "--mm-processor-kwargs", "--mm-processor-cache-gb",
      "--mm-processor-cache-type", "--mm-shm-cache-max-object-size-mb", "--mm-encoder-only",
      "--mm-encoder-tp-mode", "--mm-encoder-attn-backend", "--mm-encoder-attn-dtype", "--mm-encoder-fp8-scale-path",
      "--mm-encoder-fp8-scale-save-path", "--mm-encoder-fp8-scale-save-margin", "--interleave-mm-strings",
      "--skip-mm-profiling", "--video-pruning-rate", "--mm-tensor-ipc", "--mm-ipc-gpu-memory-gb",
      "--disable-chunked-mm-input")),
    ("prompts are text or token ids, not embeddings", ("--enable-prompt-embeds",)),
    ("deepserve serves no pooling models (embeddings, classification, scores)",
     ("--runner", "--convert", "--pooler-config", "--enable-flash-late-interaction", "--io-processor-plugin")),
    ("deepserve has no KV cache transfer or offloading (disaggregated prefill / decode)",
     ("--kv-transfer-config", "--kv-events-config", "--ec-transfer-config", "--kv-offloading-size",
      "--kv-offloading-backend", "--tokens-only")),
    ("deepserve has no weight transfer between processes (RL weight updates)", ("--weight-transfer-config",)),
    ("weights stay in device memory (no offloading to host memory)",
     ("--offload-backend", "--cpu-offload-gb", "--cpu-offload-params", "--offload-group-size",
      "--offload-num-in-group", "--offload-prefetch-step", "--offload-params")),
    ("deepserve serves DeepSeek, Qwen2 and Llama models, no Mamba or linear-attention ones",
     ("--mamba-backend", "--enable-mamba-cache-stochastic-rounding", "--mamba-cache-philox-rounds",
      "--mamba-cache-dtype", "--mamba-ssm-cache-dtype", "--mamba-block-size", "--mamba-cache-mode",
      "--gdn-prefill-backend")),
    ("deepserve serves no diffusion models", ("--diffusion-config",)),
    ("deepserve has no sleep mode", ("--enable-sleep-mode", "--enable-cumem-allocator")),
    (_CODE, ("--tool-parser-plugin", "--reasoning-parser-plugin", "--middleware", "--logits-processors",
             "--worker-cls", "--worker-extension-cls", "--scheduler-cls", "--model-class-overrides",
             "--model-impl")),
    (_HUB, ("--revision", "--code-revision", "--tokenizer-revision", "--download-dir", "--hf-token")),
    ("config.json is read from the model folder", ("--hf-config-path",)),
    ("the tokenizer is the folder's tokenizer.json, read with the tokenizers library", ("--tokenizer-mode",)),
    ("prompts are rendered and tokenized in a worker thread of each API server (--api-server-count sets how "
     "many)", ("--renderer-num-workers",)),
    ("config.json is read in Hugging Face's format", ("--config-format",)),
    (_LOADER, ("--safetensors-load-strategy", "--safetensors-prefetch-num-threads",
               "--safetensors-prefetch-block-size", "--model-loader-extra-config", "--ignore-patterns",
               "--pt-load-map-location", "--max-parallel-loading-workers", "--use-tqdm-on-load")),
    ("quantization settings come from the checkpoint's config.json and --quantization",
     ("--quantization-config", "--allow-deprecated-quantization")),
    ("every layer's KV cache takes --kv-cache-dtype (no layer is skipped)", ("--kv-cache-dtype-skip-layers",)),
    (_KERNELS, ("--attention-backend", "--attention-config", "--kernel-config", "--ir-op-priority",
                "--enable-flashinfer-autotune", "--enable-bf16x3-router-gemm", "--moe-backend", "--linear-backend",
                "--override-attention-dtype")),
    ("tensor / pipeline parallel over several nodes runs on Ray (--distributed-executor-backend ray, or a "
     "hostfile); data parallel over nodes takes --data-parallel-address and --headless",
     ("--master-addr", "--master-port", "--nnodes", "--node-rank")),
    ("process-group timeouts are not settable", ("--distributed-timeout-seconds",
                                                  "--cpu-distributed-timeout-seconds")),
    ("deepserve does not bind ranks to NUMA nodes", ("--numa-bind", "--numa-bind-nodes", "--numa-bind-cpus")),
    ("the GPUs are chosen with CUDA_VISIBLE_DEVICES", ("--device-ids",)),
    ("deepserve has no context parallelism",
     ("--decode-context-parallel-size", "--dcp-comm-backend", "--dcp-kv-cache-interleave-size",
      "--cp-kv-cache-interleave-size", "--prefill-context-parallel-size")),
    (_DP_LB, ("--data-parallel-rank", "--data-parallel-hybrid-lb", "--data-parallel-external-lb",
              "--data-parallel-multi-port-external-lb", "--data-parallel-supervisor-port",
              "--dp-supervisor-probe-interval-s", "--dp-supervisor-probe-timeout-s",
              "--dp-supervisor-probe-failure-threshold")),
    ("data-parallel ranks run as local processes, or on Ray with --distributed-executor-backend ray",
     ("--data-parallel-backend",)),
    ("deepserve has no expert load balancing (EPLB, elastic EP, other placements): each EP rank holds a "
     "contiguous range of experts",
     ("--enable-eplb", "--eplb-config", "--enable-elastic-ep", "--expert-placement-strategy",
      "--enable-ep-weight-filter")),
    ("deepserve has no dual batch overlap", ("--enable-dbo", "--ubatch-size", "--dbo-decode-token-threshold",
                                             "--dbo-prefill-token-threshold")),
    ("it is a setting of vLLM's data-parallel synchronization, which deepserve does not have",
     ("--disable-nccl-for-dp-synchronization",)),
    ("deepserve does not start Ray workers under Nsight", ("--ray-workers-use-nsight",)),
    ("deepserve has no KV cache sharing across layers", ("--kv-sharing-fast-prefill", "--prefix-match-unit")),
    (_SCHEDULER, ("--max-num-scheduled-tokens", "--max-num-partial-prefills", "--max-long-partial-prefills",
                  "--long-prefill-token-threshold", "--scheduler-reserve-full-isl", "--watermark",
                  "--prefill-schedule-interval")),
    (_METRICS, ("--show-hidden-metrics-for-version", "--otlp-traces-endpoint", "--collect-detailed-traces",
                "--kv-cache-metrics", "--kv-cache-metrics-sample", "--cudagraph-metrics",
                "--enable-layerwise-nvtx-tracing", "--enable-mfu-metrics", "--enable-logging-iteration-details",
                "--jit-monitor-mode", "--jit-monitor-verbose", "--aggregate-engine-logging",
                "--enable-per-request-metrics")),
    ("the routed experts are not returned", ("--enable-return-routed-experts",)),
    ("logprobs are the sampled distribution's log-probabilities", ("--logprobs-mode",)),
    ("deepserve has no float64 Gumbel sampling", ("--use-fp64-gumbel",)),
    ("deepserve's Responses API has no built-in tool servers", ("--tool-server",)),
    ("certificates are loaded once, at start", ("--enable-ssl-refresh",)),
    ("requests may carry any number of headers (their size is --h11-max-incomplete-event-size's)",
     ("--h11-max-header-count",)),
    ("the API docs (/docs, /redoc) load their assets from a CDN", ("--enable-offline-docs",)),
    ("deepserve has no gRPC server", ("--grpc",)),
    ("error responses are logged in one line (DEEPSERVE_DEBUG=1 shows tracebacks)", ("--log-error-stack",)),
    ("a streamed request's output is logged once, as it ends", ("--enable-log-deltas",)),
    ("it sets vLLM's platform plugins, which deepserve does not have", ("--additional-config",)),
    ("deepserve has no performance modes: --max-num-seqs, --cuda-graph-sizes and --cudagraph-mode set what "
     "they tune", ("--performance-mode",)),
    ("deepserve has no environment validation settings", ("--fail-on-environ-validation",)),
)
# values that ask for what deepserve does anyway: accepted, with no effect
_SERVED = {"--runner": ("auto", "generate"), "--convert": ("auto", "none"), "--tokenizer-mode": ("auto", "hf"),
           "--config-format": ("auto", "hf"), "--model-impl": ("auto", "vllm"), "--cpu-offload-gb": ("0",),
           "--logprobs-mode": ("raw_logprobs",),
           "--expert-placement-strategy": ("linear",), "--data-parallel-backend": ("mp",),
           "--decode-context-parallel-size": ("1",), "--prefill-context-parallel-size": ("1",),
           "--max-num-partial-prefills": ("1",), "--max-long-partial-prefills": ("1",),
           "--kv-offloading-size": ("0",), "--tool-parser-plugin": ("",),
           "--worker-cls": ("auto",), "--performance-mode": ("balanced",)}
# switches that turn off what deepserve does not have: accepted, with no effect
SATISFIED = {
    "--disable-custom-all-reduce": "vLLM's custom all-reduce kernel (deepserve's all-reduce is torch.distributed's)",
    "--disable-sliding-window": "sliding-window attention (the models served attend over the whole context)",
    "--disable-cascade-attn": "cascade attention",
    "--disable-hybrid-kv-cache-manager": "vLLM's hybrid KV cache manager (one KV cache layout serves every layer)",
    "--no-enable-log-deltas": "streamed output deltas in the request log (a request's output is logged as it ends)",
}
REFUSED = {flag: why for why, flags in _GROUPS for flag in flags}
# the flags of REFUSED and SATISFIED that vLLM declares as switches with a --no- form (argparse's
# BooleanOptionalAction): `--no-enable-lora` asks for the feature off, as it is here, and
# `--no-disable-custom-all-reduce` for vLLM's default: both pass
NEGATABLE = (
    "--disable-custom-all-reduce", "--disable-sliding-window", "--disable-cascade-attn",
    "--disable-hybrid-kv-cache-manager",
    "--enable-lora", "--enable-tower-connector-lora", "--fully-sharded-loras", "--specialize-active-lora",
    "--enable-mixed-moe-lora-format", "--enable-moe-shared-loras", "--language-model-only", "--enable-mm-embeds",
    "--mm-encoder-only", "--interleave-mm-strings", "--skip-mm-profiling", "--disable-chunked-mm-input",
    "--enable-prompt-embeds", "--enable-flash-late-interaction", "--tokens-only",
    "--enable-mamba-cache-stochastic-rounding", "--enable-sleep-mode", "--enable-cumem-allocator",
    "--use-tqdm-on-load", "--allow-deprecated-quantization", "--enable-flashinfer-autotune",
    "--enable-bf16x3-router-gemm", "--numa-bind", "--data-parallel-hybrid-lb", "--data-parallel-external-lb",
    "--enable-eplb", "--enable-elastic-ep", "--enable-ep-weight-filter", "--enable-dbo",
    "--disable-nccl-for-dp-synchronization", "--ray-workers-use-nsight", "--kv-sharing-fast-prefill",
    "--scheduler-reserve-full-isl", "--kv-cache-metrics", "--cudagraph-metrics", "--enable-layerwise-nvtx-tracing",
    "--enable-mfu-metrics", "--enable-logging-iteration-details", "--jit-monitor-verbose",
    "--enable-per-request-metrics", "--enable-return-routed-experts", "--use-fp64-gumbel", "--enable-ssl-refresh",
    "--enable-offline-docs", "--log-error-stack", "--fail-on-environ-validation",
)
# vLLM's short spellings of them
_SHORT = {"--nnodes": "-n", "--node-rank": "-r", "--decode-context-parallel-size": "-dcp",
          "--prefill-context-parallel-size": "-pcp", "--data-parallel-rank": "-dpn", "--data-parallel-backend": "-dpb",
          "--data-parallel-hybrid-lb": "-dph", "--data-parallel-external-lb": "-dpe",
          "--data-parallel-multi-port-external-lb": "-dpm", "--diffusion-config": "-dc", "--attention-config": "-ac"}


def _dest(flag: str) -> str:
    return "vllm_" + flag[2:].replace("-", "_")


def add_refused_flags(parser: argparse.ArgumentParser, refused: Iterable[str] = REFUSED,
                      switches: Iterable[str] = (*SATISFIED, *("--no-" + flag[2:] for flag in NEGATABLE))) -> None:
    """Every flag of `refused` (taking any values) and of `switches`, hidden from --help;
    `check_refused` reads those of `refused`. The defaults are serve's tables."""
    for flag in refused:
        parser.add_argument(flag, *[_SHORT[flag]] if flag in _SHORT else [], dest=_dest(flag), nargs="*",
                            default=None, help=argparse.SUPPRESS)
    for flag in switches:
        parser.add_argument(flag, dest=_dest(flag), action="store_true", default=None, help=argparse.SUPPRESS)


def check_refused(args: argparse.Namespace, refused: Mapping[str, str] = REFUSED,
                  served: Mapping[str, tuple] = _SERVED,
                  message: str = "{given} is not supported{takes}: {why}") -> None:
    """ValueError `message` for the first flag of `refused` given with a value not in `served`;
    `message` may name {flag}, {given} (the flag with its values), {takes} (what `served` has for
    it) and {why} (its text in `refused`)."""
    for flag, why in refused.items():
        values: Optional[list] = getattr(args, _dest(flag), None)
        if values is None:
            continue
        value = " ".join(values)
        if value in served.get(flag, ()):
            continue
        given = f"{flag} {value}" if value else flag
        takes = f" (it takes {' or '.join(served[flag])})" if value and flag in served else ""
        raise ValueError(message.format(flag=flag, given=given, takes=takes, why=why))
