"""W8A8 int8 routed experts: a FusedMoE's stacked expert weights kept int8 with one fp32 scale
per output row, run with dynamic per-token int8 activations (ops.fused_moe_int8).

The checkpoints that store them: msModelSlim "W8A8_DYNAMIC" experts (quant/modelslim.py:
`weight` int8 [N, K], `weight_scale` [N, 1], `weight_offset` [N, 1], zero and dropped by the
loader's stream) and compressed-tensors W8A8 int8 (`weight`, `weight_scale` [N, 1]). A float
expert tensor (a 16-bit folder served with `--quantization w8a8-int8`, random weights) is
quantized here per output row with the converter's rule (quant/int8.py) before slicing.

`Int8Experts().create(moe)` replaces w13_weight / w2_weight with int8 ones of the same names
and adds w13_weight_scale [E, 2I, 1] / w2_weight_scale [E, D, 1] (the checkpoint's names, so
the per-expert loading reaches them with shard id (expert, "w1" | "w3" | "w2")). Slicing as
for 16-bit experts (FusedMoE.weight_loader): whole experts under EP; without EP this rank's
rows of I for gate / up with their scales, and down's columns of I, whose per-row scales
(over all of I) stay whole.
"""
from __future__ import annotations

import functools
import re

import torch
from torch import nn

from deepserve.quant.fp8 import first_bad_value
from deepserve.quant.int8 import quant_int8_per_channel


class Int8Experts:
    """The routed-expert method of a FusedMoE holding int8 experts."""

    def create(self, moe: nn.Module) -> None:
        e, i, d = moe.num_local_experts, moe.local_intermediate, moe.hidden_size
        device = moe.w13_weight.device
        del moe.w13_weight, moe.w2_weight
        for name, shape, dtype in (("w13_weight", (e, 2 * i, d), torch.int8), ("w2_weight", (e, d, i), torch.int8),
                                   ("w13_weight_scale", (e, 2 * i, 1), torch.float32),
                                   ("w2_weight_scale", (e, d, 1), torch.float32)):
            p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
            p.weight_loader = functools.partial(self.load, moe)
            p.quantize_on_load = dtype == torch.int8      # takes float tensors too (init_dummy_weights)
            setattr(moe, name, p)
        moe.quant = self

    def load(self, moe: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """One expert's checkpoint tensor (int8 weight, its scale, or a float weight) -> this rank's part."""
        expert, part = shard_id
        name = getattr(param, "param_name", "?")
        if moe.local_index(expert, name) is None:
            return                                  # another EP rank's expert
        scale = moe.w2_weight_scale if part == "w2" else moe.w13_weight_scale
        if param is scale:
            self._load_scale(moe, param, loaded, shard_id, name)
        elif loaded.is_floating_point():
            n, k = (moe.hidden_size, moe.intermediate_size) if part == "w2" else (moe.intermediate_size, moe.hidden_size)
            if tuple(loaded.shape) != (n, k):
                raise ValueError(f"tensor {name} expert {expert} {part}: checkpoint shape {tuple(loaded.shape)} "
                                 f"does not match the model's {(n, k)}")
            q, s = quant_int8_per_channel(loaded.to(param.device))           # the whole tensor, then shard
            moe.weight_loader(param, q, shard_id)
            self._load_scale(moe, scale, s, shard_id, name)
            scale.filled = True
        elif loaded.dtype != torch.int8:
            raise ValueError(f"tensor {name} expert {expert} {part}: int8 experts take int8 or float "
                             f"weights, got {loaded.dtype}")
        else:
            moe.weight_loader(param, loaded, shard_id)

    @staticmethod
    def _load_scale(moe: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id, name: str) -> None:
        """One expert's per-row scales [N, 1] (or [N]): gate / up rows sliced to this rank, down's whole."""
        expert, part = shard_id
        local = moe.local_index(expert, name)
        if local is None:
            return
        rows = moe.hidden_size if part == "w2" else moe.intermediate_size
        if loaded.numel() != rows or loaded.dim() > 2 or not loaded.is_floating_point():
            raise ValueError(f"tensor {name} expert {expert} {part}: weight_scale {loaded.dtype} "
                             f"{tuple(loaded.shape)} does not match the {rows} output rows (one float per row)")
        loaded = loaded.reshape(-1, 1).to(param.device, torch.float32)
        if not bool(torch.isfinite(loaded).all()):
            raise ValueError(f"tensor {name} expert {expert} {part}: weight_scale has non-finite values "
                             f"({first_bad_value(loaded, positive=False)})")
        i, start = moe.local_intermediate, moe.inter_start
        if part == "w2":
            param.data[local].copy_(loaded)
        else:
            param.data[local].narrow(0, 0 if part == "w1" else i, i).copy_(loaded.narrow(0, start, i))

    def apply(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        return moe.ops.fused_moe_int8(x, moe.w13_weight, moe.w13_weight_scale, moe.w2_weight, moe.w2_weight_scale,
                                      topk_weights, topk_ids)


_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def int8_experts(model: nn.Module, expert_kind=None) -> list[str]:
    """Give every FusedMoE the Int8Experts method, or, with `expert_kind(checkpoint module of one
    expert matrix) -> bool`, those whose every expert matrix it accepts (a layer whose experts
    disagree is refused, naming one of each); returns their names."""
    names = []
    rename = getattr(model, "checkpoint_module", lambda n: n)
    for name, module in model.named_modules():
        if not hasattr(module, "run_experts"):
            continue
        if expert_kind is not None:
            prefix = rename(name)
            kinds = {f"{prefix}.{e}.{p}": bool(expert_kind(f"{prefix}.{e}.{p}"))
                     for e in range(module.num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
            if len(set(kinds.values())) > 1:
                yes = next(m for m, k in kinds.items() if k)
                no = next(m for m, k in kinds.items() if not k)
                raise ValueError(f"routed experts of {prefix}: {yes} is stored int8 (dynamic activations) but "
                                 f"{no} is not; the experts of one layer share one format")
            if not next(iter(kinds.values())):
                continue
        Int8Experts().create(module)
        names.append(name)
    return names


def is_routed_expert(module: str) -> bool:
    """Whether checkpoint module `module` is one routed expert's matrix."""
    return bool(_EXPERT.search(module))
