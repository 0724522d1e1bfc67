"""Kernel launches per engine step, counted on the CPU, split by layer and module.

The host's cost of an eager step is one Python op dispatch + launch per kernel (~10-30 µs on a
GPU host), so on a step whose GPU work is short the launch count is the time. This counts, on a
tiny DeepSeek-V2-Lite-shaped model (MLA with q_lora_rank null, MoE with shared experts after one
dense layer) run by the `--ops` backend's kernels (Triton ones interpreted, TRITON_INTERPRET=1):

  aten ops that launch device work, seen at torch's dispatch (after autograd and the composite
          ops' decomposition, so `F.linear` counts as its `mm`, the way the GPU runs it), except
          the ops in NO_LAUNCH: views and metadata (view, reshape, slice, expand, t, ...) and
          allocations (empty, empty_like, ...: no kernel, though each costs a dispatch);
  Triton launches `kernel[grid](...)`, each one launch; the aten ops the interpreter runs
          inside a launch are not counted.

Each launch is charged to the innermost labelled module running it (LABELS: the input and post
norms, MLA's project / attend / o_proj, the MoE's router / experts / shared MLP, "moe.sum" for
the MoE's own adds) and, inside the triton backend's routed experts' op, split by launch
(EXPERT_PARTS: the expert sort "moe.align", the grouped GEMMs, the weighted slot sum, the
shared MLP that runs inside the op with 16-bit weights). Two steps: a mixed one
(--decodes one-token sequences plus a --chunk-token prompt chunk with --context tokens
already cached) and a prefill-only one (--prompts prompts of --prompt-len tokens).

CPU (the default, seconds):  python benchmarks/launch_count.py
GPU timing of the same steps at V2-Lite's size (what the counts predict):
    python benchmarks/profile_mixed.py --model deepseek-v2-lite --batch 64 --mixed-lens 1024 --profile 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections import Counter, defaultdict
from typing import Callable, Iterator, Optional

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates any kernel

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that launch no kernel: views and metadata, allocations, host-side queries
NO_LAUNCH = frozenset((
    "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "split", "split_with_sizes", "chunk",
    "unbind", "slice", "select", "narrow", "expand", "expand_as", "as_strided", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "flatten", "unflatten", "detach", "alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "is_same_size", "sym_size", "sym_stride", "sym_numel",
    "promote_types", "result_type", "can_cast"))
# the launches of the triton backend's fused_moe op by part: the expert sort, the weighted slot
# sum and, with the shared experts passed into the op, their MLP (cuBLAS GEMMs around the SiLU)
# and its add; anything else inside the op is "moe.experts"
EXPERT_PARTS = {"triton._count_kernel": "moe.align", "triton._scatter_kernel": "moe.align",
                "triton._sum_slots_kernel": "moe.sum", "aten.add": "moe.sum", "aten.mm": "moe.shared",
                "triton._silu_and_mul_kernel": "moe.shared"}
# module attribute path inside a decoder layer -> label (methods of MLA labelled separately)
LABELS = {"input_layernorm": "norm", "post_attention_layernorm": "norm", "self_attn.o_proj": "attn.o_proj",
          "mlp.gate": "moe.router", "mlp.experts": "moe.experts", "mlp.shared_experts": "moe.shared"}
MODULE_ORDER = ("norm", "attn.project", "attn.attend", "attn.o_proj", "moe.router", "moe.align", "moe.experts",
                "moe.shared", "moe.sum", "mlp", "other")


def op_name(func) -> str:
    """aten.mm.default -> "mm"."""
    return func.overloadpacket.__name__


class LaunchCounter(TorchDispatchMode):
    """Counts launches into `counts[(layer, label, name)]` while active (`with counter.active():`).
    `layer` and `label` follow `scope()`; `syncs` counts host reads of device values (.item())."""

    def __init__(self, expert_parts: Optional[dict] = None):
        """`expert_parts`: launch name -> label for the launches inside "moe.experts" (EXPERT_PARTS
        for the triton backend's op)."""
        super().__init__()
        self.expert_parts = expert_parts or {}
        self.counts: Counter = Counter()
        self.syncs = 0
        self.stack: list[tuple[Optional[int], str]] = [(None, "other")]
        self._in_triton = 0

    @contextlib.contextmanager
    def scope(self, layer: Optional[int], label: str) -> Iterator[None]:
        outer_layer = self.stack[-1][0]
        self.stack.append((outer_layer if layer is None else layer, label))
        try:
            yield
        finally:
            self.stack.pop()

    def _count(self, name: str) -> None:
        layer, where = self.stack[-1]
        if where == "moe.experts":
            where = self.expert_parts.get(name, where)
        self.counts[(layer, where, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if not self._in_triton:
            if name == "_local_scalar_dense":
                self.syncs += 1
            elif name not in NO_LAUNCH:
                self._count("aten." + name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def active(self) -> Iterator["LaunchCounter"]:
        """Count inside the block: aten ops through this dispatch mode, Triton launches through
        KernelInterface.__getitem__ (the interpreter's InterpretedFunction and JITFunction alike)."""
        from triton.runtime.jit import KernelInterface

        from deepserve.ops.profile import kernel_name
        original = KernelInterface.__getitem__
        counter = self

        def counted_getitem(kernel, grid):
            launch = original(kernel, grid)
            name = kernel_name(kernel) or type(kernel).__name__

            def run(*args, **kwargs):
                counter._count("triton." + name)
                counter._in_triton += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    counter._in_triton -= 1
            return run

        KernelInterface.__getitem__ = counted_getitem
        try:
            with self:
                yield self
        finally:
            KernelInterface.__getitem__ = original


def _wrap(counter: LaunchCounter, obj, attr: str, layer: Optional[int], label: str) -> None:
    """Run `obj.attr` (a module's forward or a method) inside counter.scope(layer, label)."""
    inner: Callable = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with counter.scope(layer, label):
            return inner(*args, **kwargs)
    setattr(obj, attr, wrapped)


def label_model(model, counter: LaunchCounter) -> None:
    """Give every decoder layer's modules their labels (instance attributes over the methods)."""
    for i, layer in enumerate(model.model.layers):
        _wrap(counter, layer, "forward", i, "moe.sum" if layer.is_moe else "mlp")
        _wrap(counter, layer.self_attn, "project", None, "attn.project")
        _wrap(counter, layer.self_attn, "attend", None, "attn.attend")
        if layer.is_moe:
            _wrap(counter, layer.mlp, "forward", None, "moe.sum")
            # the router op runs in DeepseekMoE.forward itself: label it through the table
            ops = layer.mlp.ops
            if not getattr(ops, "_launch_count_labelled", False):
                _wrap(counter, ops, "moe_route", None, "moe.router")
                ops._launch_count_labelled = True
        for path, label in LABELS.items():
            module = layer
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:
                _wrap(counter, module, "forward", None, label)


# ----------------------------------------------------------------------------- the tiny model
def tiny_v2_lite_config(layers: int) -> dict:
    """DeepSeek-V2-Lite's structure at toy size: q_proj without a low-rank pair, softmax greedy
    routing, two shared experts, the first layer dense; head dims large enough that the Triton
    attention runs its MLA tiles."""
    return dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=256,
                hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, n_group=1, topk_group=1,
                routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def build_model(layers: int, ops: str, dtype: torch.dtype, kv_dtype: torch.dtype, num_blocks: int, block_size: int):
    from deepserve.config import HFConfig
    from deepserve.models.deepseek_v3 import DeepseekV3ForCausalLM
    from deepserve.models.loader import process_weights_after_loading
    from deepserve.models.weights import init_dummy_weights
    from deepserve.ops import OpTable, bind

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(HFConfig(tiny_v2_lite_config(layers)), dtype)
    init_dummy_weights(model, std=0.1)
    process_weights_after_loading(model)
    bind(model, OpTable(ops))
    for module in model.modules():
        if hasattr(module, "kv_cache_shapes"):
            module.kv_cache = [torch.zeros(num_blocks, *s, dtype=kv_dtype) for s in module.kv_cache_shapes(block_size)]
    return model


def step_inputs(q_lens: list[int], seq_lens: list[int], block_size: int, blocks_per_seq: int, vocab: int):
    """(input_ids, positions, meta) of one flat step: sequence b holds blocks b*blocks_per_seq..,
    its q_lens[b] new tokens end at seq_lens[b]."""
    from deepserve.layers.attention import AttentionMetadata

    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    tables = torch.arange(len(q_lens) * blocks_per_seq, dtype=torch.int32).view(len(q_lens), blocks_per_seq)
    positions = [p for q, s in zip(q_lens, seq_lens) for p in range(s - q, s)]
    seq_of = [b for b, q in enumerate(q_lens) for _ in range(q)]
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size for b, p in zip(seq_of, positions)]
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=qsl_t, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), logits_indices=(qsl_t[1:] - 1).long(),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), num_decodes=sum(1 for q in q_lens if q == 1),
        seq_lens_host=list(seq_lens))
    ids = torch.randint(0, vocab, (len(positions),), generator=torch.Generator().manual_seed(1))
    return ids, torch.tensor(positions, dtype=torch.int64), meta


