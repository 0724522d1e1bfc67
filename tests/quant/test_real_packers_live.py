"""compressed-tensors as the packer: checkpoints written by the library's own API, served by
deepserve and compared with the library's own decompression (tests/quant/test_real_packers.py
has the comparison, and the committed checkpoints CI checks without the library).

Skipped unless `compressed_tensors` imports (CI pins torch / transformers and does not install
it; add it beside them without its dependencies, e.g. `pip install --no-deps --target DIR
compressed-tensors loguru psutil` and DIR on PYTHONPATH). Run as a script, this file rewrites
the committed fixtures, AutoAWQ's and AutoGPTQ's too (test_real_packers_awq_gptq.py):
`python -m tests.quant.test_real_packers_live`.

The writer follows llm-compressor's flow with the library alone: the model's checkpoint layout
as modules (each 2-D `<m>.weight` an nn.Linear, experts included: llm-compressor unfuses them
the same way), `apply_quantization_config`, each weight's scale and zero point from the
library's `calculate_qparams` over its min / max (what llm-compressor's min-max observer feeds
it), then `ModelCompressor.from_pretrained_model(...).compress_model` and `update_config`. The
format is the library's own choice (`infer_model_format`) unless a case names one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from tests.models.hf_reference import save_tiny, save_tiny_mla_moe
from tests.quant.test_real_packers import DATA, EXACT, METHODS, check_against_reference

W4 = {"num_bits": 4, "type": "int", "symmetric": True}
INT8_TOKEN = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}
SCHEMES = {
    "w4a16-g32": {"weights": {**W4, "strategy": "group", "group_size": 32}},
    "w4a16-g128": "W4A16",
    "w4a16-asym-g32": {"weights": {**W4, "strategy": "group", "group_size": 32, "symmetric": False}},
    "w4a16-asym-g128": "W4A16_ASYM",
    "w4a16-channel": {"weights": {**W4, "strategy": "channel"}},
    "w4a16-asym-channel": {"weights": {**W4, "strategy": "channel", "symmetric": False}},
    "w4a8-g32": {"weights": {**W4, "strategy": "group", "group_size": 32}, "input_activations": INT8_TOKEN},
    "w4a8-g128": "W4A8",
    "w4a8-asym-channel": {"weights": {**W4, "strategy": "channel", "symmetric": False},
                          "input_activations": INT8_TOKEN},
    "w8a8-channel": "W8A8",
    "fp8-channel": "FP8_DYNAMIC",
    "fp8-block": "FP8_BLOCK",
    "fp8-tensor": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
                   "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}},
}
IGNORE = ["lm_head", "re:.*mlp\\.gate$"]      # the LM head and DeepSeek's router stay 16-bit


# ------------------------------------------------------------------------ tiny dense models
# every Linear's dimensions a multiple of 32: AutoAWQ and AutoGPTQ allocate N // 32 * 4 packed columns
def _llama(path: Path, size: int) -> None:
    cfg = transformers.LlamaConfig(vocab_size=64 if size == 32 else 256, hidden_size=size, intermediate_size=2 * size,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=size // 2, max_position_embeddings=128, tie_word_embeddings=False)
    save_tiny(transformers.LlamaForCausalLM, cfg, path)


def _qwen2(path: Path, size: int) -> None:
    cfg = transformers.Qwen2Config(vocab_size=64 if size == 32 else 256, hidden_size=size, intermediate_size=2 * size,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    save_tiny(transformers.Qwen2ForCausalLM, cfg, path)


def _deepseek_v3(path: Path, size: int) -> None:
    # one MoE layer (MLA, 4 routed experts, a shared one): small enough to commit, every
    # dimension a multiple of 32 (AutoAWQ and AutoGPTQ pack 32 // 4 columns a step)
    save_tiny_mla_moe(path, vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=1,
                      first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=32, v_head_dim=16)


MODELS = {"llama": _llama, "qwen2": _qwen2, "deepseek_v3": _deepseek_v3}


# ----------------------------------------------------------------- the library as the packer
def _modules_of(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The checkpoint's layout as modules: each 2-D `<m>.weight` an nn.Linear (the embedding an
    nn.Embedding), every other tensor a parameter of its module."""
    root = nn.Module()

    def child(path: str) -> nn.Module:
        m = root
        for part in filter(None, path.split(".")):
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        return m

    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and t.dim() == 2:
            parent, _, last = module.rpartition(".")
            layer = (nn.Embedding(*t.shape) if last == "embed_tokens" else
                     nn.Linear(t.shape[1], t.shape[0], bias=f"{module}.bias" in tensors))
            child(parent).add_module(last, layer)
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        child(module).register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=False))
    return root


