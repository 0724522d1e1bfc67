"""The model forward of a serving step never makes the host wait for the device: a mixed step
(decode rows plus a prompt chunk whose context partly comes from the prefix cache) of a tiny
DeepSeek-V3 (MLA + MoE on the sorted grouped-GEMM path) through the engine, and of the demo
Llama, with the Triton ops (interpreted on the CPU), under tests/models/sync_guard.py's
recorder. Only the forward is watched: the engine reads the sampled tokens back after it."""
import contextlib

import pytest
import torch
import transformers

from deepserve import LLM, SamplingParams
from deepserve.ops.triton.fused_moe import use_small_path
from tests.conftest import DEMO_MODEL
from deepserve.ops import OpTable
from deepserve.ops.registry import bind
from tests.models.hf_reference import load_ours, save_tiny
from tests.models.paged_harness import allocate_kv_cache, build_meta
from tests.models.sync_guard import SyncRecorder, aten_sync
from tests.models.test_deepseek import r1_style

pytest.importorskip("triton")
# the interpreted kernels run on the CPU's tensors; a GPU host's engine would take its graphs instead
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only hosts (Triton interpreted)")
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
SHARED = [1, 40, 41, 26, 7, 9, 11, 12, 13]       # two full blocks of 4 land in the prefix cache


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    cfg = r1_style()
    cfg.num_hidden_layers = 3            # two dense layers, then one MoE layer (8 experts, top 2)
    path = tmp_path_factory.mktemp("v3")
    save_tiny(transformers.DeepseekV3ForCausalLM, cfg, path)
    return path


def _mixed_step_syncs(model_path) -> tuple[list, list]:
    """Prefill two prompts, then one step of their decodes plus a third prompt that shares the
    first's cached blocks (context 8 > its 5 new tokens): the syncs inside that step's forward,
    and the (q_lens, seq_lens) of what it ran."""
    llm = LLM(str(model_path), ops="triton", block_size=4, max_model_len=64, enable_prefix_caching=True)
    engine, runner = llm.engine, llm.engine.runner
    engine.add_request("a", {"prompt_token_ids": SHARED}, GREEDY)
    engine.add_request("b", {"prompt_token_ids": [3, 5, 8]}, GREEDY)
    engine.step()
    engine.add_request("c", {"prompt_token_ids": SHARED[:8] + [60, 61, 62, 63, 64]}, GREEDY)
    recorder, shapes = SyncRecorder(), []
    forward = runner.model.forward

    def watched(input_ids, positions, meta, **kw):
        q_lens = (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist()
        shapes.append((q_lens, meta.seq_lens.tolist()))
        with recorder.watch():
            return forward(input_ids, positions, meta, **kw)

    runner.model.forward = watched
    try:
        engine.step()
    finally:
        runner.model.forward = forward
    llm.shutdown()
    return recorder.syncs, shapes


def _assert_none(syncs: list) -> None:
    assert not syncs, "host syncs in the forward:\n" + "\n".join(f"{what}  at {where}" for what, where in syncs)


@cpu_only
def test_deepseek_v3_mixed_step_forward_has_no_host_sync(tiny_v3):
    syncs, shapes = _mixed_step_syncs(tiny_v3)
    assert shapes == [([1, 1, 5], [10, 4, 13])]     # two decodes + a chunk over 8 cached tokens
    assert not use_small_path(7, 2, 8)              # the MoE layer ran the sorted path (align_by_expert)
    _assert_none(syncs)


@cpu_only
def test_llama_mixed_step_forward_has_no_host_sync():
    """The demo Llama's forward alone (its attention is the Triton paged kernels' and the cache
    write's), metadata as the runner gives it: host lengths beside the device's."""
    model = load_ours(DEMO_MODEL)
    bind(model, OpTable("triton"))
    allocate_kv_cache(model, 16, 4)
    recorder = SyncRecorder()
    with torch.no_grad():
        for step, (q_lens, seq_lens) in enumerate([([9, 3], [9, 3]), ([1, 1, 5], [10, 4, 13])]):
            meta, positions = build_meta(q_lens, seq_lens, 4, 4)
            meta.seq_lens_host = seq_lens
            ids = torch.arange(sum(q_lens)) % 200
            with recorder.watch() if step else contextlib.nullcontext():
                model(ids, positions, meta)
    _assert_none(recorder.syncs)


def test_recorder_sees_each_kind_of_sync():
    """The recorder catches what the model test must not contain (so an empty list means none)."""
    x = torch.arange(6)
    mask = x > 2
    calls = [lambda: x.tolist(), lambda: x[0].item(), lambda: bool(x[0]), lambda: x[mask],
             lambda: x.nonzero(), lambda: torch.unique(x), lambda: x.masked_select(mask),
             lambda: torch.repeat_interleave(x), lambda: x.clone().index_put_((mask,), x[:3])]
    for call in calls:
        recorder = SyncRecorder()
        with recorder.watch():
            call()
        assert recorder.syncs, call
    recorder = SyncRecorder()
    with recorder.watch():      # none of these waits for the device
        x[x.clamp(max=2)]
        torch.repeat_interleave(x, output_size=15)
        x.sum() + 1
    assert recorder.syncs == []
    assert not aten_sync(torch.ops.aten.add.Tensor, (x, x), {})
