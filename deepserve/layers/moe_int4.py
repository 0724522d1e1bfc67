"""4-bit routed experts (W4A16): a FusedMoE's stacked expert weights kept packed, as the
checkpoint's AWQ / GPTQ / compressed-tensors experts come (layout: ops/moe_int4.py).

`Int4Experts(spec).create(moe)` replaces the FusedMoE's 16-bit w13_weight / w2_weight with
`w13_<name>` / `w2_<name>` parameters named after the checkpoint's tensors (`w13_qweight`,
`w13_scales`, `w13_qzeros` for AWQ / GPTQ; `w13_weight_packed`, `w13_weight_scale`,
`w13_weight_zero_point` for compressed-tensors), filled through the model's per-expert
loading with shard id (expert, "w1" | "w3" | "w2"): each checkpoint tensor is converted to
the in-memory layout (quant/int4.py), then this rank's part kept, as FusedMoE does for 16-bit
experts: whole experts under EP; without EP the rank's slice of I (gate / up rows, down's
input columns with their groups, which needs the slice to be whole groups; channel scales of
down are kept whole). With activation reordering (GPTQ desc_act) each expert also keeps its
g_idx (`w13_<g_idx name>` [E, D], shared by gate and up, which must agree; `w2_...` [E, I], this
rank's slice of I) and down keeps every group's scales, as the 4-bit Linear does. The experts
then run `ops.fused_moe_int4` (FusedMoE.run_experts); W4A8 experts (int8 per-token
activations) with `act_int8`, the weights packed as for W4A16.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch
from torch import nn

from deepserve.layers.quantization import experts_quantized
from deepserve.ops.int4 import PACK
from deepserve.quant.int4 import Int4Spec, scales_to_memory, weight_to_memory, zeros_to_memory


def no_dummy_shards():
    return iter(())


@torch.no_grad()
def fill_dummy_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    gen: torch.Generator, std: float) -> None:
    """Random 4-bit weights of standard deviation about `std`: uniform nibbles around z = 8 (std
    4.6), one scale std / 4.6 everywhere (random weights for speed tests, `--load-format dummy`)."""
    if qweight.device.type == "meta":
        return
    bits = torch.randint(-2 ** 31, 2 ** 31, qweight.shape, generator=gen, dtype=torch.int64)
    qweight.copy_(bits.to(torch.int32).to(qweight.device))
    scales.fill_(std / 4.6)
    if zeros is not None:
        zeros.fill_(8)


def int4_experts_supported(spec: Optional[Int4Spec]) -> bool:
    """Whether a checkpoint's 4-bit experts stay 4-bit (all W4A16 and W4A8 ones)."""
    return spec is not None


