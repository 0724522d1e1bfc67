"""AutoAWQ and AutoGPTQ as the packers: their own `WQLinear_GEMM.from_linear` and
`QuantLinear.pack` write the 4-bit tensors, their own dequantization (AutoAWQ's
`dequantize_gemm`, AutoGPTQ's QuantLinear forward on the CPU) gives the reference weights, and
deepserve serving the checkpoint must match the fp32 model of those weights
(tests/quant/test_real_packers.py, which also checks the committed fixtures these write).

Both libraries stop at quantization: the scales and zero points come from a plain
round-to-nearest over each group, as their quantizers hand them to the packers (the layer's
weight replaced by its quantized values first, as AutoAWQ's `_apply_quant` and AutoGPTQ's
`pack_model` do); with desc_act (act order) the groups follow a permutation of the input
features, as GPTQ's g_idx records it. Scales are powers of two, so the libraries' fp16 dequantization is exact and
the comparison can be tight. Skipped unless the libraries import: AutoAWQ 0.2.9 (`awq`) and
AutoGPTQ 0.7.1 (`auto_gptq`, its QuantLinear module read on its own: the package's __init__
needs a transformers before 5) with accelerate, installed with --no-deps beside the pinned torch.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.quant.test_real_packers import EXACT, METHODS, check_against_reference


def _gptq_quant_linear(kind: str):
    """AutoGPTQ's QuantLinear of `kind` ("cuda_old": its default, "cuda": the one for desc_act)."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None:
        pytest.skip("auto_gptq is not installed")
    path = Path(spec.origin).parent / "nn_modules" / "qlinear" / f"qlinear_{kind}.py"
    module_spec = importlib.util.spec_from_file_location(f"auto_gptq_qlinear_{kind}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


def _rtn(w: torch.Tensor, g_idx: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K], g_idx [K] (input feature -> group) -> (quantized values as floats [N, K],
    scales [N, G], zero points [N, G]): w ~= (u - z) * s with u in 0..15 and s a power of two."""
    w = w.float()
    groups = int(g_idx.max()) + 1
    lo = torch.stack([w[:, g_idx == i].amin(1) for i in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == i].amax(1) for i in range(groups)], 1).clamp(min=0)
    if sym:
        s = torch.exp2(torch.ceil(torch.log2(torch.maximum(-lo, hi).clamp(min=1e-8) / 7)))
        z = torch.full_like(s, 8)
    else:
        s = torch.exp2(torch.ceil(torch.log2(((hi - lo) / 15).clamp(min=1e-8))))
        z = torch.round(-lo / s).clamp(0, 15)
    s_k, z_k = s[:, g_idx], z[:, g_idx]
    u = torch.round(w / s_k + z_k).clamp(0, 15)
    return (u - z_k) * s_k, s, z


def _awq_module(w: torch.Tensor, group: int) -> tuple[dict, torch.Tensor]:
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm
    wq, s, z = _rtn(w, torch.arange(w.shape[1]) // group, sym=False)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).half()
    linear.weight.data = wq.half()
    layer = WQLinear_GEMM.from_linear(linear, 4, group, scales=s.t().contiguous(), zeros=z.t().contiguous())
    tensors = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales}
    return tensors, dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, group).t().float()


def _gptq_module(w: torch.Tensor, group: int, sym: bool, act_order: bool) -> tuple[dict, torch.Tensor]:
    n, k = w.shape
    g_idx = torch.arange(k) // group
    if act_order:       # GPTQ's desc_act: features quantized in a permuted order, groups follow it
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k + n))
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k) // group
    wq, s, z = _rtn(w, g_idx, sym)
    linear = torch.nn.Linear(k, n, bias=False).half()
    linear.weight.data = wq.half()
    layer = _gptq_quant_linear("cuda" if act_order else "cuda_old")(4, group, k, n, bias=False)
    layer.pack(linear, s, z, g_idx.int())
    with torch.no_grad():                              # the library's own dequantization: W^T = I W^T
        dense = layer(torch.eye(k, dtype=torch.float16)).t().float()
    tensors = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales, "g_idx": layer.g_idx}
    return tensors, dense


def write_checkpoint(dense: Path, dst: Path, fmt: str, group: int, sym: bool = False, act_order: bool = False) -> None:
    """The dense folder `dense` packed by AutoAWQ (`fmt` "awq") or AutoGPTQ ("gptq") into `dst`,
    with the library's dequantized weights in dst/reference/weights.safetensors."""
    tensors = load_file(str(dense / "model.safetensors"))
    out, reference = {}, {}
    for name, t in tensors.items():
        module = name.rpartition(".")[0]
        if not name.endswith(".weight") or t.dim() != 2 or module.endswith(("embed_tokens", "lm_head", "mlp.gate")):
            out[name] = t
            continue
        parts, reference[name] = _awq_module(t, group) if fmt == "awq" else _gptq_module(t, group, sym, act_order)
        out.update({f"{module}.{role}": p.contiguous() for role, p in parts.items()})
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dense / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
         "modules_to_not_convert": None} if fmt == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
         "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "reference").mkdir()
    save_file({n: t.contiguous() for n, t in reference.items()}, str(dst / "reference" / "weights.safetensors"),
              metadata={"format": "pt"})


def build(case: str, root: Path) -> Path:
    """Case "<arch>-<awq|gptq>-g<group>[-sym][-actorder]" written under `root`."""
    from tests.quant.test_real_packers_live import MODELS
    arch, fmt, group, *flags = case.split("-")
    group = int(group[1:])
    dense = root / f"{arch}-{group}-dense"
    if not dense.is_dir():
        MODELS[arch](dense, 128 if group == 128 else 32)
    write_checkpoint(dense, root / case, fmt, group, sym="sym" in flags, act_order="actorder" in flags)
    return root / case


LIVE = ["llama-awq-g32", "qwen2-awq-g128", "llama-gptq-g128", "qwen2-gptq-g32-sym", "deepseek_v3-awq-g32",
        "deepseek_v3-gptq-g32-sym", "llama-gptq-g32-sym-actorder", "qwen2-gptq-g128-actorder",
        "deepseek_v3-gptq-g32-actorder"]
FIXTURES = ["llama-awq-g32", "qwen2-gptq-g32-actorder", "deepseek_v3-gptq-g32-sym"]


@pytest.mark.parametrize("case", LIVE)
def test_awq_and_gptq_checkpoints_load_and_agree(case, tmp_path):
    if "-awq-" in case:
        pytest.importorskip("awq.modules.linear.gemm")
    ckpt = build(case, tmp_path)
    method = METHODS[case.split("-")[1]]
    assert method in EXACT
    check_against_reference(ckpt, load_file(str(ckpt / "reference" / "weights.safetensors")), tmp_path, method,
                            rtol=1e-4)


def write_fixtures(data: Path, tmp: Path) -> None:
    for case in FIXTURES:
        shutil.copytree(build(case, tmp), data / case)
