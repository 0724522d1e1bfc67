"""Model classes by the `architectures` entry of config.json, and the config fields they read.

`model_class(cfg)` checks those fields before a model is built: a config.json without
`hidden_size`, or with `"hidden_size": "4096"`, is refused naming the field, instead of failing
somewhere inside a layer's constructor.
"""
from __future__ import annotations

import importlib
import numbers
from pathlib import Path

# architecture -> (module under deepserve.models, class name)
_MODELS = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v3", "DeepseekV3ForCausalLM"),
}

# fields the model code reads as attributes, so config.json must hold them: name -> kind
_REQUIRED = {"hidden_size": int, "intermediate_size": int, "num_hidden_layers": int, "num_attention_heads": int,
             "vocab_size": int, "max_position_embeddings": int, "rms_norm_eps": float, "rope_theta": float}
_MLA_REQUIRED = {"kv_lora_rank": int, "qk_nope_head_dim": int, "qk_rope_head_dim": int, "v_head_dim": int}
# read where present (absent or null: the model's default)
_OPTIONAL = {"num_key_value_heads": int, "head_dim": int, "q_lora_rank": int}
_MOE = {"moe_intermediate_size": int, "num_experts_per_tok": int}   # required when n_routed_experts is set


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}")
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(f"deepserve.models.{module}"), cls)


def config_source(model: str) -> str:
    """How errors name `model`'s config: its config.json, or the preset."""
    path = Path(model) / "config.json"
    return str(path) if path.is_file() else f"preset {model}"


def _check_field(cfg, name: str, kind: type, required: bool, where: str) -> None:
    value = cfg.get(name)
    if value is None:
        if required:
            raise ValueError(f"{where} has no {name!r}, which {cfg.architecture} needs "
                             f"({'an integer' if kind is int else 'a number'} > 0)")
        return
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or value <= 0:
        raise ValueError(f"{where}: {name} must be {'an integer' if kind is int else 'a number'} > 0, "
                         f"got {value!r}")


def check_config(cfg, where: str = "config.json") -> None:
    """Refuse a config.json (HFConfig) whose architecture has no model here, or that lacks a field
    the model reads or holds it with the wrong type, naming the file (`where`), the field and the
    value."""
    archs = cfg.get("architectures")
    if isinstance(archs, str) or (isinstance(archs, list) and not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"{where}: architectures must be a list of class names, e.g. "
                         f"[\"LlamaForCausalLM\"], got {archs!r}")
    architecture = cfg.architecture
    module, _ = _MODELS.get(architecture, (None, None))
    if module is None:
        get_model_class(architecture)   # names the supported ones
    fields = [(n, k, True) for n, k in _REQUIRED.items()] + [(n, k, False) for n, k in _OPTIONAL.items()]
    if module == "deepseek_v3":
        fields += [(n, k, True) for n, k in _MLA_REQUIRED.items()]
        experts = cfg.get("n_routed_experts")
        if experts is not None and (not isinstance(experts, int) or isinstance(experts, bool) or experts < 0):
            raise ValueError(f"{where}: n_routed_experts must be an integer >= 0, got {experts!r}")
        if experts:
            fields += [(n, k, True) for n, k in _MOE.items()]
    for name, kind, required in fields:
        _check_field(cfg, name, kind, required, where)
    scaling = cfg.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"{where}: rope_scaling must be an object (e.g. {{\"rope_type\": \"yarn\", "
                         f"\"factor\": 4}}) or null, got {scaling!r}")


def model_class(cfg, where: str = "config.json"):
    """The model class for config.json `cfg` (HFConfig), its fields checked (`check_config`)."""
    check_config(cfg, where)
    return get_model_class(cfg.architecture)
