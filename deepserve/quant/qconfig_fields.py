"""The fields a checkpoint's `quantization_config` may carry, per `quant_method`.

Fields known to change what the stored integers mean (a transform applied before quantization,
a kernel-specific layout, sparsity; GPTQModel's per-module `dynamic` overrides of bits or group
size, which quant/ignore.py refuses while reading its "-:" entries) are refused naming them unless
at their neutral value. A field deepserve does not know is logged as a warning naming it and the
checkpoint loads (writers add bookkeeping fields with each release; vLLM loads such checkpoints
too): the warning says where to look if the output is wrong. The lists hold what the
formats' writers put in config.json: AutoAWQ, transformers' AwqConfig and GPTQModel's AWQ; AutoGPTQ's
quantize_config, transformers' GPTQConfig and GPTQModel (7.7: `method`, `activation`); compressed-tensors' QuantizationConfig,
QuantizationScheme and QuantizationArgs (as llm-compressor saves them); DeepSeek's and vLLM's
fp8 config. Fields that only record how the checkpoint was made (dataset, dampening, observer)
are accepted; fields known to change the weights are accepted only at their neutral value.
"""
from __future__ import annotations

import json
import logging

logger = logging.getLogger("deepserve")

_AWQ = {"quant_method", "bits", "w_bit", "group_size", "q_group_size", "zero_point", "version",
        "modules_to_not_convert", "backend", "do_fuse", "fuse_max_seq_len", "modules_to_fuse",
        "exllama_config",
        # GPTQModel's AWQ checkpoints
        "method", "format", "checkpoint_format", "pack_dtype", "desc_act", "lm_head", "dynamic", "rotation",
        "meta", "activation"}
_GPTQ = {"quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "damp_percent",
         "damp_auto_increment", "static_groups", "true_sequential", "model_name_or_path",
         "model_file_base_name", "modules_to_not_convert", "tokenizer", "dataset", "use_cuda_fp16",
         "model_seqlen", "block_name_to_quantize", "module_name_preceding_first_block", "batch_size",
         "pad_token_id", "use_exllama", "disable_exllama", "max_input_length", "exllama_config",
         "cache_block_outputs", "modules_in_block_to_quantize", "meta", "backend", "is_marlin_format",
         "lm_head", "dynamic", "pack_dtype", "format", "mse", "v2", "v2_alpha", "hyb_act", "adapter",
         "rotation", "quantize_config", "act_group_aware", "pack_impl", "gptaq", "gptaq_alpha",
         "gptaq_memory_device", "foem", "scale_search", "offload_to_disk", "offload_to_disk_path", "fail_safe",
         "failsafe", "fallback", "gc_mode", "shard_strategy", "wait_for_submodule_finalizers", "method",
         "activation"}
_FP8 = {"quant_method", "activation_scheme", "fmt", "weight_block_size", "ignored_layers",
        "modules_to_not_convert", "scale_fmt"}
_CT = {"quant_method", "format", "quantization_status", "config_groups", "ignore", "kv_cache_scheme",
       "sparsity_config", "global_compression_ratio", "version", "transform_config", "provider",
       "moe_sparsity_config"}
_CT_SCHEME = {"targets", "weights", "input_activations", "output_activations", "format"}
_CT_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
            "actorder", "observer", "observer_kwargs", "scale_dtype", "zp_dtype"}
KNOWN = {"awq": _AWQ, "gptq": _GPTQ, "fp8": _FP8, "compressed-tensors": _CT}
# field -> the neutral values deepserve serves (anything else changes the weights' meaning)
# (GPTQModel's `activation` quantizes the inputs of the modules it names: a runtime deepserve does
# not implement; its `method` repeats quant_method)
_NEUTRAL = {"gptq": {"lm_head": (None, False), "is_marlin_format": (None, False),
                     "rotation": (None,), "adapter": (None,), "format": (None, "gptq", "gptq_v2"),
                     "pack_dtype": (None, "int32", "torch.int32"), "activation": (None,),
                     "method": (None, "gptq")},
            "awq": {"lm_head": (None, False), "rotation": (None,), "desc_act": (None, False),
                    "format": (None, "gemm", "GEMM"), "checkpoint_format": (None, "gemm", "GEMM"),
                    "pack_dtype": (None, "int32", "torch.int32"), "activation": (None,), "method": (None, "awq")},
            # moe_sparsity_config: experts pruned to a per-layer count the config.json does not give
            "compressed-tensors": {"transform_config": (None, {}), "moe_sparsity_config": (None, {})},
            # DeepSeek-V3.1's "ue8m0": its fp32 block scales are powers of two, read as any fp32 scale
            "fp8": {"fmt": (None, "e4m3"), "scale_fmt": (None, "ue8m0")}}


