"""Engine configuration: `EngineArgs` (what users set) and the configs the engine reads.

Every field carries a docstring (the string literal right below it, as in vLLM); the CLI
flags are generated from the fields and those docstrings (as SGLang does), with vLLM's flag
names: field `max_num_seqs` is flag `--max-num-seqs`. Values are checked in `__post_init__`
and errors name the bad value. This module imports nothing from deepserve.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = str(PACKAGE_DIR / "assets" / "stories260k")
PRESET_DIR = PACKAGE_DIR / "assets" / "presets"

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# vLLM's other names for them (--dtype half, LLM(dtype=torch.bfloat16))
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "torch.float16": "float16", "torch.float32": "float32",
                  "torch.bfloat16": "bfloat16"}


CALCULATE_KV_SCALES_WARNING = ("--calculate-kv-scales is deprecated (as in vLLM 0.26) and has no effect: the fp8 KV "
                               "cache scales are loaded from the model checkpoint if available, otherwise they "
                               "default to 1.0")


def canonical_dtype(dtype) -> str:
    """A --dtype by its name in _DTYPES (vLLM's half / float / torch.bfloat16 ... aliases)."""
    return _DTYPE_ALIASES.get(str(dtype), dtype)


# --------------------------------------------------------------------------- HF config.json
class HFConfig:
    """A model's config.json as attributes, normalised to one spelling.

    Hub checkpoints write `rope_theta` + `rope_scaling` and `torch_dtype`; newer
    `transformers` writes `rope_parameters` (holding rope_theta and the scaling) and `dtype`.
    Both are read into `rope_theta`, `rope_scaling` (None or a dict with a "rope_type"
    key) and `torch_dtype`, so the model code has one spelling to branch on.
    """

    def __init__(self, data: dict[str, Any]):
        data = dict(data)
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_params = dict(rope_params)
            data.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.get("rope_type", rope_params.get("type", "default"))
            if kind != "default" and data.get("rope_scaling") is None:
                data["rope_scaling"] = rope_params
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            data["rope_scaling"] = None if scaling["rope_type"] == "default" else scaling
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data.pop("dtype")
        data.setdefault("rope_theta", 10000.0)
        data.setdefault("rope_scaling", None)
        self.__dict__.update(data)

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def architecture(self) -> str:
        archs = self.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry")
        return archs[0]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the object of a model config")
    return data


def load_hf_config(model: str, hf_overrides: Optional[dict] = None) -> HFConfig:
    """Read `model`/config.json, or the preset named `model` (e.g. "deepseek-r1")."""
    path = Path(model)
    if (path / "config.json").is_file():
        data = _read_json(path / "config.json")
    elif (PRESET_DIR / f"{model}.json").is_file():
        data = _read_json(PRESET_DIR / f"{model}.json")
    elif path.is_file():
        raise FileNotFoundError(f"model {model!r} is a file: give the model's folder"
                                + (f" ({path.parent})" if path.name == "config.json" else ""))
    elif path.exists():
        raise FileNotFoundError(f"{path / 'config.json'} not found: not a Hugging Face model folder")
    elif path.is_absolute() or model.startswith(("./", "../")):
        # a path (the guides' /nfs/deepseek_r1, /test/weights/DeepSeek-R1 left as written): no hub id
        raise FileNotFoundError(f"model {model!r}: no such folder on this machine")
    else:
        hub = " (deepserve downloads nothing: fetch hub models first, e.g. `modelscope download --model ID " \
              "--local_dir DIR` or `huggingface-cli download ID --local-dir DIR`, and pass DIR)" if "/" in model else ""
        raise FileNotFoundError(
            f"model {model!r} is neither a folder nor a preset{hub}; presets: {', '.join(list_presets())}")
    return HFConfig({**HFConfig(data).to_dict(), **_hub_spelling(hf_overrides or {})})


def _hub_spelling(overrides: dict) -> dict:
    """hf_overrides in the spelling HFConfig normalises to (rope_theta, rope_scaling,
    torch_dtype), so that an override replaces config.json's value whichever spelling either
    uses, as vLLM's config.update does: transformers 5's rope_parameters replace the file's
    scaling (a rope_theta they leave out stays the file's)."""
    overrides = dict(overrides)
    rope = overrides.pop("rope_parameters", None)
    if isinstance(rope, dict):
        rope = dict(rope)
        if "rope_theta" in rope:
            overrides.setdefault("rope_theta", rope.pop("rope_theta"))
        overrides.setdefault("rope_scaling", rope)
    if "dtype" in overrides:
        overrides.setdefault("torch_dtype", overrides.pop("dtype"))
    return overrides


def parse_hf_overrides(value):
    """hf_overrides as JSON text or a parsed object -> the object (None stays None)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"hf_overrides is not valid JSON: {value!r} ({exc.msg})") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"hf_overrides must be a JSON object, got {value!r}")
    return value


def is_preset(model: str) -> bool:
    return not Path(model).exists() and (PRESET_DIR / f"{model}.json").is_file()


# --------------------------------------------------------------------------- configs
@dataclass
class ModelConfig:
    """The model as the engine sees it: HF config, dtype, context length."""

    model: str
    hf_config: HFConfig
    dtype: str
    max_model_len: int
    tokenizer: str
    load_format: str = "auto"
    quantization: Optional[str] = None
    seed: int = 0
    load_mtp: bool = False  # also the MTP layer (speculative decoding with method mtp)
    # --max-model-len as given (vLLM's name): None (the model's), -1 (fit to the KV cache) or a length
    original_max_model_len: Optional[int] = None

    @property
    def architecture(self) -> str:
        return self.hf_config.architecture


def default_block_size(hf_config: HFConfig) -> int:
    """KV cache block size when none is given: 64 for MLA's latent cache, as vLLM's FlashMLA
    needs and where the Triton decode kernel takes one page id per 64-key tile (H100, batch 64,
    4k context: 79% of copy bandwidth against 64% at 16, benchmarks/sweep_mla_decode.py and
    docs/PERFORMANCE.md); 16 otherwise. The price: prefix-cache hits come in whole blocks of 64."""
    return 64 if hf_config.get("kv_lora_rank") else 16


KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
# vLLM's Marlin names of a 4-bit checkpoint's own format (its kernels, not another format)
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    prefix_caching_salt: Optional[str] = None
    kv_cache_dtype: str = "auto"
    num_blocks: int = 0  # decided by the model runner after profiling

    @property
    def fp8_kv(self) -> bool:
        return self.kv_cache_dtype in FP8_KV_CACHE_DTYPES


def check_data_parallel_nodes(args) -> None:
    """The multi-node data-parallel flags describe a part of the DP ranks on one node."""
    dp, local, start = args.data_parallel_size, args.data_parallel_size_local, args.data_parallel_start_rank
    if local is not None and not 1 <= local <= dp:
        raise ValueError(f"--data-parallel-size-local (data_parallel_size_local) must be in [1, "
                         f"--data-parallel-size {dp}], got {local}")
    if not 0 <= start < dp or start + (local or dp) > dp:
        raise ValueError(f"--data-parallel-start-rank {start} + --data-parallel-size-local {local or dp} "
                         f"exceeds --data-parallel-size {dp} (data_parallel_start_rank, data_parallel_size_local, "
                         "data_parallel_size)")
    if (local or dp) < dp and not args.data_parallel_address:
        raise ValueError("DP ranks on several nodes need --data-parallel-address (the API server's node)")
    if args.headless and start == 0:
        raise ValueError("--headless runs the DP ranks of another node: give --data-parallel-start-rank > 0")
    if not args.headless and start != 0:
        raise ValueError("the node that serves the API runs DP rank 0: --data-parallel-start-rank > 0 "
                         "needs --headless")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count (api_server_count) must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1 and args.distributed_executor_backend == "ray":
        raise ValueError("--api-server-count > 1 runs on the default (mp) backend, not on the Ray backend")
    if args.distributed_executor_backend == "ray" and (local is not None and local < dp or args.headless):
        raise ValueError("with --distributed-executor-backend ray, Ray places every DP rank on the cluster's nodes: "
                         "drop --data-parallel-size-local / --headless (they start DP ranks per node without Ray)")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting_requests: Optional[int] = None
    policy: str = "fcfs"


ALL2ALL_BACKENDS = ("allgather_reducescatter", "alltoall")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_executor_backend: Optional[str] = None
    all2all_backend: str = "allgather_reducescatter"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


def json_config(cls: type, flag: str, value: Any):
    """Dataclass `cls` from its flag's JSON text or parsed object; unknown keys are named."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{flag} is not valid JSON: {value!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {value!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{flag} has unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
    return cls(**value)


SPECULATIVE_METHODS = ("mtp", "ngram")
# vLLM's other spellings of them
_SPECULATIVE_ALIASES = {"deepseek_mtp": "mtp", "[ngram]": "ngram"}


@dataclass
class SpeculativeConfig:
    """vLLM's --speculative-config JSON: draft k tokens per step, verify them in one target forward."""

    method: Optional[str] = None
    """mtp (DeepSeek-V3/R1's own multi-token-prediction layer; deepseek_mtp is the same) | ngram
    (prompt lookup). Left out: mtp on a model with an MTP layer (as vLLM)."""
    num_speculative_tokens: Optional[int] = None
    """k, drafts per step (mtp: more than its layers reuse the last one); mtp default: the model's
    num_nextn_predict_layers."""
    prompt_lookup_min: Optional[int] = None
    """ngram: the shortest suffix looked up (default: prompt_lookup_max, or 5 when neither is set)."""
    prompt_lookup_max: Optional[int] = None
    """ngram: the longest suffix looked up (default: prompt_lookup_min, or 5)."""

    def __post_init__(self):
        self.method = _SPECULATIVE_ALIASES.get(self.method, self.method)
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of mtp, deepseek_mtp, ngram, "
                             f"got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"speculative_config {name} must be an integer >= 1, got {value!r}")
        if self.method == "ngram":
            if self.num_speculative_tokens is None:
                raise ValueError("speculative_config method ngram needs num_speculative_tokens")
            self.prompt_lookup_min = self.prompt_lookup_min or self.prompt_lookup_max or 5
            self.prompt_lookup_max = self.prompt_lookup_max or self.prompt_lookup_min
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config prompt_lookup_min {self.prompt_lookup_min} exceeds "
                                 f"prompt_lookup_max {self.prompt_lookup_max}")

    @classmethod
    def from_json(cls, value: Any) -> "SpeculativeConfig":
        return json_config(cls, "speculative_config", value)

    def for_model(self, hf: HFConfig) -> "SpeculativeConfig":
        """The method and k settled against the model: mtp needs its MTP layer."""
        layers = int(hf.get("num_nextn_predict_layers") or 0)
        method = self.method or ("mtp" if layers else None)
        if method is None:
            raise ValueError("speculative_config needs a method (mtp or ngram); this model has no MTP layer "
                             "(num_nextn_predict_layers is 0) to default to")
        if method == "mtp" and not layers:
            raise ValueError(f"speculative_config method mtp needs a model with an MTP layer, but "
                             f"{hf.get('architectures')} has num_nextn_predict_layers="
                             f"{hf.get('num_nextn_predict_layers')!r}; use method ngram")
        return dataclasses.replace(self, method=method, num_speculative_tokens=self.num_speculative_tokens or layers)


