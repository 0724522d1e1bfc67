"""The host's work in the eager part of an MLA model's mixed step (decodes and prompt chunks in one
step), which piecewise CUDA graphs leave between their pieces: per layer a fixed set of op calls
and launches, none per step beside them, and no host read of a device value.

- The model runner builds MLA's prefill gather (layers/mla.py) on the host and sends it with the
  step's other inputs; it equals the one the layer builds on the device from the metadata alone.
- Through the (uncaptured) pieces, each layer's attention makes the same calls, the first layer
  too (no gather built there), writes its output into the pieces' static buffer (no copy after)
  and reads nothing back from the device; the hidden states equal the model's forward over
  metadata without the runner's gather.
- The views of the step's inputs and of the pieces' buffers (the decode / prompt rows' q,
  positions and outputs) are made by the first layer and reused by the rest.
benchmarks/host_mixed.py times the same path at 27 layers; its counters count here."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from deepserve import LLM
from deepserve.engine.piecewise_graphs import PiecewiseGraphs
from deepserve.engine.step_inputs import StepInputs
from deepserve.layers.mla import prefill_gather
from tests.bench.conftest import BENCHMARKS, benchmark_module

sys.path.insert(0, str(BENCHMARKS))      # host_mixed imports its neighbour launch_count
host_mixed = benchmark_module("host_mixed")

BLOCK = 4
TINY_V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=128,
                    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                    routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
                    max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
# (cached context, new tokens): three decode rows, then two prompt chunks (one after a context)
SEQS = [(8, 1), (4, 1), (12, 1), (6, 7), (0, 5)]
# what one layer's eager attention calls in a mixed step: op-table calls (one or two kernel
# launches each on the triton backend) and the aten launches it makes itself (the latent gather)
LAYER_CALLS = {"op.mla_kv_write": 1, "op.mla_q_absorb": 1, "op.paged_attention": 2, "op.mla_v_up": 1,
               "op.rotary_embedding": 1, "op.linear": 1, "aten.index_select": 1}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_v2_lite")
    (path / "config.json").write_text(json.dumps(TINY_V2_LITE))
    llm = LLM(str(path), load_format="dummy", device="cpu", ops="torch", dtype="float32", seed=0,
              block_size=BLOCK, max_model_len=64, max_num_seqs=8, kv_cache_memory_bytes=1 << 20,
              skip_tokenizer_init=True)
    yield llm.engine.runner
    llm.engine.shutdown()


def mixed_step(seqs=SEQS) -> StepInputs:
    """StepInputs of `seqs` whose blocks lie scattered over the pool (rows padded with block 0)."""
    width = max(-(-(c + n) // BLOCK) for c, n in seqs)
    order = np.random.default_rng(3).permutation(len(seqs) * width) + 1
    tables = [[int(b) for b in order[i * width:(i + 1) * width]] for i in range(len(seqs))]
    for row, (c, n) in zip(tables, seqs):
        used = -(-(c + n) // BLOCK)
        row[used:] = [0] * (width - used)
    positions = [p for c, n in seqs for p in range(c, c + n)]
    slots = [tables[b][p // BLOCK] * BLOCK + p % BLOCK for b, (c, n) in enumerate(seqs) for p in range(c, c + n)]
    q_lens = [n for _, n in seqs]
    ends = np.cumsum(q_lens) - 1
    return StepInputs(ids=[(7 * i) % 100 + 1 for i in range(len(positions))], positions=np.asarray(positions),
                      slots=np.asarray(slots), q_lens=q_lens, seq_lens=[c + n for c, n in seqs], tables=tables,
                      logits_rows=[int(e) for e in ends], num_decodes=sum(1 for n in q_lens if n == 1))


def without_gather(meta):
    """The same metadata with nothing derived yet (the layer builds the gather on the device)."""
    return dataclasses.replace(meta)


def test_runner_sends_the_prefill_gather_the_layer_would_build(runner):
    inputs = mixed_step()
    ids, positions, meta = runner.to_device(inputs)
    first = inputs.num_decodes
    assert len(meta.derived) == 1
    sent = prefill_gather(meta, first, BLOCK)
    built = prefill_gather(without_gather(meta), first, BLOCK)
    assert sent is not built
    for name in ("blocks", "tables", "valid", "seq_lens", "stale"):
        a, b = getattr(sent, name), getattr(built, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # the prompt rows' blocks, sequence after sequence: 4 of the first prompt (13 tokens), 2 of the second
    assert sent.blocks.tolist() == inputs.tables[3][:4] + inputs.tables[4][:2]
    assert sent.valid.tolist() == [4, 4, 4, 1, 4, 1]
    # a decode-only step has no prompt rows: nothing sent
    decodes = mixed_step([(8, 1), (4, 1)])
    assert runner.to_device(decodes)[2].derived == {}


@torch.inference_mode()
def test_mixed_step_eager_attention_calls_per_layer(runner):
    model = runner.model
    pieces = PiecewiseGraphs(model, 32, runner.device, sizes=[8, 32])
    for layer in runner.kv_layers:
        layer.kv_cache = [torch.randn_like(c) for c in layer.kv_cache]   # contexts in the pool
    saved = [[c.clone() for c in layer.kv_cache] for layer in runner.kv_layers]
    ids, positions, meta = runner.to_device(mixed_step())
    want = model(ids, positions, without_gather(meta))
    for layer, caches in zip(runner.kv_layers, saved):
        layer.kv_cache = [c.clone() for c in caches]
    pieces.run(ids, positions, without_gather(meta))   # the first run makes the static buffers
    for layer, caches in zip(runner.kv_layers, saved):
        layer.kv_cache = [c.clone() for c in caches]
    counter = host_mixed.AttendCounter()
    host_mixed.instrument(model, pieces, runner.ops, [0.0] * len(model.model.layers), counter)
    counter.counting = True
    try:
        with counter:
            got = pieces.run(ids, positions, meta)
    finally:
        host_mixed.uninstrument(runner.ops)
    # (the pieces' GEMMs run over the padded rows: their sums may round differently)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counter.syncs == 0
    assert {i: dict(c) for i, c in counter.calls.items()} == {i: LAYER_CALLS for i in range(len(model.model.layers))}


# the views a later layer's eager attention makes itself (outside the ops) in a mixed step: of its
# prefill's gathered latent (split into c_kv / k_pe, kv_b_proj's output viewed per head and split
# into k_nope / v); the splits of its inputs at the decode rows and the views of the pieces'
# buffers are the first layer's, shared by the rest (every layer is given the same buffers)
LATER_LAYER_VIEWS = {"aten.split_with_sizes": 2, "aten.view": 1}


@torch.inference_mode()
def test_later_layers_reuse_the_steps_views(runner, monkeypatch):
    pieces = PiecewiseGraphs(runner.model, 32, runner.device, sizes=[8, 32])
    ids, positions, meta = runner.to_device(mixed_step())
    pieces.run(ids, positions, meta)   # the first run makes the static buffers
    monkeypatch.setattr(host_mixed, "NO_LAUNCH", frozenset())     # views counted too
    counter = host_mixed.AttendCounter()
    host_mixed.instrument(runner.model, pieces, runner.ops, [0.0] * len(runner.model.model.layers), counter)
    counter.counting = True
    try:
        with counter:
            pieces.run(ids, positions, runner.to_device(mixed_step())[2])
    finally:
        host_mixed.uninstrument(runner.ops)
    views = {i: {name: n for name, n in calls.items() if name.startswith("aten.") and name != "aten.index_select"}
             for i, calls in counter.calls.items()}
    assert all(views[i] == LATER_LAYER_VIEWS for i in range(1, len(views)))
