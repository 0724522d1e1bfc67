"""Build a model from a ModelConfig: choose the class, the dtype, the quantized linear
method, and fill the weights.

Quantization (`--quantization`, else the checkpoint's `quantization_config`):

| checkpoint                       | --quantization | Linear layers run as                          |
|----------------------------------|----------------|-----------------------------------------------|
| fp8 (DeepSeek block)             | none / fp8     | fp8 (CPU and GPUs without fp8: dequantize-then-matmul per call) |
| compressed-tensors W8A8 int8     | none / w8a8-int8 | int8 (torch._int_mm on CUDA, exact emulation on CPU) |
| compressed-tensors FP8 (float-quantized: tensor, channel, block) | none / fp8 | fp8, as DeepSeek's with 1x128 or 128x128 scale blocks (quant/ct_fp8.py); without input_activations weight only |
| fp8 without weight_block_size (AutoFP8: one weight_scale a tensor) | none / fp8 | fp8, as compressed-tensors' tensor strategy |
| either FP8 with static activations (`input_scale`) | none / fp8 | fp8, activations quantized with the one static scale (routed experts: the layer's largest a GEMM) |
| BF16/FP16/FP32                   | fp8 / w8a8-int8 | quantized at load, per 128x128 block / per channel |
| any quantized                    | the other one  | dequantized, then quantized at load           |
| AutoAWQ GEMM / GPTQ / compressed-tensors W4A16 | none / awq / gptq / compressed-tensors | 4-bit packed (layers/quantization_int4.py) |
| compressed-tensors W4A8 (pack- or int-quantized) | none / compressed-tensors | 4-bit weights, int8 per-token activations |
| msModelSlim W8A8 (quant_model_description.json) | none / ascend | int8, static or dynamic activations (quantization_modelslim.py) |

4-bit checkpoints are served only in their own format (no conversion at load).
The MoE routed experts follow the linear method (fp8: e4m3 with per-block scales, or per-row
ones for compressed-tensors FP8 "channel", layers/moe.py;
W4A16 and W4A8, act-order GPTQ included: packed 4-bit, layers/moe_int4.py; w8a8-int8 and
msModelSlim "W8A8_DYNAMIC": int8 with per-row scales and per-token int8 activations,
layers/moe_int8.py); msModelSlim's static "W8A8" experts are dequantized at load. Layers
outside the policy (layers/quantization.py: embeddings, LM head, norms, router gate, kv_b_proj,
MTP eh_proj) are dequantized at load to the model dtype, as are the modules the checkpoint's
quantization_config says it left unquantized (quant/ignore.py), whatever the method run.

The model is built on the meta device, given its quantized layouts, then materialised
(`build_model`), so device memory only ever holds the tensors the engine serves from. Once its
weights are in place (loaded or random), `process_weights_after_loading` makes the fusion and
quantization choices that forwards read as plain attributes.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

from deepserve.config import QUANTIZATION_ALIASES, ModelConfig, pp_layer_range
from deepserve.distributed.parallel_state import ParallelContext, single_process
from deepserve.layers.moe import FusedMoE
from deepserve.layers.quantization import (experts_quantized, init_dummy_quantized, is_expert_tensor,
                                           is_quantized_tensor, quantize_linears, tensor_module)
from deepserve.layers.moe_int4 import quantize_int4_experts
from deepserve.layers.moe_int8 import int8_experts
from deepserve.layers.quantization_int4 import int4_kept, quantize_int4_linears
from deepserve.layers.quantization_modelslim import (modelslim_module, quantize_modelslim_experts,
                                                     quantize_modelslim_linears)
from deepserve.models.registry import config_source, model_class
from deepserve.models.weights import checkpoint_files, dequantize_stream, init_dummy_weights, iterate_checkpoint
from deepserve.quant.ct_fp8 import ct_fp8_scheme, ct_fp8_stream, fp8_scale_scheme
from deepserve.ops import OpTable, bind
from deepserve.quant import modelslim
from deepserve.quant.ignore import Ignore, checkpoint_ignore
from deepserve.quant.int4 import int4_spec, int4_spec_for, int4_stream
from deepserve.quant.qconfig_fields import check_fields, group_format, quantization_config

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
    """The scale block of an fp8 checkpoint's Linear weights (DeepSeek's or compressed-tensors')."""
    q = hf_config.get("quantization_config") or {}
    ct = fp8_scale_scheme(q)
    if ct is not None:
        return ct.block
    if q.get("quant_method") != "fp8":
        return None
    return tuple(q["weight_block_size"])