PROFILERS = ("torch", "cuda")


@dataclass
class ProfilerConfig:
    """vLLM's --profiler-config JSON: what /start_profile .. /stop_profile (or `LLM.start_profile()`
    .. `stop_profile()`) record in every rank that runs the model (engine/profiler.py)."""

    profiler: Optional[str] = None
    """torch (torch.profiler: a Chrome trace per rank in torch_profiler_dir) | cuda
    (cudaProfilerStart/Stop around the range, for `nsys profile --capture-range=cudaProfilerApi`)."""
    torch_profiler_dir: str = ""
    """Where every rank writes its trace (torch; needed there, made absolute as vLLM does)."""
    torch_profiler_with_stack: bool = True
    """torch.profiler with_stack: Python stacks of the ops."""
    torch_profiler_with_flops: bool = False
    """torch.profiler with_flops."""
    torch_profiler_use_gzip: bool = True
    """Traces as .json.gz (else .json)."""
    torch_profiler_dump_cuda_time_total: bool = True
    """Write the ops' time table (self CUDA time; CPU time without a GPU) to profiler_out_{rank}.txt."""
    torch_profiler_record_shapes: bool = False
    """torch.profiler record_shapes."""
    torch_profiler_with_memory: bool = False
    """torch.profiler profile_memory."""
    capture_torch_profiler: bool = False
    """vLLM's trace of CUDA-graph capture: not supported (refused when true)."""
    detailed_trace_annotation: bool = False
    """Step annotations with vLLM's roofline terms (sk, sqsq, sqsk per phase) besides the counts."""
    ignore_frontend: bool = False
    """Leave out the API server process's CPU trace ({host}_{pid}.async_llm.*, torch profiler, with
    the engine in processes of its own), as vLLM's AsyncLLM trace."""
    delay_iterations: int = 0
    """Engine steps after start_profile before the profiler starts (as vLLM: the profiler starts
    at the delay_iterations-th step, which it records)."""
    max_iterations: int = 0
    """Engine steps recorded before the profiler stops on its own (0: until stop_profile)."""
    warmup_iterations: int = 0
    """torch.profiler schedule (torch profiler; with wait_iterations > 0 too): steps the profiler
    runs with its records discarded, before active_iterations recorded steps; the trace is written
    when those end (vLLM's; the start takes the schedule's first step, as there)."""
    active_iterations: int = 5
    """The schedule's recorded steps (only with warmup_iterations or wait_iterations)."""
    wait_iterations: int = 0
    """The schedule's first steps, with the profiler off."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"profiler_config {f.name} must be true or false, got {value!r}")
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"profiler_config {f.name} must be an integer >= 0, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"profiler_config {f.name} must be a string, got {value!r}")
        if self.profiler is not None and self.profiler not in PROFILERS:
            raise ValueError(f"profiler_config profiler must be torch or cuda, got {self.profiler!r}")
        if self.active_iterations < 1:
            raise ValueError(f"profiler_config active_iterations must be >= 1, got {self.active_iterations}")
        if self.capture_torch_profiler:
            raise ValueError("profiler_config capture_torch_profiler (a trace of CUDA-graph capture) is not "
                             "supported")
        if self.torch_profiler_dir and self.profiler != "torch":
            raise ValueError(f"profiler_config torch_profiler_dir goes with profiler torch, got profiler "
                             f"{self.profiler!r}")
        if self.profiler == "torch":
            if not self.torch_profiler_dir:
                raise ValueError("profiler_config profiler torch needs torch_profiler_dir (where the traces go)")
            if "://" in self.torch_profiler_dir:
                raise ValueError(f"profiler_config torch_profiler_dir must be a local folder, got "
                                 f"{self.torch_profiler_dir!r}")
            self.torch_profiler_dir = os.path.abspath(os.path.expanduser(self.torch_profiler_dir))

    @classmethod
    def from_json(cls, value: Any) -> "ProfilerConfig":
        return json_config(cls, "profiler_config", value)


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: str
    ops: str
    enforce_eager: bool
    cuda_graph_sizes: list[int]
    async_scheduling: Optional[bool] = None      # as given; the engine settles None (async_scheduling_plan)
    speculative: Optional[SpeculativeConfig] = None
    cudagraph_mode: str = "FULL_AND_PIECEWISE"
    piecewise_max_tokens: int = 2048      # at most max_num_batched_tokens
    mixed_graph_tokens: int = 0           # prompt tokens of a mixed step run as decode graph rows (0: none)
    profiler: Optional[ProfilerConfig] = None   # vLLM's profiler interface, when a profiler is set


# --------------------------------------------------------------------------- EngineArgs
@dataclass
class EngineArgs:
    """Everything a user sets to start an engine. Field names are vLLM's."""

    model: str = DEMO_MODEL
    """Hugging Face model folder, or a preset name (deepseek-r1, r1-distill-llama-8b, ...).
    Default: the built-in stories260k demo model."""
    tokenizer: Optional[str] = None
    """Tokenizer folder; default: the model folder."""
    skip_tokenizer_init: bool = False
    """vLLM's: load no tokenizer; prompts are token ids (text is a 400) and outputs their token ids,
    as a folder without tokenizer.json serves."""
    served_model_name: Optional[str] = None
    """Model name(s) the API serves: `--served-model-name a b` (as vLLM) or "a,b"; a response names
    the one its request asked for (the first when it names none), metrics the first. Default: the
    model argument as given (vLLM)."""
    dtype: str = "auto"
    """Weight and activation dtype: auto (the checkpoint's, bf16 for fp8 checkpoints, fp32 on CPU
    for fp16/bf16 checkpoints), float32 (float), float16 (half) or bfloat16."""
    max_model_len: Optional[int] = None
    """Longest prompt + output in tokens; default: the model's max_position_embeddings. A KV cache
    too small for one request of this length is an error at start, as in vLLM (without the flag,
    a warning and the length the cache holds); -1 or auto: the longest the KV cache holds, up to
    the model's."""
    load_format: str = "auto"
    """auto | safetensors | dummy (random weights with the config's shapes)."""
    hf_overrides: dict = field(default_factory=dict)
    """JSON object merged over config.json, e.g. '{"num_hidden_layers": 4}'."""
    quantization: Optional[str] = None
    """Weight quantization: None serves the checkpoint as stored (fp8, int8 and 4-bit weights stay
    in that form); fp8 or w8a8-int8 quantize 16-bit weights at load; awq, gptq, compressed-tensors
    name a 4-bit checkpoint's own format (served as stored; with --load-format dummy, random 4-bit
    weights), as do vLLM's awq_marlin, gptq_marlin and moe_wna16 (an AutoAWQ or GPTQ checkpoint);
    ascend names an msModelSlim checkpoint (vllm-ascend's), served as stored."""
    seed: int = 0
    """Seed for random weights and for sampling requests that give no seed."""
    trust_remote_code: bool = False
    """Accepted for vLLM compatibility and changes nothing: deepserve never executes code from a
    checkpoint (config.json is read as data and the model classes are deepserve's own)."""
    device: str = "auto"
    """auto | cpu | cuda (or an out-of-tree platform name)."""
    block_size: Optional[int] = None
    """Tokens per KV cache block (default: 64 for MLA models, whose Triton decode kernel then
    reads each 64-key tile from one block, 16 otherwise)."""
    gpu_memory_utilization: float = 0.9
    """Share of device memory the engine may use (weights + activations + KV cache)."""
    num_gpu_blocks_override: Optional[int] = None
    """Use exactly this many KV cache blocks instead of sizing the pool from memory."""
    kv_cache_memory_bytes: Optional[int] = None
    """Bytes for the KV cache pool (default on CPU: 1 GiB; on GPU: from gpu_memory_utilization)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical full-block prompt prefixes."""
    kv_cache_dtype: str = "auto"
    """KV cache storage: auto (the model dtype) | bfloat16 | float16 (the model dtype named: it
    must be the model's) | fp8 | fp8_e4m3 (float8 e4m3: half the bytes, twice the tokens; the
    MLA latent cache too). Scales per layer from the checkpoint's
    `k_scale` / `v_scale` / `kv_scale` (vLLM's names; MLA's latent takes k_scale), 1.0 without."""
    calculate_kv_scales: bool = False
    """Deprecated in vLLM 0.26 (removed after it): accepted with a deprecation warning and no
    effect; fp8 KV cache scales come from the checkpoint (k_scale / v_scale / kv_scale), else 1.0."""
    swap_space: float = 4
    """vLLM's CPU swap space per GPU (GiB) for preempted sequences: accepted and unused, since
    preempted sequences are recomputed (as in vLLM V1)."""
    prefix_caching_hash_algo: str = "sha256"
    """Prefix-cache block keys: sha256 or xxhash (128-bit xxh3, faster; needs the xxhash package)."""
    prefix_caching_salt: Optional[str] = None
    """Salt of the prefix-cache keys (default: random bytes drawn at start; a fixed string makes
    keys reproducible across restarts)."""
    max_num_seqs: Optional[int] = None
    """Most sequences in one engine step (default 256, lowered to max_num_batched_tokens when that is
    smaller, as vLLM's default)."""
    max_num_batched_tokens: Optional[int] = None
    """Most tokens in one engine step (default 8192; without chunked prefill at least max_model_len, the
    default raised to it)."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps, mixed with decode tokens."""
    max_waiting_requests: Optional[int] = None
    """Most requests queued before new ones are refused (server: 503); default unbounded."""
    scheduling_policy: str = "fcfs"
    """fcfs: requests run in arrival order; priority: by each request's priority (lower first, then
    arrival), and preemption takes the lowest-priority running request (vLLM's policy)."""
    tensor_parallel_size: int = 1
    """Tensor-parallel ranks."""
    pipeline_parallel_size: int = 1
    """Pipeline stages."""
    data_parallel_size: int = 1
    """Data-parallel ranks (MLA attention per rank, experts shared with expert parallel)."""
    enable_expert_parallel: bool = False
    """Shard MoE experts over the TP x DP ranks instead of slicing each expert."""
    distributed_executor_backend: Optional[str] = None
    """mp (local processes) or ray; default: mp on one node."""
    all2all_backend: str = "allgather_reducescatter"
    """How MoE layers exchange tokens between DP ranks (DP attention + expert parallel):
    allgather_reducescatter (every rank's tokens gathered, outputs reduce-scattered back; fixed
    shapes, so decode runs as CUDA graphs) | alltoall (each token sent only to the ranks holding
    its experts and back, all_to_all with per-step sizes; eager only)."""
    data_parallel_size_local: Optional[int] = None
    """DP ranks this node runs (vLLM's multi-node data parallel without Ray); default: all."""
    data_parallel_start_rank: int = 0
    """The first DP rank this node runs: 0 on the node that serves the API, more with --headless."""
    data_parallel_address: Optional[str] = None
    """Address of the node that serves the API, where the other nodes' engine cores reach it
    and the process group meets (needed when DP ranks run on several nodes)."""
    data_parallel_rpc_port: int = 29550
    """Port for the engine cores of other nodes on --data-parallel-address; the next 1 + DP-size
    ports are used too (the process group, one request queue per DP rank), and with
    --api-server-count N > 1 another 2 + DP-size for each of the N API servers."""
    headless: bool = False
    """Run only this node's engine cores (DP ranks from --data-parallel-start-rank), no API server."""
    api_server_count: int = 1
    """API server processes (`deepserve serve`) sharing the listening port in front of the same
    engine cores, each doing HTTP, tokenization and streaming for its share of the requests;
    above 1 the engine cores always run in processes of their own. Headless nodes take the API
    node's value (their cores connect to every API server)."""
    enforce_eager: bool = False
    """Never capture CUDA graphs."""
    async_scheduling: Optional[bool] = None
    """Schedule and launch step n+1 before step n's tokens reach the host (their ids are taken
    on the device), overlapping host work with the GPU, as vLLM's --async-scheduling. Default
    (neither flag): on wherever it overlaps anything, off with an INFO line naming why on the
    CPU (a step's work runs as it is launched), with speculative decoding (its drafting steps
    need the previous tokens on the host) and with pipeline parallel (one micro-batch in flight
    per stage instead). --async-scheduling forces it on: every layout (TP, PP, DP, EP, Ray);
    steps with logprobs, penalties, min_tokens, structured output or drafts run synchronously,
    and pipeline parallel keeps its micro-batches. --no-async-scheduling forces it off."""
    cuda_graph_sizes: list = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256, 320, 384, 448, 512])
    """Decode batch sizes captured as CUDA graphs: those up to the most rows a graph step has
    (max_num_seqs; times 1 + the drafts with speculative decoding; plus --mixed-graph-tokens).
    Above 256 rows every 64: there a dense model's GEMMs turn compute-bound, so a step's padding
    rows cost time."""
    cudagraph_mode: str = "FULL_AND_PIECEWISE"
    """Which steps replay CUDA graphs (vLLM's modes): FULL_AND_PIECEWISE (the default, as
    vLLM's): decode-only steps as whole graphs (--cuda-graph-sizes), prefill and mixed steps of
    up to --piecewise-max-tokens tokens as piecewise graphs (all but attention, which runs
    eagerly between them), larger steps eagerly; FULL_DECODE_ONLY or FULL: decode-only steps as
    whole graphs, other steps eagerly; PIECEWISE: every step of up to --piecewise-max-tokens
    tokens as piecewise graphs; NONE: no graphs (--enforce-eager). Piecewise graphs need one
    pipeline stage and no DP attention token exchange (those steps run eagerly)."""
    piecewise_max_tokens: Optional[int] = None
    """Largest step, in tokens, captured as piecewise CUDA graphs (capped by
    --max-num-batched-tokens); larger steps run eagerly. Default: 2048 (eager steps of that size
    are bound by the host's launches: a mixed step beside 256 decodes passes 512 tokens with a
    short prompt); with vLLM's max_cudagraph_capture_size, that size."""
    mixed_graph_tokens: Optional[int] = None
    """Mixed steps (decodes beside prompt chunks) of at most this many prompt tokens replay the
    decode CUDA graphs, each prompt token a one-token row that attends over its sequence's
    positions up to its own, instead of piecewise graphs with attention run eagerly between
    them, whose host launches outlast such a step's GPU work. The decode graphs are then
    captured up to max_num_seqs + this many rows (of --cuda-graph-sizes). With speculative
    decoding the same holds for verify steps that carry prompt chunks (their drafts, up to k a
    decode, are rows too; the graphs reach max_num_seqs * (1 + k) + this many rows). 0 turns it
    off. Default: 256 with --cudagraph-mode FULL_AND_PIECEWISE or FULL and one pipeline stage;
    0 otherwise."""
    compilation_config: Optional[dict] = None
    """vLLM's JSON, mapped onto the CUDA graphs deepserve captures: cudagraph_capture_sizes sets
    --cuda-graph-sizes, max_cudagraph_capture_size caps them and --piecewise-max-tokens,
    cudagraph_mode sets --cudagraph-mode; torch.compile keys (level, mode, backend, ...) are
    accepted and unused. E.g. '{"cudagraph_capture_sizes": [4, 16], "cudagraph_mode": "FULL_DECODE_ONLY"}'."""
    optimization_level: Optional[int] = None
    """vLLM's, for the CUDA graphs it sets: 0 captures none (--cudagraph-mode NONE), 1 piecewise
    graphs only (PIECEWISE), 2 and 3 both (FULL_AND_PIECEWISE, vLLM's default level 2); a
    cudagraph_mode given (--cudagraph-mode, --compilation-config) wins. Its torch.compile part
    is vLLM's own."""
    cudagraph_capture_sizes: Optional[list] = None
    """vLLM's: compilation_config's cudagraph_capture_sizes given alone (sets --cuda-graph-sizes)."""
    max_cudagraph_capture_size: Optional[int] = None
    """vLLM's: compilation_config's max_cudagraph_capture_size given alone (caps --cuda-graph-sizes
    and --piecewise-max-tokens)."""
    ops: str = "auto"
    """Operator backend: auto (the platform's: triton on CUDA, torch on CPU, an out-of-tree
    platform's own) | torch | triton | triton-all (triton with the dense GEMMs on Triton kernels
    at every shape instead of cuBLAS where cuBLAS measured faster) | flaggems (deepserve's Triton
    kernels, FlagGems' in place of the aten ops beneath them: the GEMMs triton gives cuBLAS,
    embeddings, elementwise ops). Env DEEPSERVE_OPS sets it too; USE_FLAGGEMS=1 means flaggems."""
    ops_profile: bool = False
    """Profile where kernel time goes (deepserve/ops/profile.py): a short generation at start-up,
    then 8 steps in every 1024, under torch.profiler; the start-up log and each window's log
    line give the share of kernel time in Triton kernels, BLAS libraries (cuBLAS, cuDNN),
    other torch kernels and copies, and /metrics deepserve:ops_time_share{kind=...}. On the
    CPU, op CPU time stands for kernel time (interpreted Triton kernels: their launches')."""
    speculative_config: Optional[dict] = None
    """Speculative decoding, vLLM's JSON keys: method (mtp | deepseek_mtp | ngram),
    num_speculative_tokens, prompt_lookup_min, prompt_lookup_max; e.g.
    '{"method": "mtp", "num_speculative_tokens": 1}' or '{"method": "ngram",
    "num_speculative_tokens": 3, "prompt_lookup_max": 4}'. Any TP (mtp: the MTP layer sharded
    like the target's) and DP x EP (multiprocessing backend); one pipeline stage; with
    --async-scheduling the steps that draft run synchronously."""
    profiler_config: Optional[dict] = None
    """vLLM's profiler JSON, e.g. '{"profiler": "torch", "torch_profiler_dir": "/abs/dir"}' (or
    --profiler-config.profiler torch --profiler-config.torch_profiler_dir /abs/dir): POST
    /start_profile and /stop_profile (LLM.start_profile() / stop_profile()) then trace every rank
    that runs the model, each step annotated as vLLM's execute_context_C(CT)_generation_G(GT).
    Keys: profiler (torch | cuda), torch_profiler_dir, torch_profiler_with_stack / _with_flops /
    _use_gzip / _dump_cuda_time_total / _record_shapes / _with_memory, detailed_trace_annotation,
    ignore_frontend, delay_iterations, max_iterations, wait_iterations / warmup_iterations /
    active_iterations (a torch.profiler schedule)."""

    def __post_init__(self):
        self.dtype = canonical_dtype(self.dtype)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.quantization == "ascend":
            check_ascend_checkpoint(self.model)
            self.quantization = None  # the checkpoint's own (msModelSlim) format
        self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.quantization not in (None, "fp8", "w8a8-int8", "awq", "gptq", "compressed-tensors", "moe_wna16"):
            raise ValueError(f"quantization must be fp8, w8a8-int8, awq (awq_marlin), gptq (gptq_marlin), "
                             f"compressed-tensors, moe_wna16 or ascend, got {self.quantization!r}")
        if self.served_model_name is not None and not str(self.served_model_name).replace(",", " ").strip():
            # an unset shell variable (`--served-model-name "$NAME"`): clients could not name the model
            raise ValueError(f"served_model_name must hold a name (or several, comma-separated), "
                             f"got {self.served_model_name!r}")
        bs = self.block_size
        if bs is not None and (bs < 1 or bs & (bs - 1)):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.calculate_kv_scales:
            # vLLM 0.26 warns too; its runtime calculation took the scales from the profiling
            # pass's dummy inputs, and the releases after it dropped the option
            logging.getLogger(__name__).warning(CALCULATE_KV_SCALES_WARNING)
        if not self.swap_space >= 0:   # vLLM's bound; the value is unused here
            raise ValueError(f"swap_space must be >= 0 (GiB), got {self.swap_space}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1 and self.max_model_len != -1:
            raise ValueError(f"max_model_len must be >= 1, or -1 to fit it to the KV cache, got {self.max_model_len}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks_override", "max_waiting_requests",
                     "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not (self.async_scheduling is None or isinstance(self.async_scheduling, bool)):
            raise ValueError(f"async_scheduling must be true, false or unset (auto), got {self.async_scheduling!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.distributed_executor_backend not in (None, "mp", "ray", "uni"):
            raise ValueError(f"distributed_executor_backend must be mp or ray, got {self.distributed_executor_backend!r}")
        check_data_parallel_nodes(self)
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(f"all2all_backend must be one of {ALL2ALL_BACKENDS}, got {self.all2all_backend!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.prefix_caching_hash_algo not in ("sha256", "xxhash"):
            raise ValueError("prefix_caching_hash_algo must be sha256 or xxhash, "
                             f"got {self.prefix_caching_hash_algo!r}")
        env_ops = os.environ.get("DEEPSERVE_OPS")
        if self.ops == "auto" and os.environ.get("USE_FLAGGEMS", "0").lower() in ("1", "true"):
            self.ops = "flaggems"
        elif self.ops == "auto" and env_ops:
            self.ops = env_ops
        if self.ops not in ("auto", "torch", "triton", "triton-all", "flaggems"):
            raise ValueError(f"ops must be auto, torch, triton, triton-all or flaggems, got {self.ops!r}")
        self.hf_overrides = parse_hf_overrides(self.hf_overrides)
        if self.compilation_config is not None:
            apply_compilation_config(self, self.compilation_config)
        own = {k: getattr(self, k) for k in ("cudagraph_capture_sizes", "max_cudagraph_capture_size")
               if getattr(self, k) is not None}
        if own:   # into compilation_config, as vLLM folds them, where they stay
            clash = next((k for k in own if k in (self.compilation_config or {})), None)
            if clash:
                raise ValueError(f"{clash} and compilation_config.{clash} are mutually exclusive")   # vLLM's words
            apply_compilation_config(self, {**(self.compilation_config or {}), **own})
            self.cudagraph_capture_sizes = self.max_cudagraph_capture_size = None
        if self.optimization_level is not None:
            if self.optimization_level not in (0, 1, 2, 3):
                raise ValueError(f"optimization_level must be 0, 1, 2 or 3, got {self.optimization_level}")
            if str(self.cudagraph_mode).upper() == EngineArgs.cudagraph_mode:   # none given: the level's
                self.cudagraph_mode = ("NONE", "PIECEWISE", "FULL_AND_PIECEWISE",
                                       "FULL_AND_PIECEWISE")[self.optimization_level]
        mode = str(self.cudagraph_mode).upper()
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, got {self.cudagraph_mode!r}")
        self.cudagraph_mode = mode
        if mode == "NONE":
            self.enforce_eager = True
        if self.piecewise_max_tokens is not None and self.piecewise_max_tokens < 1:
            raise ValueError(f"piecewise_max_tokens must be >= 1, got {self.piecewise_max_tokens}")
        if self.mixed_graph_tokens is not None and self.mixed_graph_tokens < 0:
            raise ValueError(f"mixed_graph_tokens must be >= 0, got {self.mixed_graph_tokens}")
        if isinstance(self.speculative_config, (str, dict)) and not self.speculative_config:
            self.speculative_config = None       # "" or {}: no speculative decoding
        elif self.speculative_config is not None and not isinstance(self.speculative_config, SpeculativeConfig):
            # any other JSON value (a list, a number) is refused by from_json, naming it
            self.speculative_config = SpeculativeConfig.from_json(self.speculative_config)
        if self.speculative_config is not None:
            spec = self.speculative_config.for_model(load_hf_config(self.model, self.hf_overrides))
            missing = speculative_not_yet(self, spec)
            if missing:
                raise ValueError(f"speculative decoding is not supported yet {missing}, got speculative_config="
                                 f"{dataclasses.asdict(spec)}")
        if self.profiler_config is not None and not isinstance(self.profiler_config, ProfilerConfig):
            self.profiler_config = ProfilerConfig.from_json(self.profiler_config)

    def create_engine_config(self) -> EngineConfig:
        hf = load_hf_config(self.model, self.hf_overrides)
        pp_layer_partition(int(hf.get("num_hidden_layers", 1)), self.pipeline_parallel_size)  # checked early
        check_parallel_sizes(hf, self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size,
                             self.enable_expert_parallel)
        max_model_len = resolve_max_model_len(hf, self.max_model_len)
        # a folder without tokenizer.json serves token-id prompts only
        tokenizer = self.tokenizer or (self.model if (Path(self.model) / "tokenizer.json").is_file() else None)
        if self.skip_tokenizer_init:
            tokenizer = None
        load_format = "dummy" if is_preset(self.model) else self.load_format
        speculative = self.speculative_config.for_model(hf) if self.speculative_config is not None else None
        model = ModelConfig(model=self.model, hf_config=hf, dtype=self.dtype,
                            max_model_len=max_model_len, tokenizer=tokenizer,
                            load_format=load_format, quantization=self.quantization, seed=self.seed,
                            load_mtp=speculative is not None and speculative.method == "mtp",
                            original_max_model_len=self.max_model_len)
        batched = self.max_num_batched_tokens or 8192
        if not self.enable_chunked_prefill:
            given = self.max_num_batched_tokens is not None and self.max_model_len != -1   # -1: fit later
            if given and self.max_num_batched_tokens < max_model_len:
                # a step must hold a whole prompt; vLLM refuses this too rather than raise the budget
                raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                                 f"max_model_len ({max_model_len}) without chunked prefill: a prompt longer "
                                 "than that could never run; raise --max-num-batched-tokens, lower "
                                 "--max-model-len or drop --no-enable-chunked-prefill")
            batched = max(batched, max_model_len)
        max_num_seqs = self.max_num_seqs or min(256, batched)
        if batched < max_num_seqs:
            # a step could not give each running sequence its one decode token (vLLM's words)
            raise ValueError(f"max_num_batched_tokens ({batched}) must be greater than or equal to "
                             f"max_num_seqs ({max_num_seqs}).")
        scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=batched,
                                    max_model_len=max_model_len,
                                    enable_chunked_prefill=self.enable_chunked_prefill,
                                    max_waiting_requests=self.max_waiting_requests,
                                    policy=self.scheduling_policy)
        cache = CacheConfig(block_size=self.block_size or default_block_size(hf),
                            gpu_memory_utilization=self.gpu_memory_utilization,
                            num_gpu_blocks_override=self.num_gpu_blocks_override,
                            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                            enable_prefix_caching=self.enable_prefix_caching,
                            prefix_caching_hash_algo=self.prefix_caching_hash_algo,
                            prefix_caching_salt=self.prefix_caching_salt,
                            kv_cache_dtype=self.kv_cache_dtype)
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                  self.data_parallel_size, self.enable_expert_parallel,
                                  self.distributed_executor_backend, self.all2all_backend)
        return EngineConfig(model=model, cache=cache, scheduler=scheduler, parallel=parallel,
                            device=self.device, ops=self.ops, enforce_eager=self.enforce_eager,
                            async_scheduling=self.async_scheduling,
                            speculative=speculative,
                            cuda_graph_sizes=sorted(int(s) for s in self.cuda_graph_sizes),
                            cudagraph_mode=self.cudagraph_mode,
                            piecewise_max_tokens=min(self.piecewise_max_tokens or default_piecewise_max_tokens(hf),
                                                     batched),
                            mixed_graph_tokens=self._mixed_graph_tokens(),
                            profiler=self.profiler_config if self.profiler_config and self.profiler_config.profiler
                            else None)

    def _mixed_graph_tokens(self) -> int:
        """--mixed-graph-tokens as the engine runs it (see the field): 0 where no whole decode
        graphs replay; a value given with pipeline parallel (stage graphs) is refused."""
        given = self.mixed_graph_tokens
        if given and self.pipeline_parallel_size > 1:
            raise ValueError(f"mixed_graph_tokens ({given}) is not supported with pipeline parallel; "
                             "leave it out or set 0")
        whole_graphs = not self.enforce_eager and self.cudagraph_mode in ("FULL_AND_PIECEWISE", "FULL")
        if self.pipeline_parallel_size > 1 or not whole_graphs:
            return 0
        return 256 if given is None else given

    # ----------------------------------------------------------------------- CLI
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        """The engine's flags (vLLM's names) added to `parser`, which is returned, as vLLM's
        `parser = EngineArgs.add_cli_args(parser)` takes it."""
        add_dataclass_args(parser, cls, skip=skip)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> "EngineArgs":
        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        kwargs.update(overrides)
        return cls(**kwargs)


# --------------------------------------------------------------------------- vLLM compatibility
CUDAGRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
# vLLM's top-level aliases of speculative_config keys (--spec-method, ...): the key and its type
SPEC_ALIASES = {"spec_method": ("method", str), "spec_model": ("model", str),
                "spec_tokens": ("num_speculative_tokens", int)}
# vLLM CompilationConfig keys about torch.compile / Inductor, which deepserve does not use
COMPILE_ONLY_KEYS = ("level", "mode", "backend", "custom_ops", "splitting_ops", "use_inductor",
                     "compile_sizes", "inductor_compile_config", "inductor_passes", "pass_config",
                     "cudagraph_num_of_warmups", "cudagraph_copy_inputs", "debug_dump_path", "cache_dir",
                     "compile_cache_save_format", "use_inductor_graph_partition", "compile_mm_encoder",
                     "cudagraph_specialize_lora", "dynamic_shapes_config")


def speculative_not_yet(args: "EngineArgs", spec: SpeculativeConfig) -> Optional[str]:
    """What of this speculative setup the engine cannot run yet (None: it runs): any TP (the MTP
    layer sharded like the target's), DP with one engine core per DP rank, spawned or Ray actors
    (with EP every core runs the MTP layer k times a step), and n-gram drafts over pipeline
    stages (verify steps go through the stages one at a time, no micro-batches in flight); under
    --async-scheduling drafting steps run synchronously (engine/spec_decode.needs_sync_step)."""
    if args.pipeline_parallel_size > 1 and spec.method != "ngram":
        return ("with pipeline parallelism for method mtp (the MTP layer and the hidden states it "
                "drafts from are not placed on a stage yet; method ngram runs with it)")
    return None


def async_scheduling_plan(config: EngineConfig, device_type: str) -> tuple[bool, str]:
    """Whether the engine schedules steps ahead (async scheduling), and the INFO line that says
    so. Unset (None) means on wherever it overlaps anything, as vLLM's default: off on a host
    device (vLLM's CPU platform too), with speculative decoding (vLLM turns it off for its
    host-side n-gram drafter; here every drafting step needs the previous tokens on the host,
    and with mtp every step drafts) and with pipeline stages (the micro-batches in flight are
    the overlap there). A value the user gave is kept."""
    spec, pp = config.speculative, config.parallel.pipeline_parallel_size
    if config.async_scheduling is False:
        return False, "async scheduling off (--no-async-scheduling)"
    if config.async_scheduling:
        if pp > 1 and spec is None:
            return True, ("async scheduling: with pipeline parallel the engine keeps one micro-batch in flight "
                          "per stage instead of launching steps ahead")
        if spec is not None:
            steps = "every step, since each drafts" if spec.method == "mtp" else "the steps that draft"
            return True, (f"async scheduling on (--async-scheduling); speculative decoding ({spec.method}) "
                          f"runs {steps} synchronously")
        return True, "async scheduling on (--async-scheduling)"
    if device_type == "cpu":
        why = "on the CPU a step's work runs as it is launched, leaving nothing to overlap"
    elif spec is not None:
        why = (f"speculative decoding ({spec.method}) runs its drafting steps synchronously, since they need the "
               "previous step's tokens on the host")
    elif pp > 1:
        why = "pipeline parallel keeps one micro-batch in flight per stage instead"
    else:
        return True, "async scheduling on (the default; --no-async-scheduling turns it off)"
    return False, f"async scheduling off: {why} (--async-scheduling forces it on)"


def default_piecewise_max_tokens(hf: dict) -> int:
    """--piecewise-max-tokens when not given: 2048. A mixed step holds every running decode
    (up to max_num_seqs, 256) beside its prompt tokens, and an eager step's host work (hundreds
    of launches) outlasts its GPU work up to about that size, dense or MoE
    (docs/PERFORMANCE.md, piecewise graphs)."""
    return 2048


def engine_core_apart(args: EngineArgs, default: bool) -> bool:
    """Whether the engine core runs in a process of its own (one per DP rank) behind a front
    end in this process (engine/dp_engine.py): always with data parallel or several API
    servers; with one DP rank on Ray never (its driver, rank 0, stays in this process); else
    as DEEPSERVE_ENGINE_CORE_PROCESS says (1 / 0), and `default` when it is unset (the
    offline LLM: in this process; `deepserve serve`: apart, as vLLM does)."""
    if args.data_parallel_size > 1 or args.api_server_count > 1:
        return True
    if args.distributed_executor_backend == "ray":
        return False
    env = os.environ.get("DEEPSERVE_ENGINE_CORE_PROCESS")
    return default if env is None else env == "1"


def apply_compilation_config(args: "EngineArgs", config: Any) -> None:
    """Map vLLM's --compilation-config onto `cuda_graph_sizes` / `enforce_eager` (see the field)."""
    if isinstance(config, str):
        config = json.loads(config)
    if isinstance(config, int):  # vLLM's `-O3` form: a torch.compile level
        config = {"level": config}
    if not isinstance(config, dict):
        raise ValueError(f"compilation_config must be a JSON object, got {config!r}")
    known = COMPILE_ONLY_KEYS + ("cudagraph_capture_sizes", "cudagraph_mode", "max_capture_size",
                                 "max_cudagraph_capture_size", "full_cuda_graph", "use_cudagraph")
    for key in config:
        if key not in known:
            raise ValueError(f"compilation_config key {key!r} is not one deepserve knows; known: {', '.join(known)}")
    args.compilation_config = config
    sizes = config.get("cudagraph_capture_sizes")
    if sizes is not None:
        if not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 1 for n in sizes):
            raise ValueError(f"cudagraph_capture_sizes must be a list of positive integers, got {sizes!r}")
        args.cuda_graph_sizes = sorted(set(sizes))
    largest = config.get("max_cudagraph_capture_size", config.get("max_capture_size"))
    if largest is not None:
        args.cuda_graph_sizes = [n for n in args.cuda_graph_sizes if n <= int(largest)] or [int(largest)]
        args.piecewise_max_tokens = min(args.piecewise_max_tokens or int(largest), int(largest))
    mode = config.get("cudagraph_mode")
    if mode is None and config.get("use_cudagraph") is False:
        mode = "NONE"
    if mode is not None:
        mode = str(mode).upper()
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, got {config['cudagraph_mode']!r}")
        flag = str(args.cudagraph_mode).upper()
        if flag not in (mode, EngineArgs.cudagraph_mode):   # --cudagraph-mode given too, saying otherwise
            raise ValueError(f"--cudagraph-mode {args.cudagraph_mode} and compilation_config's cudagraph_mode "
                             f"{mode} disagree: give one of them")
        args.cudagraph_mode = mode


