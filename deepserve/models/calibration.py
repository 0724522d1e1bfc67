"""Run a checkpoint's decoder layers one at a time over calibration samples, for GPTQ
(`deepserve convert quantize --algorithm gptq`, quant/quantize_int4.py).

The model is built on the meta device; only the embedding and the one decoder layer being
worked on ever get storage (fp32, on the conversion's device), so host memory holds one
layer's weights plus the calibration hidden states, whatever the model size. For layer i:

1. `capture(i, weights)` loads the layer's float checkpoint tensors and runs it over every
   sample, summing H = X^T X of each Linear's input (per checkpoint module: q/k/v share the
   fused qkv_proj's input) and keeping the routed experts' inputs with their routing;
2. `advance(i, weights)` loads the weights the layer will have in the output (the quantized
   ones dequantized) and runs it again: its outputs are the next layer's inputs, so each
   layer is calibrated on what the quantized model before it produces (GPTQ's sequential
   scheme).

Each sample is one sequence, run as a prefill with its own small paged KV cache.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.config import HFConfig
from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.linear import LinearBase
from deepserve.layers.quantization import checkpoint_names
from deepserve.models.loader import _materialize, process_weights_after_loading
from deepserve.models.registry import model_class

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_BLOCK = 16


@dataclass
class LayerStats:
    """What one layer's calibration forward saw."""
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)   # checkpoint module -> sum x x^T
    # experts prefix (checkpoint naming, e.g. "model.layers.3.mlp.experts") -> [(x [T, D], ids [T, k])]
    expert_inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def expert_rows(self, prefix: str, expert: int) -> torch.Tensor:
        """The inputs routed to `expert` of the experts at `prefix`, [n, D] (n may be 0)."""
        rows = [x[(ids == expert).any(-1)] for x, ids in self.expert_inputs.get(prefix, [])]
        return torch.cat(rows) if rows else torch.zeros(0, 0)


class _Capture:
    """A linear method that sums x^T x of the inputs, then computes x W^T as the default does."""

    def __init__(self, inner, hessian: torch.Tensor):
        self.inner, self.hessian = inner, hessian

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(x2.t(), x2)
        return F.linear(x, layer.weight, bias)


def _meta(seq_len: int, device: torch.device) -> AttentionMetadata:
    blocks = -(-seq_len // _BLOCK)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, seq_len], **i32), seq_lens=torch.tensor([seq_len], **i32),
        block_tables=torch.arange(blocks, **i32)[None], slot_mapping=torch.arange(seq_len, device=device),
        logits_indices=torch.tensor([seq_len - 1], device=device), max_query_len=seq_len, max_seq_len=seq_len)


class LayerRunner:
    """Decoder layers of the checkpoint whose config is `config`, one at a time, over `samples`
    (1-D token id tensors). `embed_weight` is the checkpoint's model.embed_tokens.weight."""

    def __init__(self, config: dict, embed_weight: torch.Tensor, samples: list[torch.Tensor],
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        cfg = HFConfig(config)
        with torch.device("meta"):
            self.model = model_class(cfg)(cfg, dtype=torch.float32)
        self.num_layers = int(cfg.num_hidden_layers)
        self.next_layer = 0
        embed = self.model.model.embed_tokens
        _materialize(embed, self.device)
        self.model.load_weights([("model.embed_tokens.weight", embed_weight.float())])
        with torch.no_grad():
            self.hidden = [embed(ids.to(self.device)) for ids in samples]    # [L, D] each
        embed.to_empty(device="meta")

    @staticmethod
    def check(config: dict) -> None:
        """Raise ValueError when `config`'s architecture has no model class to calibrate with, or it
        lacks a field the model reads."""
        model_class(HFConfig(config))

    def layer_index(self, tensor_name: str) -> Optional[int]:
        """The decoder layer a checkpoint tensor belongs to (None: outside the calibrated layers)."""
        m = _LAYER.match(tensor_name)
        return int(m[1]) if m and int(m[1]) < self.num_layers else None

    def _load(self, i: int, weights: dict[str, torch.Tensor]) -> nn.Module:
        layer = self.model.model.layers[i]
        if next(layer.parameters()).device.type == "meta":
            _materialize(layer, self.device)
        prefix = f"model.layers.{i}."
        self.model.load_weights((n, t.float()) for n, t in weights.items() if n.startswith(prefix))
        for m in layer.modules():
            if hasattr(m, "kv_cache_shapes"):
                m.kv_cache = [torch.zeros(-(-self._max_len() // _BLOCK), *s, device=self.device)
                              for s in m.kv_cache_shapes(_BLOCK)]
        return layer

    def _max_len(self) -> int:
        return max(h.shape[0] for h in self.hidden)

    def _run(self, layer: nn.Module) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for h in self.hidden:
                n = h.shape[0]
                x, residual = layer(torch.arange(n, device=self.device), h, None, _meta(n, self.device))
                out.append(x + residual)
        return out

    def capture(self, i: int, weights: dict[str, torch.Tensor]) -> LayerStats:
        """Layer i (the next one) with its float `weights` over the samples: inputs' statistics."""
        if i != self.next_layer:
            raise RuntimeError(f"layer {i} captured before layer {self.next_layer} was advanced")
        layer = self._load(i, weights)
        stats = LayerStats()
        prefix = f"model.layers.{i}."
        linears = [(prefix + n, m) for n, m in layer.named_modules() if isinstance(m, LinearBase)]
        for name, m in linears:
            h = torch.zeros(m.in_features, m.in_features, device=self.device)
            for module in checkpoint_names(self.model, name):
                stats.hessians[module] = h                  # one input: one Hessian for all
            m.quant_method = _Capture(m.quant_method, h)
        # decided with the capturing methods in place: no Linear counts as plain, so none is
        # fused into another op (MLA's q/kv_a pair, shared experts) and every input is seen
        process_weights_after_loading(layer)
        hooks = []
        for name, m in layer.named_modules():
            if hasattr(m, "run_experts"):
                inputs = stats.expert_inputs.setdefault(prefix + name, [])
                hooks.append(m.register_forward_pre_hook(
                    lambda _m, args, inputs=inputs: inputs.append((args[0].float(), args[2]))))
        try:
            self._run(layer)
        finally:
            for h in hooks:
                h.remove()
            for _, m in linears:
                m.quant_method = m.quant_method.inner
        return stats

    def advance(self, i: int, weights: dict[str, torch.Tensor]) -> None:
        """Layer i with the weights it has in the output: its outputs become the next inputs."""
        if i != self.next_layer:
            raise RuntimeError(f"layer {i} advanced out of order (next is {self.next_layer})")
        layer = self._load(i, weights)
        process_weights_after_loading(layer)
        self.hidden = self._run(layer)
        for m in layer.modules():
            if hasattr(m, "kv_cache_shapes"):
                m.kv_cache = []
        layer.to_empty(device="meta")
        self.next_layer = i + 1