def _check_w8a8_int8(qc: dict) -> None:
    """Accept only the compressed-tensors scheme we run: int8 symmetric channel weights with
    dynamic per-token int8 activations (what `deepserve convert quantize` writes)."""
    groups = qc.get("config_groups") or {}
    fmt = next((f for f in (group_format(qc, g) for g in groups.values()) if f not in (None, "int-quantized")),
               None if groups else qc.get("format"))
    if fmt is not None or not groups:
        bits = sorted({str((g.get("weights") or {}).get("num_bits")) for g in groups.values()})
        raise ValueError(f"compressed-tensors format {fmt!r} with {'/'.join(bits) or 'no'}-bit "
                         f"weights (config_groups {sorted(groups)}) is not supported; deepserve serves "
                         f"4-bit pack-quantized and 8-bit int-quantized (W8A8 int8)")
    for gname, g in groups.items():
        w, a = g.get("weights") or {}, g.get("input_activations") or {}
        got = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("symmetric"),
               a.get("num_bits"), a.get("type"), a.get("strategy"), a.get("dynamic"))
        if got != (8, "int", "channel", True, 8, "int", "token", True):
            acts = (f"{a.get('num_bits')}-bit {a.get('type')} {a.get('strategy')} (dynamic={a.get('dynamic')})"
                    if a else "none (weight only)")
            raise ValueError(f"compressed-tensors group {gname}: weights {w.get('num_bits')}-bit "
                             f"{w.get('type')} {w.get('strategy')} (symmetric={w.get('symmetric')}), "
                             f"activations {acts}: deepserve serves only int8 symmetric "
                             f"channel weights with dynamic int8 token activations")


def checkpoint_quantization(hf_config) -> Optional[str]:
    """The checkpoint's stored format: "fp8", "w8a8-int8", a 4-bit one ("awq", "gptq", "w4a16",
    "w4a8-int8": quant/int4.py) or None (high precision)."""
    qc = quantization_config(hf_config)
    method = qc.get("quant_method")
    if method is None:
        return None
    check_fields(qc)
    scheme = qc.get("activation_scheme", "dynamic")
    if method == "fp8" and scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config activation_scheme {scheme!r} is not supported (dynamic or static)")
    if method == "fp8" and scheme == "static" and qc.get("weight_block_size"):
        raise ValueError(f"quantization_config activation_scheme 'static' with weight_block_size "
                         f"{qc['weight_block_size']} is not supported (nor by vLLM): block fp8 runs with dynamic "
                         f"activations")
    if method == "fp8" or ct_fp8_scheme(qc) is not None:
        return "fp8"
    spec = int4_spec(hf_config)
    if spec is not None:
        return spec.method
    if method == "compressed-tensors":
        _check_w8a8_int8(qc)
        return "w8a8-int8"
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported; deepserve loads "
                     f"fp8 (DeepSeek block, per-tensor), compressed-tensors (FP8, W8A8 int8, W4A16, W4A8), "
                     f"awq and gptq")


INT4_METHODS = ("awq", "gptq", "w4a16", "w4a8-int8")
_FORMAT_NAMES = {"awq": "AutoAWQ", "gptq": "GPTQ", "w4a16": "compressed-tensors W4A16",
                 "w4a8-int8": "compressed-tensors W4A8", "compressed-tensors": "compressed-tensors",
                 "fp8": "fp8", "w8a8-int8": "W8A8 int8", modelslim.METHOD: "msModelSlim W8A8"}
AS_STORED = INT4_METHODS + (modelslim.METHOD,)   # served only in the checkpoint's own format
# --quantization names (vLLM's) that ask for a 4-bit checkpoint's own method
INT4_REQUESTS = {"awq": ("awq",), "gptq": ("gptq",), "compressed-tensors": ("w4a16", "w4a8-int8")}