def quantization_config(hf_config) -> dict:
    """config.json's quantization_config ({} without one), refused unless it is an object."""
    qc = hf_config.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ValueError(f"config.json quantization_config must be an object with a quant_method, got "
                         f"{type(qc).__name__} {str(qc)[:60]!r}")
    if not isinstance(qc.get("quant_method", ""), str):
        raise ValueError(f"config.json quantization_config.quant_method must be a string, got {qc['quant_method']!r}")
    return qc


def distinct_schemes(qc: dict) -> dict[str, dict]:
    """A compressed-tensors config's groups, one per distinct scheme (weights and input
    activations): groups that differ only in their targets quantize their modules alike, so
    they are one scheme (the modules each group targets: quant/ignore.py)."""
    out: dict[str, dict] = {}
    seen: set[str] = set()
    for name, group in (qc.get("config_groups") or {}).items():
        if not isinstance(group, dict):
            raise ValueError(f"compressed-tensors group {name}: must be an object, got {group!r}")
        key = json.dumps([group.get("weights"), group.get("input_activations"), group.get("format")],
                         sort_keys=True)
        if key not in seen:
            seen.add(key)
            out[name] = group
    return out


def group_format(qc: dict, group: dict) -> str | None:
    """A compressed-tensors group's storage format: its own `format`, else the checkpoint's
    ("mixed-precision", the checkpoint's when its groups differ, names no layout: None)."""
    return next((f for f in (group.get("format"), qc.get("format")) if f not in ("mixed-precision", None)), None)


def describe_schemes(groups: dict[str, dict]) -> str:
    """Each group's weights and input activations in a few words, for a refusal naming them."""
    def args(a) -> str:
        if not isinstance(a, dict):
            return "none"
        shape = {"group": a.get("group_size"), "block": a.get("block_structure")}.get(a.get("strategy"))
        return f"{a.get('num_bits')}-bit {a.get('type', 'int')} {a.get('strategy')}" + (f" {shape}" if shape else "")
    return "; ".join(f"{name}: weights {args(g.get('weights'))}, activations {args(g.get('input_activations'))}"
                     for name, g in groups.items())


def _unknown(where: str, got: dict, known: set) -> None:
    extra = sorted(set(got) - known)
    if extra:
        logger.warning("%s: unknown field(s) %s, loaded as if absent; if the output looks wrong, "
                       "this field may change what the weights mean", where, ", ".join(map(repr, extra)))


def _object(where: str, name: str, value) -> None:
    """A field that holds a JSON object (or is absent / null)."""
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{where}: {name} must be an object, got {str(value)[:60]!r}")


def check_fields(qc: dict) -> None:
    """Refuse a quantization_config with a field its quant_method does not define, or a known
    field at a value that changes the weights and that deepserve does not implement."""
    method = qc.get("quant_method")
    if method not in KNOWN:
        return          # refused by the caller, naming the method
    where = f"quantization_config ({method})"
    _unknown(where, qc, KNOWN[method])
    for name, neutral in _NEUTRAL.get(method, {}).items():
        if qc.get(name) not in neutral:
            raise ValueError(f"{where}: {name} {qc[name]!r} is not supported")
    block = qc.get("weight_block_size") if method == "fp8" else None
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"{where}: weight_block_size must be two positive integers [rows, columns], "
                         f"got {block!r}")
    if method != "compressed-tensors":
        return
    for name in ("sparsity_config", "config_groups", "kv_cache_scheme"):
        _object(where, name, qc.get(name))
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format", "dense") != "dense":
        raise ValueError(f"{where}: sparsity_config format {sparsity['format']!r} is not supported (dense only)")
    for gname, group in (qc.get("config_groups") or {}).items():
        gwhere = f"compressed-tensors group {gname}"
        if not isinstance(group, dict):
            raise ValueError(f"{where}: config_groups {gname} must be an object, got {str(group)[:60]!r}")
        for part in ("weights", "input_activations", "output_activations"):
            _object(gwhere, part, group.get(part))
        _unknown(gwhere, group, _CT_SCHEME)
        if group.get("output_activations"):
            raise ValueError(f"{gwhere}: output_activations quantization is not supported")
        for part in ("weights", "input_activations"):
            if group.get(part):
                _unknown(f"{gwhere} {part}", group[part], _CT_ARGS)
    kv = qc.get("kv_cache_scheme")
    if kv:
        _unknown(f"{where} kv_cache_scheme", kv, _CT_ARGS)
        # the k_scale / v_scale it writes are per-tensor fp8 scales (--kv-cache-dtype fp8), as vLLM takes them
        # (asymmetric: k / v zero points, which no fp8 pool reads)
        if (kv.get("type", "float"), kv.get("num_bits", 8), kv.get("strategy", "tensor"),
                kv.get("symmetric", True)) != ("float", 8, "tensor", True):
            raise ValueError(f"{where}: kv_cache_scheme {kv.get('type')} {kv.get('num_bits')}-bit, strategy "
                             f"{kv.get('strategy')!r}, symmetric={kv.get('symmetric')} is not supported (fp8, "
                             f"symmetric, one scale a tensor, only)")
