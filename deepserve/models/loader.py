"""Build a model from a ModelConfig: choose the class, the dtype, and fill the weights."""
from __future__ import annotations

import torch

from deepserve.config import ModelConfig
from deepserve.distributed.parallel_state import ParallelContext, single_process
from deepserve.models.registry import get_model_class
from deepserve.models.weights import dequantize_fp8_stream, init_dummy_weights, iterate_checkpoint

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto': the checkpoint's dtype (bf16 for fp8 checkpoints), but fp32 on CPU."""
    if model_config.dtype != "auto":
        return _DTYPES[model_config.dtype]
    if device.type == "cpu":
        return torch.float32
    stored = str(model_config.hf_config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return _DTYPES.get(stored, torch.bfloat16)


def fp8_block_size(hf_config) -> tuple[int, int] | None:
    q = hf_config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    return tuple(q.get("weight_block_size") or (128, 128))


@torch.no_grad()
def load_model(model_config: ModelConfig, device: torch.device, pctx: ParallelContext | None = None):
    pctx = pctx or single_process()
    cfg = model_config.hf_config
    cls = get_model_class(cfg.architecture)
    dtype = resolve_dtype(model_config, device)
    with torch.device(device):
        model = cls(cfg, dtype=dtype, pctx=pctx)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, seed=model_config.seed)
    else:
        weights = iterate_checkpoint(model_config.model)
        block = fp8_block_size(cfg)
        if block is not None:
            weights = dequantize_fp8_stream(weights, block, dtype)
        loaded = model.load_weights(weights)
        expected = {n for n, _ in model.named_parameters()}
        missing = sorted(expected - loaded - getattr(model, "optional_params", set()))
        if missing:
            raise ValueError(f"checkpoint {model_config.model} lacks tensor(s) for: {', '.join(missing[:5])}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    return model.eval()
