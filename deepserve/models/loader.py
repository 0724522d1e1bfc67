"""Build a model from a ModelConfig: choose the class, the dtype, and fill the weights."""
from __future__ import annotations

import torch

from deepserve.config import ModelConfig
from deepserve.distributed.parallel_state import ParallelContext, pp_layer_range, single_process
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


def stage_modules(model, pctx: ParallelContext) -> list:
    """The modules pipeline stage `pctx.pp_rank` holds: embedding on the first stage, its
    range of layers, the final norm and LM head on the last stage."""
    layers = pp_layer_range(len(model.model.layers), pctx.pp_size, pctx.pp_rank)
    parts = [model.model.layers[i] for i in layers]
    if pctx.pp_rank == 0:
        parts.insert(0, model.model.embed_tokens)
    if pctx.pp_rank == pctx.pp_size - 1:
        parts += [model.model.norm, model.lm_head]
        if getattr(model, "tie_word_embeddings", False) and pctx.pp_rank > 0:
            parts.append(model.model.embed_tokens)  # the tied head reads the embedding
    return parts


def _build(cls, cfg, dtype, device, pctx: ParallelContext):
    if pctx.pp_size == 1:
        with torch.device(device):
            return cls(cfg, dtype=dtype, pctx=pctx)
    # a pipeline stage: build the whole model without memory, then give this stage's modules
    # real storage; the weights of other stages stay on the meta device (copies into them
    # are no-ops)
    with torch.device("meta"):
        model = cls(cfg, dtype=dtype, pctx=pctx)
    for module in stage_modules(model, pctx):
        # to_empty swaps in new Parameter objects: carry the per-parameter weight loaders over
        loaders = {n: p.weight_loader for n, p in module.named_parameters() if hasattr(p, "weight_loader")}
        module.to_empty(device=device)
        for n, p in module.named_parameters():
            if n in loaders:
                p.weight_loader = loaders[n]
        for sub in module.modules():
            if hasattr(sub, "rebuild_buffers"):
                sub.rebuild_buffers()
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight  # re-tie after materializing
    model.pp_layers = pp_layer_range(len(model.model.layers), pctx.pp_size, pctx.pp_rank)
    return model


@torch.no_grad()
def load_model(model_config: ModelConfig, device: torch.device, pctx: ParallelContext | None = None):
    pctx = pctx or single_process()
    cfg = model_config.hf_config
    cls = get_model_class(cfg.architecture)
    dtype = resolve_dtype(model_config, device)
    model = _build(cls, cfg, dtype, device, pctx)
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
