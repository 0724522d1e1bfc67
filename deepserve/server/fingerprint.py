"""The `system_fingerprint` of chat-completion and completion responses, in vLLM 0.26's format
(entrypoints/serve/utils/fingerprint.py) with deepserve's name and version in place of vLLM's:

* full: `deepserve-<version>[-tpN][-ppN][-dpN][-ep]-<hash8>`, the parallel degrees above 1 and
  `ep` with expert parallelism;
* hash: `deepserve-<version>-<hash8>`;
* custom: --fingerprint-value's text as given (null without one, as vLLM's);
* none: null.

hash8 is the start of a sha256 over the engine config fields that change what the model computes
(the model, its dtype, context length and quantization, the KV cache dtype, the parallel layout,
speculative decoding): the same command gives the same hash at every start. Computed once, when
the server starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

from deepserve import __version__
from deepserve.config import EngineConfig

FINGERPRINT_MODES = ("full", "hash", "custom", "none")


def config_hash(config: EngineConfig) -> str:
    """sha256 hex digest of the engine config's fields that identify what the model computes."""
    model, parallel = config.model, config.parallel
    factors = {"model": str(model.model), "architecture": model.architecture, "dtype": str(model.dtype),
               "max_model_len": model.max_model_len, "quantization": model.quantization,
               "load_mtp": model.load_mtp, "kv_cache_dtype": config.cache.kv_cache_dtype,
               "parallel": [parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                            parallel.data_parallel_size, parallel.enable_expert_parallel],
               "speculative": dataclasses.asdict(config.speculative) if config.speculative else None}
    return hashlib.sha256(json.dumps(factors, sort_keys=True, default=str).encode()).hexdigest()


def system_fingerprint(config: EngineConfig, mode: str = "full", value: Optional[str] = None) -> Optional[str]:
    """The fingerprint of `config` in `mode` (FINGERPRINT_MODES), `value` for custom."""
    if mode not in FINGERPRINT_MODES:
        raise ValueError(f"--fingerprint-mode must be one of {', '.join(FINGERPRINT_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "custom":
        return value
    parts = [f"deepserve-{__version__}"]
    if mode == "full":
        parallel = config.parallel
        parts += [f"{name}{size}" for name, size in (("tp", parallel.tensor_parallel_size),
                                                    ("pp", parallel.pipeline_parallel_size),
                                                    ("dp", parallel.data_parallel_size)) if size > 1]
        parts += ["ep"] if parallel.enable_expert_parallel else []
    return "-".join(parts + [config_hash(config)[:8]])