def _min_max(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """min / max of `weight` [N, K] over each of the scheme's groups, in the scale's shape."""
    n, k = weight.shape
    if args.strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if args.strategy == "group":
        w = weight.unflatten(1, (k // args.group_size, args.group_size))
        return w.amin(-1), w.amax(-1)
    assert args.strategy == "block", args.strategy
    bn, bk = args.block_structure
    w = nn.functional.pad(weight, (0, -k % bk, 0, -n % bn)).unflatten(1, (-1, bk)).unflatten(0, (-1, bn))
    return w.amin((1, 3)), w.amax((1, 3))


def write_checkpoint(src: Path, dst: Path, scheme, fmt: str | None = None, ignore=IGNORE) -> None:
    """The dense folder `src` quantized by compressed-tensors into `dst` (a checkpoint folder)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    model = _modules_of(load_file(str(src / "model.safetensors")))
    scheme = (preset_name_to_scheme(scheme, ["Linear"]) if isinstance(scheme, str)
              else QuantizationScheme(targets=["Linear"], **scheme))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore,
                                                        quantization_status=QuantizationStatus.INITIALIZED))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            scale, zero_point = calculate_qparams(*_min_max(module.weight.float(), args), args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    dst.mkdir(parents=True)
    save_file({n: t.detach().contiguous() for n, t in model.state_dict().items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    compressor.update_config(str(dst))


def library_decompression(ckpt: Path) -> dict[str, torch.Tensor]:
    """`<module>.weight` (fp32) of every quantized module of `ckpt`, decompressed by the
    library's compressor for the checkpoint's format."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
    tensors = load_file(str(ckpt / "model.safetensors"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if f"{module}.weight_scale" in tensors and leaf.startswith("weight"):
            parts.setdefault(module, {})[leaf] = t
    return {f"{m}.weight": compressor.decompress(p, scheme)["weight"].float().contiguous() for m, p in parts.items()}


def build(case: str, root: Path) -> Path:
    """Case "<arch>-<scheme>[@<format>][+lm_head]" written under `root`, its reference beside it
    (+lm_head: the LM head quantized too)."""
    arch, _, rest = case.partition("-")
    rest, plus, _ = rest.partition("+lm_head")
    scheme, _, fmt = rest.partition("@")
    size = 128 if scheme.endswith("g128") else 32
    dense = root / f"{arch}-{size}-dense"
    if not dense.is_dir():
        MODELS[arch](dense, size)
    out = root / case
    write_checkpoint(dense, out, SCHEMES[scheme], fmt or None, ignore=IGNORE[1:] if plus else IGNORE)
    (out / "reference").mkdir()
    save_file(library_decompression(out), str(out / "reference" / "weights.safetensors"), metadata={"format": "pt"})
    return out


LIVE = ["llama-w4a16-g128", "llama-w4a16-asym-g128", "qwen2-w4a16-asym-g32", "llama-w4a8-g128",
        "llama-w4a8-g32@pack-quantized", "qwen2-w4a8-asym-channel", "llama-fp8-block", "qwen2-fp8-tensor",
        "deepseek_v3-w4a16-g32", "deepseek_v3-w4a8-g32", "deepseek_v3-w8a8-channel", "deepseek_v3-fp8-block",
        "llama-w4a16-asym-g32+lm_head", "qwen2-w4a8-g32+lm_head", "deepseek_v3-w8a8-channel+lm_head"]


@pytest.mark.parametrize("case", LIVE)
def test_compressed_tensors_checkpoints_load_and_agree(case, tmp_path):
    pytest.importorskip("compressed_tensors")
    ckpt = build(case, tmp_path)
    reference = load_file(str(ckpt / "reference" / "weights.safetensors"))
    method = METHODS[case.split("-")[1]]
    check_against_reference(ckpt, reference, tmp_path, method, rtol=1e-4 if method in EXACT else 3e-2)


# the committed fixtures (tests/quant/data/real_packers): each format and scheme family once
FIXTURES = ["llama-w4a16-asym-g32", "qwen2-w4a16-channel", "llama-w4a8-g32", "llama-w8a8-channel",
            "llama-fp8-block", "qwen2-fp8-channel", "deepseek_v3-w4a16-asym-channel", "deepseek_v3-w4a8-g32"]


def main() -> None:
    import tempfile
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    from tests.quant.test_real_packers_awq_gptq import write_fixtures
    with tempfile.TemporaryDirectory() as tmp:
        for case in FIXTURES:
            shutil.copytree(build(case, Path(tmp)), DATA / case)
        write_fixtures(DATA, Path(tmp))
    for case in sorted(p.name for p in DATA.iterdir()):
        print(f"{case}: {sum(f.stat().st_size for f in (DATA / case).rglob('*') if f.is_file())} bytes")


if __name__ == "__main__":
    main()