def count_step(model, counter: LaunchCounter, q_lens: list[int], seq_lens: list[int], block_size: int,
               blocks_per_seq: int) -> tuple[Counter, int]:
    """Launches of one forward (the hidden states; no logits), and the host syncs it made."""
    ids, positions, meta = step_inputs(q_lens, seq_lens, block_size, blocks_per_seq, model.config.vocab_size)
    counter.counts, counter.syncs = Counter(), 0
    with torch.no_grad(), counter.active():
        model(ids, positions, meta)
    return counter.counts, counter.syncs


# ----------------------------------------------------------------------------- report
def per_layer(counts: Counter) -> dict:
    """{layer: {label: launches}} (layer None: outside the decoder layers: embedding, final norm)."""
    out: dict = defaultdict(Counter)
    for (layer, label, _), n in counts.items():
        out[layer][label] += n
    return out


def by_name(counts: Counter, layer: Optional[int]) -> dict:
    """{label: {op or kernel: launches}} of one layer."""
    out: dict = defaultdict(Counter)
    for (lay, label, name), n in counts.items():
        if lay == layer:
            out[label][name] += n
    return out


def report(title: str, counts: Counter, syncs: int, moe_layer: int, detail: bool) -> dict:
    layers = per_layer(counts)
    labels = [m for m in MODULE_ORDER if any(m in layers[i] for i in layers)]
    print(f"\n{title}: {sum(counts.values())} launches, {syncs} host syncs")
    print(f"{'layer':<7}" + "".join(f"{m:>13}" for m in labels) + f"{'total':>8}")
    for layer in sorted(layers, key=lambda x: -1 if x is None else x):
        row = layers[layer]
        name = "outside" if layer is None else str(layer)
        print(f"{name:<7}" + "".join(f"{row.get(m, 0):>13}" for m in labels) + f"{sum(row.values()):>8}")
    if detail:
        print(f"MoE layer {moe_layer} by op:")
        for label, names in sorted(by_name(counts, moe_layer).items(), key=lambda kv: MODULE_ORDER.index(kv[0])):
            print(f"  {label:<13} " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(names.items())))
    return {"launches": sum(counts.values()), "host_syncs": syncs,
            "per_layer": {str(k): dict(v) for k, v in layers.items()},
            "moe_layer_by_op": {k: dict(v) for k, v in by_name(counts, moe_layer).items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="triton", help="ops backend (torch, triton, triton-all)")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (the first dense, the rest MoE)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"), help="auto: the model's dtype")
    p.add_argument("--decodes", type=int, default=4, help="one-token sequences of the mixed step")
    p.add_argument("--decode-context", type=int, default=20, help="tokens of each decode sequence after the step")
    p.add_argument("--chunk", type=int, default=24, help="the mixed step's prompt chunk, tokens")
    p.add_argument("--context", type=int, default=8, help="tokens of the chunk's prompt cached before the step")
    p.add_argument("--prompts", type=int, default=2, help="prompts of the prefill-only step")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--detail", action=argparse.BooleanOptionalAction, default=True,
                   help="the first MoE layer's launches by op / kernel")
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8" else dtype
    longest = max(args.decode_context, args.chunk + args.context, args.prompt_len)
    blocks_per_seq = -(-longest // args.block_size)
    seqs = max(args.decodes + 1, args.prompts)
    model = build_model(args.layers, args.ops, dtype, kv_dtype, seqs * blocks_per_seq, args.block_size)
    counter = LaunchCounter(EXPERT_PARTS if model.model.layers[0].mlp.ops.backend == "triton" else None)
    label_model(model, counter)
    moe_layer = next(i for i, layer in enumerate(model.model.layers) if layer.is_moe)
    steps = {
        "mixed": ([1] * args.decodes + [args.chunk],
                  [args.decode_context] * args.decodes + [args.chunk + args.context]),
        "prefill": ([args.prompt_len] * args.prompts, [args.prompt_len] * args.prompts)}
    print(f"launches per step: tiny V2-Lite-shaped model, {args.layers} layers, --ops {args.ops}, {args.dtype}, "
          f"KV {kv_dtype}; mixed = {args.decodes} decodes + a {args.chunk}-token chunk after {args.context} cached; "
          f"prefill = {args.prompts} x {args.prompt_len} tokens")
    out = {"args": vars(args)}
    for name, (q_lens, seq_lens) in steps.items():
        counts, syncs = count_step(model, counter, q_lens, seq_lens, args.block_size, blocks_per_seq)
        out[name] = report(name, counts, syncs, moe_layer, args.detail)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
