"""Which tensors a quantized checkpoint keeps in high precision, and why.

Common practice (DeepSeek's own FP8 release, llm-compressor / vLLM W8A8 recipes): only the
large Linear weights are quantized. Kept as they are:

- embeddings (`embed_tokens`): a lookup, not a GEMM; quantizing them buys nothing;
- the LM head (`lm_head`, MTP `shared_head.head`): logits are sensitive to its error;
- norms: 1-D scales (and named `*norm*` even when stored 2-D);
- the MoE router gate (`mlp.gate.`, Qwen-MoE `shared_expert_gate`): tiny, and top-k expert
  choice flips under small errors;
- biases, `e_score_correction_bias`, and any tensor that is not a 2-D floating-point matrix.

The rule reads names only (Hugging Face parameter names), never shapes.
"""
from __future__ import annotations

import torch

HIGH_PRECISION_HELP = (
    "Kept in high precision (common practice, as in DeepSeek's FP8 release and vLLM W8A8 "
    "recipes): embeddings, lm_head (and MTP shared_head.head), norms, the MoE router gate "
    "(mlp.gate), biases, e_score_correction_bias and every tensor that is not a 2-D "
    "floating-point .weight; all other 2-D Linear weights are quantized.")

# Reasons for which the tensor is a Linear layer's weight that a serving engine must be told
# not to quantize (compressed-tensors' "ignore" list); embeddings and norms are not Linear.
LINEAR_REASONS = {"lm head", "router gate"}


def high_precision_reason(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Why `name` stays unquantized, or None if it is a Linear weight to quantize."""
    if not dtype.is_floating_point:
        return "not floating point"
    if len(shape) != 2:
        return "not a 2-D matrix"
    if not name.endswith(".weight"):
        return "not a weight (bias or buffer)"
    module = name[: -len(".weight")]
    leaf = module.rsplit(".", 1)[-1]
    if "embed" in leaf or leaf == "wte":
        return "embedding"
    if module == "lm_head" or module.endswith(".lm_head") or module.endswith("shared_head.head"):
        return "lm head"
    if "norm" in leaf:
        return "norm"
    if module.endswith("mlp.gate") or leaf == "shared_expert_gate":
        return "router gate"
    return None