def resolve_max_model_len(hf_config: HFConfig, max_model_len: Optional[int]) -> int:
    """--max-model-len against the model (`serve` and `deepserve plan` alike): at most its
    max_position_embeddings, which is the default (and where -1 starts: the engine lowers it to
    what the KV cache holds)."""
    limit = int(hf_config.get("max_position_embeddings", 2048))
    if max_model_len is None or max_model_len == -1:
        return limit
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, or -1 to fit it to the KV cache, got {max_model_len}")
    if max_model_len > limit:
        # vLLM lets VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 past this; here the rotary tables are sized from
        # max_position_embeddings, so the way past it is to raise that
        ignored = " (VLLM_ALLOW_LONG_MAX_MODEL_LEN is not read)" if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") else ""
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}; for a "
                         f"model that holds longer contexts pass --hf-overrides "
                         f"'{{\"max_position_embeddings\": {max_model_len}}}'{ignored}")
    return max_model_len


def check_ascend_checkpoint(model: str) -> None:
    """vllm-ascend's `--quantization ascend` names msModelSlim's format, which a checkpoint
    declares in quant_model_description*.json and which is loaded as stored; other checkpoints
    are refused, as vllm-ascend does."""
    if not Path(model).is_dir():
        load_hf_config(model)   # a model that is not there (a hub id): that error, with how to fetch it
    if not list(Path(model).glob("quant_model_description*.json")):
        raise ValueError(f"--quantization ascend loads msModelSlim checkpoints (quant_model_description.json), "
                         f"and {model} has none; drop the flag to serve it as stored")