def choose_quantization(requested: Optional[str], stored: Optional[str]) -> Optional[str]:
    """The linear method to run (see the table in the module docstring): the stored format
    unless another is asked for. Quantized weights stay quantized on every device (DESIGN
    invariant 9); where no kernel for the format exists the ops dequantize per call. 4-bit
    checkpoints run as stored (`--quantization awq|gptq|compressed-tensors` only names them)."""
    if stored in AS_STORED or requested in INT4_REQUESTS:
        if requested is not None and stored not in INT4_REQUESTS.get(requested, ()):
            if stored is None:
                raise ValueError(f"--quantization {requested} loads {_FORMAT_NAMES[requested]} checkpoints and "
                                 f"this one is high precision (add --load-format dummy for random 4-bit weights, "
                                 f"or make one with deepserve convert quantize)")
            if stored not in AS_STORED:   # fp8 / int8 weights: requantized at load to fp8 or int8 only
                raise ValueError(f"--quantization {requested} loads {_FORMAT_NAMES[requested]} checkpoints and this "
                                 f"one is {_FORMAT_NAMES[stored]} (leave --quantization out, or pass fp8 or w8a8-int8)")
            raise ValueError(f"--quantization {requested} cannot serve this {_FORMAT_NAMES[stored]} checkpoint: "
                             f"it is served in its stored format (leave --quantization out)")
        return stored
    if requested is not None:
        return requested
    return stored


def linear_method(model: str, hf_config, requested: Optional[str],
                  load_format: str = "auto") -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint's stored format, the linear method the engine runs it with) for `model`
    (its folder and config.json) under `--quantization requested`: the check `serve` makes before
    any process starts and `deepserve plan` makes of a folder, a ValueError for a
    quantization_config deepserve does not load or a --quantization it cannot serve the folder
    with. Random weights (`--load-format dummy`) store nothing, but 4-bit ones in the format asked
    for."""
    qc = quantization_config(hf_config)
    requested = QUANTIZATION_ALIASES.get(requested, requested)
    if requested == "moe_wna16":     # vLLM's MoE kernels for an AutoAWQ or GPTQ checkpoint
        if qc.get("quant_method") not in ("awq", "gptq"):
            raise ValueError(f"--quantization moe_wna16 serves AutoAWQ and GPTQ checkpoints and this one is "
                             f"{_FORMAT_NAMES.get(checkpoint_quantization(hf_config), 'high precision')} "
                             f"(leave --quantization out)")
        requested = qc["quant_method"]
    if load_format == "dummy":
        stored = int4_spec_for(hf_config, requested).method if requested in INT4_REQUESTS else None
    else:
        stored = checkpoint_quantization(hf_config) or modelslim.stored_format(model)
        if stored is None:
            _check_no_quantized_tensors(model)
        if requested == "compressed-tensors" and qc.get("quant_method") == requested:
            requested = None    # vLLM's name of the checkpoint's own method, whatever its scheme (FP8, int8, 4-bit)
    return stored, choose_quantization(requested, stored)


_PACKED = (".qweight", ".weight_packed")      # AutoAWQ / GPTQ, compressed-tensors 4-bit
_QUANTIZED_DTYPES = ("F8_E4M3", "I8")


def _check_no_quantized_tensors(model: str) -> None:
    """A folder whose config.json has no quantization_config must hold no quantized tensors: its
    4-bit packed, fp8 or int8 weights would be refused one by one at load as unknown parameters or
    dtypes, without saying what is missing. AutoGPTQ before its transformers integration kept the
    GPTQ settings in quantize_config.json: that file is named when it is there."""
    from safetensors import SafetensorError, safe_open
    if not Path(model).is_dir():
        return
    found = None
    try:
        for shard in checkpoint_files(model):
            with safe_open(str(shard), framework="pt") as f:
                found = next(((name, f.get_slice(name).get_dtype()) for name in f.keys() if name.endswith(_PACKED)
                              or name.endswith(".weight") and f.get_slice(name).get_dtype() in _QUANTIZED_DTYPES),
                             None)
            if found:
                break
    except (OSError, ValueError, SafetensorError):
        return      # the loader names what is wrong with the shards
    if found is None:
        return
    name, dtype = found
    side = Path(model) / "quantize_config.json"
    if side.is_file() and name.endswith(".qweight"):
        raise ValueError(f"{side} holds AutoGPTQ's settings but config.json has no quantization_config: "
                         f"add them to config.json as \"quantization_config\" with \"quant_method\": \"gptq\"")
    raise ValueError(f"{Path(model) / 'config.json'} has no quantization_config, but the checkpoint holds quantized "
                     f"tensors ({name}, {dtype}, in {shard.name}): restore the quantization_config it was written with")


def _drop_unused_input_scales(weights, keep):
    """A static fp8 checkpoint's `<m>.input_scale` goes to the layers that keep `<m>.weight`
    in fp8; a module dequantized at load (or requantized to another method) runs on its
    activations unquantized, as vLLM's unquantized layers do, so its scale is dropped."""
    for name, t in weights:
        if not name.endswith(".input_scale") or keep(name[: -len("input_scale")] + "weight"):
            yield name, t


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


