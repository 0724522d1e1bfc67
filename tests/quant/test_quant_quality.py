"""Converted stories260k checkpoints still predict like the original (transformers as oracle).

fp8-block -> fp8-to-bf16 is exactly what a CPU engine serves from an FP8 folder (dequantize at
load). w8a8-int8 is checked with its weights dequantized and, for W8A8, every Linear input
fake-quantized per token, which is what the int8 GEMM computes up to int32 accumulation.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deepserve.quant import (convert_fp8_to_bf16, dequant_int8, quant_int8_per_token,
                             quantize_checkpoint)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ASSET = Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "stories260k"
TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
        "park with her friends. One day, she saw a big red ball.")


def _load(folder: Path) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _fake_quant_inputs(model: torch.nn.Module) -> list:
    def hook(_mod, args):
        return (dequant_int8(*quant_int8_per_token(args[0]), out_dtype=args[0].dtype),)
    return [m.register_forward_pre_hook(hook) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def _compare(ref: torch.nn.Module, model: torch.nn.Module,
             ids: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || model)) over every position."""
    with torch.no_grad():
        lp = ref(ids).logits[0].log_softmax(-1)
        lq = model(ids).logits[0].log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return (lp.argmax(-1) == lq.argmax(-1)).float().mean().item(), kl


def test_stories260k_fp8_and_int8_logits_close_to_fp32(tmp_path):
    ids = torch.tensor([tokenizers.Tokenizer.from_file(str(ASSET / "tokenizer.json"))
                        .encode(TEXT).ids])
    ref = _load(ASSET)

    quantize_checkpoint(ASSET, tmp_path / "fp8", "fp8-block", progress=False)
    convert_fp8_to_bf16(tmp_path / "fp8", tmp_path / "bf16", progress=False)
    top1, kl = _compare(ref, _load(tmp_path / "bf16"), ids)
    print(f"stories260k fp8-block: top-1 {top1:.3f}, mean KL {kl:.5f}")
    assert top1 >= 0.85 and 0 < kl < 0.01

    quantize_checkpoint(ASSET, tmp_path / "int8", "w8a8-int8", progress=False)
    sd = load_file(str(tmp_path / "int8" / "model.safetensors"))
    weights = {k: dequant_int8(v, sd[k + "_scale"], torch.float32) if v.dtype == torch.int8
               else v for k, v in sd.items() if not k.endswith("_scale")}
    int8 = _load(ASSET)
    result = int8.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied
    top1_w, kl_w = _compare(ref, int8, ids)
    hooks = _fake_quant_inputs(int8)
    top1_a, kl_a = _compare(ref, int8, ids)
    with torch.no_grad():
        greedy = int8.generate(ids[:, :8], max_new_tokens=24, do_sample=False)
        greedy_ref = ref.generate(ids[:, :8], max_new_tokens=24, do_sample=False)
    for h in hooks:
        h.remove()
    print(f"stories260k w8a8-int8: weight-only top-1 {top1_w:.3f} KL {kl_w:.5f}; "
          f"W8A8 top-1 {top1_a:.3f} KL {kl_a:.5f}")
    assert top1_w >= 0.95 and 0 < kl_w < 0.002
    assert top1_a >= 0.95 and kl_w < kl_a < 0.005  # activation rounding adds error
    agree = (greedy[0] == greedy_ref[0]).float().mean().item()
    assert agree >= 0.8, (greedy.tolist(), greedy_ref.tolist())