def pp_partition_env() -> Optional[list[int]]:
    """VLLM_PP_LAYER_PARTITION's layer counts as written (None when unset), unchecked against a model."""
    text = os.environ.get("VLLM_PP_LAYER_PARTITION", "").strip().strip('"')
    if not text:
        return None
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"VLLM_PP_LAYER_PARTITION must be comma-separated layer counts, got {text!r}") from None


def pp_layer_partition(num_layers: int, pp_size: int) -> Optional[list[int]]:
    """vLLM's VLLM_PP_LAYER_PARTITION ("31,30": layers per pipeline stage, first stage first),
    checked against the model as vLLM checks it, one stage included; None when unset or with
    one stage."""
    parts = pp_partition_env()
    if parts is None:
        return None
    text = os.environ["VLLM_PP_LAYER_PARTITION"].strip().strip('"')
    if len(parts) != pp_size or sum(parts) != num_layers or min(parts) < 1:
        stages = f"{pp_size} stage{'s' if pp_size > 1 else ''}"
        raise ValueError(f"VLLM_PP_LAYER_PARTITION={text} must give {stages} of >= 1 layer adding up to the "
                         f"model's {num_layers} layers")
    return parts if pp_size > 1 else None


def pp_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers of pipeline stage `pp_rank`: contiguous, the remainder spread over the first stages,
    or as VLLM_PP_LAYER_PARTITION gives them (read here in every rank, as vLLM does; the
    engine checks it against the model at start)."""
    parts = pp_layer_partition(num_layers, pp_size)
    if parts:
        start = sum(parts[:pp_rank])
        return range(start, start + parts[pp_rank])
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def check_parallel_sizes(hf: HFConfig, tp: int, pp: int, dp: int, expert_parallel: bool) -> None:
    """The sizes the layers split over the ranks, checked before any rank starts (as vLLM's
    verify_with_parallel_config does): otherwise every rank fails alike while building the model."""
    def need(name: str, value: Any, parts: int, over: str) -> None:
        if value and int(value) % parts:
            raise ValueError(f"{name} = {value} is not divisible by {over} = {parts}")

    need("num_attention_heads", hf.get("num_attention_heads"), tp, "tensor_parallel_size")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads and hf.get("kv_lora_rank") is None:   # GQA: fewer KV heads than ranks are replicated
        if kv_heads >= tp:
            need("num_key_value_heads", kv_heads, tp, "tensor_parallel_size")
        elif tp % kv_heads:
            raise ValueError(f"tensor_parallel_size = {tp} is not a multiple of num_key_value_heads = {kv_heads}")
    need("intermediate_size", hf.get("intermediate_size"), tp, "tensor_parallel_size")
    if hf.get("n_routed_experts"):
        if not expert_parallel:
            need("moe_intermediate_size", hf.get("moe_intermediate_size"), tp, "tensor_parallel_size")
        elif dp > 1:
            need("n_routed_experts", hf.get("n_routed_experts"), tp * dp,
                 "the expert-parallel size (tensor_parallel_size x data_parallel_size)")
        else:
            need("n_routed_experts", hf.get("n_routed_experts"), tp, "the expert-parallel size (tensor_parallel_size)")
    layers = int(hf.get("num_hidden_layers", 1))
    if pp > layers:
        raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {layers} layers (num_hidden_layers)")


# --------------------------------------------------------------------------- CLI generation
@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls`, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc.msg})") from None


HUMAN_READABLE = {"k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
HUMAN_READABLE_FLAGS = ("max_model_len", "max_num_batched_tokens")


def human_readable_int(text: str, flag: str = "") -> int:
    """vLLM's token counts as `32k` / `25.6k` (powers of 1000) or `32K` (1024, whole numbers),
    or a plain integer; for max_model_len also `auto` (-1: fit it to the KV cache, vLLM's)."""
    if flag == "max_model_len" and text.strip() == "auto":
        return -1
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)([kmgKMG])\s*", text)
    if m is None:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or one like 32k / 32K, got {text!r}") from None
    number, unit = m.groups()
    if unit.isupper() and "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: {unit} counts 1024s and takes a whole number (or use "
                                         f"{unit.lower()} for 1000s)")
    value = float(number) * HUMAN_READABLE[unit]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