def _materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Give a meta-built module real (uninitialised) storage on `device`: what `to_empty` does,
    with `torch.empty` for contiguous tensors (the same layout) instead of its `empty_like`,
    which for a meta tensor runs torch's Python reference and imports sympy (about a second of
    every engine process's start). New Parameter objects are swapped in: the attributes set on
    the old ones (weight loaders, flags) move over."""
    attrs = {n: dict(p.__dict__) for n, p in module.named_parameters()}
    module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_contiguous()
                  else torch.empty_like(t, device=device))
    for n, p in module.named_parameters():
        p.__dict__.update(attrs.get(n, {}))
    for sub in module.modules():
        if hasattr(sub, "rebuild_buffers"):
            sub.rebuild_buffers()


def quantize_experts(model, method: str, block: tuple[int, int], ignore: Ignore = Ignore(),
                     static_input: bool = False, weight_only: bool = False) -> list[str]:
    """Routed experts stored in the linear method's format (fp8, w8a8-int8), but for the layers
    whose experts the checkpoint leaves unquantized (`ignore`); returns their names. fp8
    `static_input`: the checkpoint's static activation scales quantise the experts' inputs;
    `weight_only`: nothing quantises them (W8A16)."""
    if method == "w8a8-int8":
        return int8_experts(model, (lambda module: not ignore(module)) if ignore else None)
    names = []
    if method == "fp8":
        for name, module in model.named_modules():
            if isinstance(module, FusedMoE) and experts_quantized(model, name, module, lambda m: not ignore(m)):
                module.use_fp8(block, static_input, weight_only)
                names.append(name)
    return names


def build_model(model_config: ModelConfig, device: torch.device, pctx: ParallelContext | None = None,
                method: Optional[str] = None, **model_kwargs):
    """The model with its parameters as the engine allocates them (dtypes, quantized layouts,
    this rank's slices), uninitialised. Built on the meta device first, so the 16-bit tensors
    that quantization replaces never take memory; `device` "meta" returns it there (`deepserve
    plan` and its tests count these bytes). With pipeline parallel only this stage's modules get
    storage: the weights of other stages stay on the meta device (copies into them are no-ops)."""
    pctx = pctx or single_process()
    cfg = model_config.hf_config
    cls = model_class(cfg, config_source(model_config.model))
    dtype = resolve_dtype(model_config, device)
    with torch.device("meta"):
        model = cls(cfg, dtype=dtype, pctx=pctx, **model_kwargs)
    block = fp8_block_size(cfg) or (128, 128)
    if method in INT4_METHODS:
        spec = int4_spec_for(cfg, model_config.quantization)
        quantize_int4_linears(model, spec)
        quantize_int4_experts(model, spec)
    elif method == modelslim.METHOD:
        desc = modelslim.description(model_config.model)
        quantize_modelslim_linears(model, desc)
        quantize_modelslim_experts(model, desc)
    elif method is not None:
        ignore = checkpoint_ignore(cfg)
        # a compressed-tensors FP8 checkpoint without input_activations: its activations stay unquantized
        scheme = fp8_scale_scheme(cfg.get("quantization_config") or {}) if method == "fp8" else None
        static = scheme is not None and scheme.static_input
        weight_only = scheme is not None and scheme.weight_only
        quantize_linears(model, method, block, ignore, weight_only=weight_only,
                         static_input=static, k_uniform=scheme is not None and scheme.strategy != "block")
        quantize_experts(model, method, block, ignore, static, weight_only)
    if pctx.pp_size > 1:
        model.pp_layers = pp_layer_range(len(model.model.layers), pctx.pp_size, pctx.pp_rank)
    if torch.device(device).type == "meta":
        return model
    for module in (stage_modules(model, pctx) if pctx.pp_size > 1 else [model]):
        _materialize(module, device)
    if getattr(model, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight  # re-tie after materializing
    return model


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Run every module's `process_weights_after_loading` once its weights are in place
    (loaded or random), children before parents: the fusion and quantization choices a forward
    would otherwise re-check each call (fused projections, shared experts inside the routed
    experts' op, MLA's W_UK / W_UV views) become plain attributes."""
    for module in reversed(list(model.modules())):
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None:
            hook()


def drop_weight_loaders(model: torch.nn.Module) -> None:
    """Remove the load-time `weight_loader` of every parameter. Each is bound to the layer that
    holds the parameter (a method or a partial over the layer): a reference cycle that would keep
    every weight in memory after the model is dropped, until a garbage-collector pass, which in a
    long-running process may come after the next engine has run out of device memory."""
    for p in model.parameters():
        p.__dict__.pop("weight_loader", None)


@torch.no_grad()
def load_model(model_config: ModelConfig, device: torch.device, pctx: ParallelContext | None = None,
               ops: OpTable | None = None):
    """The model, its weights loaded and processed; its layers run `ops` (default: the torch
    reference)."""
    cfg = model_config.hf_config
    dummy = model_config.load_format == "dummy"
    stored, method = linear_method(model_config.model, cfg, model_config.quantization, model_config.load_format)
    model = build_model(model_config, device, pctx, method, **({"load_mtp": True} if model_config.load_mtp else {}))
    model.quantization = method          # the start-up log counts the plan's bytes for it
    dtype = resolve_dtype(model_config, device)
    block = fp8_block_size(cfg) or (128, 128)
    if dummy:
        init_dummy_weights(model, seed=model_config.seed)
        init_dummy_quantized(model, seed=model_config.seed)
    else:
        weights = iterate_checkpoint(model_config.model)
        if method in INT4_METHODS:
            spec = int4_spec(cfg)
            weights = int4_stream(weights, spec, functools.partial(int4_kept, spec), dtype)
        elif method == modelslim.METHOD:
            desc = modelslim.description(model_config.model)
            weights = modelslim.modelslim_stream(weights, desc, functools.partial(modelslim_module, desc), dtype)
        elif stored is not None:
            ct = fp8_scale_scheme(cfg.get("quantization_config") or {})
            if ct is not None:      # compressed-tensors / per-tensor FP8: DeepSeek's names and scale grid
                weights = ct_fp8_stream(weights, ct)
            # stored quantized tensors go as they are to the layers that run the same method (fp8
            # and int8 experts too); those of modules the checkpoint says it left unquantized are
            # dequantized for their 16-bit layers
            ignore = checkpoint_ignore(cfg)
            if method != stored:
                keep = lambda name: False  # noqa: E731
            else:
                keep = lambda name: ((is_quantized_tensor(name) or is_expert_tensor(name))  # noqa: E731
                                     and not ignore(tensor_module(name)))
            weights = dequantize_stream(_drop_unused_input_scales(weights, keep), stored, block, dtype, keep)
        loaded = model.load_weights(weights)
        params = dict(model.named_parameters())
        loaded |= {n for n, p in params.items() if getattr(p, "filled", False)}
        missing = sorted(set(params) - loaded - getattr(model, "optional_params", set()))
        if missing:
            names = getattr(model, "checkpoint_names", lambda text: text)(", ".join(missing[:5]))
            raise ValueError(f"checkpoint {model_config.model} lacks tensor(s) for: {names}"
                             + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    process_weights_after_loading(model)
    drop_weight_loaders(model)
    if ops is not None:
        bind(model, ops)
    return model.eval()