class Int4Experts:
    """The routed-expert method of a FusedMoE holding 4-bit experts."""

    def __init__(self, spec: Int4Spec):
        self.spec = spec

    def create(self, moe: nn.Module) -> None:
        spec = self.spec
        e, i, d, full_i = moe.num_local_experts, moe.local_intermediate, moe.hidden_size, moe.intermediate_size
        g13 = d if spec.group_size == -1 else spec.group_size
        g2 = full_i if spec.group_size == -1 else spec.group_size
        where = f"{spec.method} experts ({full_i} x {d})"
        if d % g13 or full_i % g2:
            raise ValueError(f"{where}: group size {spec.group_size} does not divide the input features "
                             f"{d} (gate/up) and {full_i} (down)")
        # this rank's I slice cuts down's groups (with g_idx every rank keeps all of them)
        split = i != full_i and g2 != full_i and not spec.act_order
        if i % PACK or moe.inter_start % PACK or (split and (i % g2 or moe.inter_start % g2)):
            raise ValueError(f"{where}: {i} intermediate features per rank are not a whole number of "
                             f"{max(PACK, g2 if split else PACK)}-wide groups; use a tensor-parallel size "
                             f"that keeps them whole, or expert parallel")
        self.groups = (g13, i if g2 == full_i and not spec.act_order else g2)    # group widths on this rank
        self.split = split
        device = moe.w13_weight.device
        del moe.w13_weight, moe.w2_weight
        zeros = "qzeros" in spec.required()
        for which, rows, k in (("w13", 2 * i, d), ("w2", d, i)):
            n_groups = k // self.groups[0 if which == "w13" else 1]
            if which == "w2" and spec.act_order:
                n_groups = full_i // g2
            shapes = {"qweight": ((e, rows, k // PACK), torch.int32), "scales": ((e, rows, n_groups), spec.scale_dtype)}
            if zeros:
                shapes["qzeros"] = ((e, rows, n_groups), torch.uint8)
            if spec.act_order:
                shapes["g_idx"] = ((e, k), torch.int32)
            for role, (shape, dtype) in shapes.items():
                p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
                p.weight_loader = functools.partial(self.load, moe, role)
                setattr(moe, f"{which}_{spec.names[role]}", p)
        moe.quant = self
        moe.dummy_shards = no_dummy_shards     # no 16-bit expert tensors to draw: init_dummy fills them

    def init_dummy(self, moe: nn.Module, gen: torch.Generator, std: float) -> None:
        for which in ("w13", "w2"):
            fill_dummy_int4(*(self.param(moe, which, r) for r in ("qweight", "scales", "qzeros")), gen, std)

    def param(self, moe: nn.Module, which: str, role: str) -> Optional[nn.Parameter]:
        name = self.spec.names.get(role)
        return getattr(moe, f"{which}_{name}", None) if name else None

    def load(self, moe: nn.Module, role: str, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """One expert's checkpoint tensor -> this rank's part of the stack."""
        expert, part = shard_id
        name = getattr(param, "param_name", "?")
        local = moe.local_index(expert, name)
        if local is None:
            return
        spec, d, full_i = self.spec, moe.hidden_size, moe.intermediate_size
        n, k = (d, full_i) if part == "w2" else (full_i, d)
        g = k if spec.group_size == -1 else spec.group_size
        where = f"{name} expert {expert} {part}"
        loaded = loaded.to(param.device)
        i, start = moe.local_intermediate, moe.inter_start
        if role == "g_idx":
            self._load_g_idx(param, loaded, local, part, k, k // g, start, where)
            return
        if role == "qweight":
            t = weight_to_memory(spec, loaded, n, k, where)
        elif role == "scales":
            t = scales_to_memory(spec, loaded, n, k // g, where)
        else:
            t = zeros_to_memory(spec, loaded, n, k // g, where)
        if part == "w2":                                  # this rank's input columns of down
            if role == "qweight":
                t = t.narrow(1, start // PACK, i // PACK)
            elif self.split:
                t = t.narrow(1, start // g, i // g)
            param.data[local].copy_(t)
        else:                                             # gate rows, then up rows
            param.data[local].narrow(0, 0 if part == "w1" else i, i).copy_(t.narrow(0, start, i))

    def _load_g_idx(self, param: nn.Parameter, loaded: torch.Tensor, local: int, part: str, k: int, groups: int,
                    start: int, where: str) -> None:
        """One expert's g_idx [K]: gate's and up's must be the same (one GEMM reads both); down's
        is cut to this rank's slice of I."""
        if tuple(loaded.shape) != (k,) or loaded.is_floating_point():
            raise ValueError(f"tensor {where}: g_idx {loaded.dtype} {tuple(loaded.shape)} does not match the "
                             f"{k} input features")
        if int(loaded.min()) < 0 or int(loaded.max()) >= groups:
            raise ValueError(f"tensor {where}: g_idx values must lie in [0, {groups}), got "
                             f"[{int(loaded.min())}, {int(loaded.max())}]")
        loaded = loaded.to(torch.int32)
        dst = param.data[local]
        if part == "w2":
            dst.copy_(loaded.narrow(0, start, dst.shape[0]))
            return
        seen = getattr(param, "seen", set())
        if local in seen and not torch.equal(dst, loaded):
            raise ValueError(f"tensor {where}: gate_proj and up_proj of one expert have different g_idx")
        dst.copy_(loaded)
        param.seen = seen | {local}

    def apply(self, moe: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        w13 = [self.param(moe, "w13", r) for r in ("qweight", "scales", "qzeros")]
        w2 = [self.param(moe, "w2", r) for r in ("qweight", "scales", "qzeros")]
        return moe.ops.fused_moe_int4(x, *w13, *w2, topk_weights, topk_ids, self.groups,
                                      self.param(moe, "w13", "g_idx"), self.param(moe, "w2", "g_idx"),
                                      act_int8=self.spec.activations == "int8-token")


_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


def int4_expert_module(spec: Int4Spec, module: str) -> bool:
    """Whether checkpoint module `module` is a routed expert's matrix served 4-bit."""
    return int4_experts_supported(spec) and bool(_EXPERT.search(module)) and not spec.skipped(module)


def quantize_int4_experts(model: nn.Module, spec: Int4Spec) -> list[str]:
    """Give every FusedMoE whose experts the checkpoint stores 4-bit the Int4Experts method."""
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "run_experts") and experts_quantized(model, name, module,
                                                                functools.partial(int4_expert_module, spec)):
            try:
                Int4Experts(spec).create(module)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            names.append(name)
    return names
