"""MoE building blocks: the fp32 router gate and the stacked routed experts.

`MoEGate` holds `gate.weight` [E, D] (and `e_score_correction_bias` [E] for noaux_tc) in fp32,
because routing picks among near-equal scores and bf16 logits would change the choice.

`FusedMoE` keeps every expert's weights stacked in one parameter each, w13 [E, 2I, D] (gate
rows then up rows) and w2 [E, D, I], filled from the per-expert checkpoint tensors
(`experts.{e}.gate_proj/up_proj/down_proj.weight`) through `weight_loader(param, t, (e, w))`.
The compute is `ops.fused_moe` over tokens sorted by expert (DESIGN invariant 4).

FP8 experts (`use_fp8`, DeepSeek-V3/R1's checkpoint format; DESIGN invariant 9): w13/w2 are
float8 e4m3 with one fp32 `scale_inv` per 128x128 block of each expert's matrix,
w13_weight_scale_inv [E, 2I/128, ceil(D/128)] (gate blocks then up blocks) and
w2_weight_scale_inv [E, ceil(D/128), I/128], the layout the fp8 fused-MoE kernels read. They
stay fp8 in memory; the torch op dequantizes one expert at a time per call. A rank's slice of
I must fall on the 128-block grid, so gate and up blocks stack and TP shards keep whole blocks.
A float checkpoint tensor (BF16 folder with `--quantization fp8`, random weights) is quantized
here with the converter's rule (quant/fp8.py) before slicing. compressed-tensors FP8 "channel"
experts keep one scale a row instead, w13_weight_scale_inv [E, 2I, 1] / w2_weight_scale_inv
[E, D, 1] (vLLM's per-channel fused MoE): any slice of I, no padding; with the checkpoint's
static activation scales (`use_fp8(static_input=True)`) each GEMM's input is quantized with the
largest of the layer's experts' scales; without activation quantization (`use_fp8(weight_only=True)`,
a compressed-tensors FP8 scheme with no input_activations) the activations stay in the model
dtype (W8A16), as the checkpoint's dense layers run.

Parallelism (DESIGN invariant 5): with expert parallelism (ep_size > 1) a rank holds the
E/ep_size experts `[ep_rank * E_local, ...)` whole, tokens routed elsewhere contribute zero
here, and the partial sums are all-reduced over the EP group. Without EP, every rank holds
all experts with the intermediate dim sliced by tp_rank and the sums are all-reduced over TP.

Data-parallel attention with EP (pctx.moe_dp_exchange): each DP rank brings its own tokens,
routed by its own gate, and the layer exchanges them with the ranks holding their experts
(`--all2all-backend`: all-gather + reduce-scatter, or all-to-all; layers/moe_exchange.py).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.distributed.parallel_state import ParallelContext, divide, single_process
from deepserve.layers import moe_exchange
from deepserve.quant.fp8 import FP8_DTYPE, FP8_MAX, checked_scale_inv, quant_fp8_block, valid_scales

# checkpoint projection name -> (stacked parameter, which part of it)
EXPERT_SHARDS = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"),
                 "down_proj": ("w2_weight", "w2")}
FP8_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"
DUMMY_INPUT_AMAX = 16.0     # --load-format dummy's static activation range (fp8 with input scales)

logger = logging.getLogger(__name__)


class MoEGate(nn.Module):
    """Router logits in fp32: x [T, D] -> [T, E]."""

    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, hidden_size: int, num_experts: int, with_correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        if with_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight)      # fp32 weight: fp32 logits


class UnquantizedExperts:
    """16-bit experts: `ops.fused_moe` over the stacked w13 / w2."""

    def apply(self, moe: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, **shared) -> torch.Tensor:
        """`shared`: the shared-expert weights ops.fused_moe adds (FusedMoE.forward)."""
        return moe.ops.fused_moe(x, moe.w13_weight, moe.w2_weight, topk_weights, topk_ids, **shared)


class Fp8Experts:
    """e4m3 experts with per-128x128-block scales (`FusedMoE.use_fp8`); with `static_input`,
    activations quantised with the checkpoint's static input scales (the layer's largest); with
    `weight_only`, not quantised at all (W8A16)."""

    def __init__(self, static_input: bool = False, per_channel: bool = False, weight_only: bool = False):
        self.static_input = static_input
        self.per_channel = per_channel      # one scale a row (compressed-tensors 'channel')
        self.weight_only = weight_only

    def apply(self, moe: "FusedMoE", x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, **shared) -> torch.Tensor:
        """`shared`: the shared-expert weights (e4m3, with scales) ops.fused_moe adds."""
        static = dict(a13_scale=moe.a13_scale, a2_scale=moe.a2_scale) if self.static_input else {}
        if self.per_channel:
            static["per_channel_weights"] = True
        if self.weight_only:
            static["weight_only"] = True
        return moe.ops.fused_moe(x, moe.w13_weight, moe.w2_weight, topk_weights, topk_ids,
                                 w13_scale=moe.w13_weight_scale_inv, w2_scale=moe.w2_weight_scale_inv,
                                 **static, **shared)

    def init_dummy(self, moe: "FusedMoE", gen: torch.Generator, std: float) -> None:
        """Random weights' static input scales: activations up to DUMMY_INPUT_AMAX unclipped
        (the weights themselves come from init_dummy_weights)."""
        if self.static_input:
            for p in (moe.w13_input_scale, moe.w2_input_scale):
                p.data.fill_(DUMMY_INPUT_AMAX / FP8_MAX)


class FusedMoE(nn.Module):
    """Routed SwiGLU experts with stacked weights: (x [T, D], weights [T, k], ids [T, k]) -> [T, D]."""

    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None,
                 reduce_results: bool = True):
        super().__init__()
        self.pctx = pctx or single_process()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.reduce_results = reduce_results
        self.use_ep = self.pctx.ep_size > 1
        if self.use_ep:
            self.num_local_experts = divide(num_experts, self.pctx.ep_size, "n_routed_experts")
            self.first_expert = self.pctx.ep_rank * self.num_local_experts
            self.local_intermediate = intermediate_size
            self.inter_start = 0
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.local_intermediate = divide(intermediate_size, self.pctx.tp_size, "moe_intermediate_size")
            self.inter_start = self.pctx.tp_rank * self.local_intermediate
        self.stored_intermediate = self.local_intermediate    # padded up for fp8 (use_fp8)
        # the method that owns the experts' storage format and runs them: 16-bit here, swapped
        # for Fp8Experts (use_fp8), Int4Experts (layers/moe_int4.py) or Int8Experts
        # (layers/moe_int8.py) before loading
        self.quant = UnquantizedExperts()
        self.fp8 = False
        e, i = self.num_local_experts, self.local_intermediate
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=params_dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=params_dtype),
                                      requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader

    def use_fp8(self, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK), static_input: bool = False,
                weight_only: bool = False) -> None:
        """Store the experts as e4m3 + per-block fp32 scales (on the weights' device), before
        loading; `static_input`: with the checkpoint's static activation scales, one a matrix
        (`experts.{e}.{gate,up,down}_proj.input_scale`), kept for every expert of the layer (a
        few floats) so that each EP rank quantises with the layer's largest, as one rank does;
        `weight_only`: the activations stay unquantised (W8A16)."""
        if static_input and weight_only:
            raise ValueError("fp8 experts: static activation scales and weight-only are exclusive")
        per_channel = tuple(block) == (1, FP8_BLOCK)
        if tuple(block) != (FP8_BLOCK, FP8_BLOCK) and not per_channel:
            raise ValueError(f"fp8 experts need {FP8_BLOCK}x{FP8_BLOCK} scale blocks (the fused-MoE "
                             f"kernels' grid) or one scale a row (1x{FP8_BLOCK}: compressed-tensors FP8 "
                             f"'channel'), got {block[0]}x{block[1]} (weight_block_size)")
        e, i, d = self.num_local_experts, self.local_intermediate, self.hidden_size
        if per_channel:
            pass        # one scale a row: any slice of I, no padding
        elif i % FP8_BLOCK and self.inter_start == 0 and i == self.intermediate_size:
            # whole experts on this rank: pad I with zero rows/columns to the block grid, so the
            # up rows' scales start on a block of their own (silu(0) * 0 adds nothing)
            i = -(-i // FP8_BLOCK) * FP8_BLOCK
        elif i % FP8_BLOCK:
            raise ValueError(f"fp8 experts: moe_intermediate_size {self.intermediate_size} gives {i} rows "
                             f"per rank, not a multiple of the {FP8_BLOCK}-row scale block; use a "
                             f"tensor-parallel size that keeps whole blocks, or expert parallel")
        self.stored_intermediate = i
        device = self.w13_weight.device
        kb_d, kb_i = -(-d // FP8_BLOCK), i // FP8_BLOCK

        def param(*shape, dtype):
            p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
            p.weight_loader = self.weight_loader
            return p

        del self.w13_weight, self.w2_weight
        self.w13_weight = param(e, 2 * i, d, dtype=FP8_DTYPE)
        self.w2_weight = param(e, d, i, dtype=FP8_DTYPE)
        if per_channel:     # [E, N, 1]: one scale a row of each expert matrix
            self.w13_weight_scale_inv = param(e, 2 * i, 1, dtype=torch.float32)
            self.w2_weight_scale_inv = param(e, d, 1, dtype=torch.float32)
        else:
            self.w13_weight_scale_inv = param(e, 2 * kb_i, kb_d, dtype=torch.float32)
            self.w2_weight_scale_inv = param(e, kb_d, kb_i, dtype=torch.float32)
        for p in (self.w13_weight, self.w2_weight):
            p.quantize_on_load = True     # takes float tensors too (init_dummy_weights, --quantization)
        if static_input:    # [E, 2]: gate, up of each expert; [E, 1]: down
            self.w13_input_scale = param(self.num_experts, 2, dtype=torch.float32)
            self.w2_input_scale = param(self.num_experts, 1, dtype=torch.float32)
        self.quant, self.fp8 = Fp8Experts(static_input, per_channel, weight_only), True

    def dummy_shards(self):
        """Per-expert checkpoint tensors, for this rank's experts only (others would be skipped)."""
        full_i, d = self.intermediate_size, self.hidden_size
        for expert in range(self.first_expert, self.first_expert + self.num_local_experts):
            yield self.w13_weight, (expert, "w1"), (full_i, d)
            yield self.w13_weight, (expert, "w3"), (full_i, d)
            yield self.w2_weight, (expert, "w2"), (d, full_i)

    def local_index(self, expert: int, name: str) -> Optional[int]:
        """This rank's index of global `expert` (checked against n_routed_experts for tensor
        `name`), or None when another EP rank holds it."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"tensor {name}: expert {expert} outside [0, {self.num_experts}) (n_routed_experts)")
        local = expert - self.first_expert
        return local if 0 <= local < self.num_local_experts else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """Copy one checkpoint expert tensor (a weight, or with fp8 experts its block scale_inv)
        into the stack. shard_id = (global expert, "w1"|"w3"|"w2"); experts another EP rank holds
        are skipped on purpose."""
        expert, part = shard_id
        name = getattr(param, "param_name", "?")
        if param is getattr(self, "w13_input_scale", None) or param is getattr(self, "w2_input_scale", None):
            self._load_input_scale(param, loaded, expert, part)
            return
        local = self.local_index(expert, name)
        if local is None:
            return
        full_i, d = self.intermediate_size, self.hidden_size
        expected = (d, full_i) if part == "w2" else (full_i, d)
        is_scale = param is getattr(self, "w13_weight_scale_inv", None) or \
            param is getattr(self, "w2_weight_scale_inv", None)
        if is_scale:
            self._load_scale(param, loaded, local, expert, part, expected)
            return
        if self.fp8 and loaded.dtype != FP8_DTYPE:
            if tuple(loaded.shape) != expected or not loaded.is_floating_point():
                raise ValueError(f"tensor {name} expert {expert} {part}: checkpoint {loaded.dtype} "
                                 f"{tuple(loaded.shape)} does not fit the model's fp8 {expected}")
            row_block = (1, loaded.shape[1]) if self.quant.per_channel else (FP8_BLOCK, FP8_BLOCK)
            q, scale = quant_fp8_block(loaded.to(param.device), row_block)    # the whole tensor, then shard
            self.weight_loader(param, q, shard_id)
            target = self.w2_weight_scale_inv if part == "w2" else self.w13_weight_scale_inv
            self._load_scale(target, scale, local, expert, part, expected)
            return
        if loaded.dtype == FP8_DTYPE and not self.fp8:
            raise ValueError(f"tensor {name} expert {expert} {part}: an fp8 checkpoint tensor for "
                             f"{param.dtype} experts (it should have been dequantized)")
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {name} expert {expert} {part}: checkpoint "
                             f"shape {tuple(loaded.shape)} does not match the model's {expected}")
        i, start, stored = self.local_intermediate, self.inter_start, self.stored_intermediate
        if part == "w2":
            dst = param.data[local]                                       # [D, stored]
            dst.narrow(1, 0, i).copy_(loaded.narrow(1, start, i))
            dst.narrow(1, i, stored - i).zero_()
        else:
            dst = param.data[local].narrow(0, 0 if part == "w1" else stored, stored)   # [stored, D]
            dst.narrow(0, 0, i).copy_(loaded.narrow(0, start, i))
            dst.narrow(0, i, stored - i).zero_()

    def _load_input_scale(self, param: nn.Parameter, loaded: torch.Tensor, expert: int, part: str) -> None:
        """One expert matrix's static activation scale (one value), for any expert of the layer."""
        name = getattr(param, "param_name", "?")
        self.local_index(expert, name)          # checks the expert's range
        if loaded.numel() != 1:
            raise ValueError(f"tensor {name} expert {expert} {part}: a static input_scale holds one value, "
                             f"got shape {tuple(loaded.shape)}")
        value = loaded.reshape(1).to(param.device, torch.float32)
        if not valid_scales(value):
            raise ValueError(f"tensor {name} expert {expert} {part}: input_scale must be finite and > 0, "
                             f"got {value.item()}")
        param.data[expert, 1 if part == "w3" else 0] = value[0]

    def process_weights_after_loading(self) -> None:
        """Static activation scales: each GEMM's input quantised with the largest of the layer's
        experts' (vLLM's rule: one scale for the grouped GEMM; no expert's activations clip
        more than its calibration allowed)."""
        if not getattr(self.quant, "static_input", False):
            return
        self.a13_scale = self.w13_input_scale.amax().reshape(1)
        self.a2_scale = self.w2_input_scale.amax().reshape(1)
        if self.w13_input_scale.device.type != "meta" and not (
                bool((self.w13_input_scale == self.a13_scale).all()) and bool((self.w2_input_scale == self.a2_scale).all())):
            logger.warning("fp8 routed experts: the experts' static input scales differ; each GEMM takes the "
                           "layer's largest (as vLLM does)")

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, local: int, expert: int, part: str,
                    weight_shape: tuple[int, int]) -> None:
        """One expert's block scales [ceil(N/128), ceil(K/128)] -> this rank's blocks of the stack."""
        name = getattr(param, "param_name", "?")
        if self.quant.per_channel:
            self._load_row_scale(param, loaded, local, expert, part, weight_shape)
            return
        grid = tuple(-(-n // FP8_BLOCK) for n in weight_shape)
        if tuple(loaded.shape) != grid:
            raise ValueError(f"tensor {name} expert {expert} {part}: scale shape {tuple(loaded.shape)} does "
                             f"not match a {weight_shape[0]}x{weight_shape[1]} weight in {FP8_BLOCK}x"
                             f"{FP8_BLOCK} blocks {grid}")
        loaded = checked_scale_inv(loaded, param.device, f"tensor {name} expert {expert} {part}")
        # this rank's blocks of I (whole blocks: use_fp8 checked or padded)
        kb, kb_start = -(-self.local_intermediate // FP8_BLOCK), self.inter_start // FP8_BLOCK
        if part == "w2":
            param.data[local].copy_(loaded.narrow(1, kb_start, kb))
        else:
            offset = 0 if part == "w1" else self.stored_intermediate // FP8_BLOCK
            param.data[local].narrow(0, offset, kb).copy_(loaded.narrow(0, kb_start, kb))
        param.filled = True

    def _load_row_scale(self, param: nn.Parameter, loaded: torch.Tensor, local: int, expert: int, part: str,
                        weight_shape: tuple[int, int]) -> None:
        """One expert's per-row scales ([N, 1], or row-expanded [N, ceil(K/128)] alike along the
        row) -> this rank's rows of the [E, N, 1] stack."""
        name = getattr(param, "param_name", "?")
        n, k = weight_shape
        if loaded.dim() != 2 or loaded.shape[0] != n or loaded.shape[1] not in (1, -(-k // FP8_BLOCK)):
            raise ValueError(f"tensor {name} expert {expert} {part}: scale shape {tuple(loaded.shape)} does not "
                             f"match a {n}x{k} weight with one scale a row ({n}, 1)")
        loaded = checked_scale_inv(loaded, param.device, f"tensor {name} expert {expert} {part}")
        if not bool((loaded == loaded[:, :1]).all()):
            raise ValueError(f"tensor {name} expert {expert} {part}: 1x{FP8_BLOCK} scales that differ along a "
                             f"row; fp8 experts take one scale a row or {FP8_BLOCK}x{FP8_BLOCK} blocks")
        rows = loaded[:, :1]
        i, start = self.local_intermediate, self.inter_start
        if part == "w2":
            param.data[local].copy_(rows)
        else:
            param.data[local].narrow(0, 0 if part == "w1" else self.stored_intermediate, i).copy_(rows.narrow(0, start, i))
        param.filled = True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                dp_num_tokens: Optional[list[int]] = None, *, shared_w13: Optional[torch.Tensor] = None,
                shared_w2: Optional[torch.Tensor] = None, shared_w13_scale: Optional[torch.Tensor] = None,
                shared_w2_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`dp_num_tokens`: tokens of each DP rank this step (needed with DP attention + EP).
        `shared_w13` [2*Is, D] / `shared_w2` [D, Is]: shared experts computed in the same op and
        added to every token (one process only: a reduced sum would count them once per rank);
        e4m3 with their row-expanded block scales beside fp8 experts (ops.fused_moe)."""
        if shared_w13 is not None or shared_w2 is not None:
            if self.pctx.tp_size != 1 or self.pctx.ep_size != 1:
                raise ValueError(f"shared experts fold into the routed experts only with tp_size 1 and "
                                 f"ep_size 1, got tp_size {self.pctx.tp_size}, ep_size {self.pctx.ep_size}")
            if not isinstance(self.quant, (UnquantizedExperts, Fp8Experts)):
                raise ValueError(f"shared experts fold into 16-bit or fp8 routed experts, not "
                                 f"{type(self.quant).__name__}")
            return self.quant.apply(self, x, topk_weights, topk_ids, shared_w13=shared_w13, shared_w2=shared_w2,
                                    shared_w13_scale=shared_w13_scale, shared_w2_scale=shared_w2_scale)
        if self.use_ep and self.pctx.moe_dp_exchange:
            return self._dp_exchange(x, topk_weights, topk_ids, dp_num_tokens)
        if self.use_ep:
            # global ids -> this rank's local ids; others fall outside [0, E_local) and add zero
            topk_ids = topk_ids - self.first_expert
        out = self.run_experts(x, topk_weights, topk_ids)
        if not self.reduce_results:
            return out
        return self.pctx.ep_all_reduce(out) if self.use_ep else self.pctx.tp_all_reduce(out)

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on x (ids local to the rank), run by the method that owns the weights."""
        return self.quant.apply(self, x, topk_weights, topk_ids)

    def _dp_exchange(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     dp_num_tokens: Optional[list[int]]) -> torch.Tensor:
        """Experts over the tokens of every DP rank (layers/moe_exchange.py); returns this
        rank's rows [T, D], reduced."""
        p = self.pctx

        def local_experts(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return self.run_experts(h, w, ids - self.first_expert)

        if p.all2all_backend == "alltoall":
            return moe_exchange.alltoall(p, x, topk_weights, topk_ids, self.num_local_experts, local_experts)
        if dp_num_tokens is None:
            raise ValueError("data-parallel attention with expert parallel needs dp_num_tokens "
                             "(the token count of every DP rank this step)")
        if len(dp_num_tokens) != p.dp_size or dp_num_tokens[p.dp_rank] != x.shape[0]:
            raise ValueError(f"dp_num_tokens {dp_num_tokens} does not match DP rank {p.dp_rank} "
                             f"of {p.dp_size} with {x.shape[0]} tokens")
        return moe_exchange.allgather_reducescatter(p, x, topk_weights, topk_ids, dp_num_tokens, local_experts)