TRUST_REMOTE_CODE_NOTE = ("deepserve: --trust-remote-code accepted; no code from the checkpoint is executed "
                          "(config.json is read as data, the model classes are deepserve's own)")
# vLLM's short spellings (`vllm serve MODEL -tp 8 -pp 4`, `-O3`)
SHORT_FLAGS = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp", "data_parallel_size": "-dp",
               "compilation_config": "-O", "quantization": "-q", "api_server_count": "-asc",
               "data_parallel_start_rank": "-dpr", "data_parallel_size_local": "-dpl",
               "data_parallel_address": "-dpa", "data_parallel_rpc_port": "-dpp", "enable_expert_parallel": "-ep",
               "speculative_config": "-sc"}


class _JoinedNames(argparse.Action):
    """vLLM's `--served-model-name NAME [NAME ...]`, kept as one comma-separated string."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, ",".join(values))


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field: `--field-name` (and vLLM's short form), typed from the
    annotation; a field's metadata may give its `choices`, `metavar` and `nargs`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-")] + ([SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else [])
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"help": docs.get(f.name, ""), "default": argparse.SUPPRESS, "dest": f.name}
        kw.update({k: f.metadata[k] for k in ("choices", "metavar", "nargs") if k in f.metadata})
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.name == "served_model_name":
            kw.update(nargs="+", action=_JoinedNames)
        elif base in (dict,) or typing.get_origin(base) is dict:
            kw["type"] = _json_arg
        elif base is list or typing.get_origin(base) is list:
            kw.update(type=int, nargs="+")
        elif f.name in HUMAN_READABLE_FLAGS:
            kw["type"] = functools.partial(human_readable_int, flag=f.name)
        elif base in (int, float):
            kw["type"] = base
        else:
            kw["type"] = str
        kw["help"] = f"{kw['help']} (default: {default})"
        parser.add_argument(*flags, **kw)


def served_names(args: EngineArgs) -> list[str]:
    """--served-model-name (comma-separated), else the model argument as given, as vLLM serves
    it (the guides send `"model": "/path/to/model"`); the built-in demo is "stories260k"."""
    if args.served_model_name:
        names = [n.strip() for n in str(args.served_model_name).split(",") if n.strip()]
        if names:
            return names
    if str(args.model) == DEMO_MODEL:
        return [Path(DEMO_MODEL).name]
    return [str(args.model)]
