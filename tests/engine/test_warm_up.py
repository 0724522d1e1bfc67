"""The start-up warm-up (engine/warm_up.py): which steps it runs, that they write nothing to the
KV pool, and the compile watch that logs what it missed."""
from __future__ import annotations

import logging

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.engine.step_inputs import StepMessage
from deepserve.engine.warm_up import CompileWatch, WarmUpStep, profile_inputs, step_inputs, warm_up_steps, warm_up_wanted
from tests.conftest import DEMO_MODEL


def _class(n: int) -> str:
    return "one" if n == 1 else "x16" if n % 16 == 0 else "other"


def _shape(s: WarmUpStep) -> dict:
    return {"tokens": s.decodes + sum(s.prompts), "seqs": s.decodes + len(s.prompts),
            "longest": max((1,) * bool(s.decodes) + s.prompts)}


def test_steps_cover_every_integer_class_and_each_eager_power_of_two():
    steps = warm_up_steps(max_tokens=8192, max_seqs=256, max_model_len=2048, piecewise_max=512)
    shapes = [_shape(s) for s in steps]
    for key in ("tokens", "seqs", "longest"):
        assert {_class(sh[key]) for sh in shapes} == {"one", "x16", "other"}, key
    assert {_class(s.decodes) for s in steps if s.decodes} == {"one", "x16", "other"}
    tokens = {sh["tokens"] for sh in shapes}
    assert {1024, 2048, 4096, 8192} <= tokens
    assert {1022, 2046, 4094, 8190} <= tokens                 # beside decodes, not a multiple of 16
    assert not {t for t in tokens if 512 < t and t not in (1022, 1024, 2046, 2048, 4094, 4096, 8190, 8192)}
    assert max(s for sh in shapes for s in [sh["longest"]]) == 2048          # chunks of at most max_model_len
    assert len(steps) == len(set(steps))


@pytest.mark.parametrize("limits", [(64, 4, 32, 0), (8192, 8, 300, 512), (100, 1, 100, 16), (6000, 256, 8192, 512),
                                    (131072, 256, 131072, 512)])
def test_steps_keep_within_the_limits(limits):
    max_tokens, max_seqs, max_model_len, piecewise_max = limits
    steps = warm_up_steps(max_tokens, max_seqs, max_model_len, piecewise_max)
    assert steps
    for s in steps:
        sh = _shape(s)
        assert 0 < sh["tokens"] <= max_tokens and sh["seqs"] <= max_seqs
        assert all(0 < n <= max_model_len for n in s.prompts)
    largest = min(max_tokens, max_seqs * max_model_len)
    if largest > piecewise_max:
        assert largest == max(_shape(s)["tokens"] for s in steps)
    big = sorted(_shape(s)["tokens"] for s in steps if _shape(s)["tokens"] > 16384)
    assert big in ([], [largest - 2, largest])          # past 16,384 tokens: max_num_batched_tokens alone


def test_warm_up_steps_write_no_cache_slot_and_sample_in_the_vocabulary():
    llm = LLM(str(DEMO_MODEL), max_num_batched_tokens=256, max_model_len=256, max_num_seqs=32)
    runner = llm.engine.runner
    reference = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    pools = [t.clone() for m in runner.kv_layers for t in m.kv_cache]
    steps = warm_up_steps(256, 32, 256, 64)
    assert len(steps) >= 10
    for step in steps:
        inputs = step_inputs(step, runner.block_size, runner.num_blocks)
        assert len(inputs.ids) == _shape(step)["tokens"] and inputs.num_decodes == step.decodes
        logits = runner._forward(StepMessage(inputs))
        assert logits.shape[0] == len(inputs.q_lens)             # one row per sequence
        runner._warm_sampler(torch.nan_to_num(logits))
    after = [t for m in runner.kv_layers for t in m.kv_cache]
    assert all(torch.equal(a, b) for a, b in zip(pools, after))
    # the prefix cache still serves the earlier prompt's blocks: its text is unchanged
    again = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    assert again.token_ids == reference.token_ids


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_warm_up_through_every_rank_keeps_greedy_outputs(monkeypatch, layout):
    """DEEPSERVE_WARM_UP=1 runs the start-up warm-up on a CPU: its steps go through the worker
    ranks (TP peers, the second pipeline stage) without a hang, and greedy text after it equals
    an engine's without it."""
    kw = dict(block_size=4, max_model_len=64, max_num_batched_tokens=96, max_num_seqs=8)
    prompts, params = ["Once upon a time", "The little dog"], SamplingParams(temperature=0, max_tokens=12)
    reference = [o.outputs[0].token_ids for o in LLM(str(DEMO_MODEL), **kw).generate(prompts, params)]
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    with LLM(str(DEMO_MODEL), **kw, **layout) as llm:
        assert llm.engine.runner.timings["warm_up_s"] > 0
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == reference


def test_worker_compile_watch_serves_after_the_warm_up(monkeypatch):
    """A worker rank's compile watch starts logging at the first step after the warm-up's
    steps (as the driver's does once its warm-up ends), not during them."""
    from deepserve.config import EngineArgs
    from deepserve.engine.model_runner import WorkerRunner
    from deepserve.engine import model_runner
    from deepserve.platforms import get_platform
    watch = CompileWatch()
    monkeypatch.setattr(model_runner, "WATCH", watch)
    config = EngineArgs(model=str(DEMO_MODEL), block_size=4, max_model_len=64).create_engine_config()
    runner = WorkerRunner(config, get_platform("cpu"))
    steps = warm_up_steps(32, 4, 64, 0)[:2]
    runner.run_published(StepMessage(step_inputs(steps[0], runner.block_size, runner.num_blocks)))
    assert not watch.serving                                   # no warm-up: nothing to end
    for step in steps:
        runner.run_published(StepMessage(step_inputs(step, runner.block_size, runner.num_blocks), warm_up=True))
        assert not watch.serving
    runner.run_published(StepMessage(step_inputs(steps[0], runner.block_size, runner.num_blocks)))
    assert watch.serving


def test_warm_up_wanted_on_cuda_unless_told(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_WARM_UP", raising=False)
    assert warm_up_wanted("cuda") and not warm_up_wanted("cpu")
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "0")
    assert not warm_up_wanted("cuda")
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    assert warm_up_wanted("cpu")
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "yes")
    with pytest.raises(ValueError, match="DEEPSERVE_WARM_UP must be 0 or 1, got 'yes'"):
        warm_up_wanted("cuda")


@pytest.mark.parametrize("limits", [(96, 8, 40, 4), (8192, 256, 3000, 16), (100, 1, 100, 16), (64, 4, 8, 4),
                                    (50, 3, 1000, 4)])
def test_profile_step_holds_the_largest_step(limits):
    """The profile run's step holds max_num_batched_tokens tokens (no more than max_num_seqs
    full sequences), at least as many as any warm-up step, and as many logits rows as asked;
    each sequence's slots lie in blocks of its own of the scratch pool, as its table says."""
    max_tokens, max_seqs, max_model_len, block_size = limits
    inputs, blocks = profile_inputs(max_tokens, max_seqs, max_model_len, block_size, logits_rows=max_seqs * 3)
    tokens = len(inputs.ids)
    assert tokens == min(max_tokens, max_seqs * max_model_len) == sum(inputs.q_lens) == len(inputs.slots)
    assert len(inputs.q_lens) <= max_seqs and max(inputs.q_lens) <= max_model_len
    assert all(s.decodes + sum(s.prompts) <= tokens for s in warm_up_steps(max_tokens, max_seqs, max_model_len, 0))
    assert len(inputs.logits_rows) == min(tokens, max_seqs * 3) and max(inputs.logits_rows) < tokens
    assert sorted(inputs.slots.tolist()) == sorted(set(inputs.slots.tolist())) and max(inputs.slots) < blocks * block_size
    offset = 0
    for n, table in zip(inputs.q_lens, inputs.tables):
        pos = inputs.positions[offset:offset + n]
        want = [table[p // block_size] * block_size + p % block_size for p in pos.tolist()]
        assert inputs.slots[offset:offset + n].tolist() == want and pos.tolist() == list(range(n))
        offset += n


def test_profile_run_forwards_max_num_batched_tokens(monkeypatch):
    """The GPU profile run (faked allocator counters on the CPU) forwards every token of
    max_num_batched_tokens, also where max_model_len does not divide it (96 = 40 + 40 + 16)."""
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=40, max_num_batched_tokens=96, max_num_seqs=8)
    runner = llm.engine.runner
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: 0)
    monkeypatch.setattr(runner.platform, "memory_info", lambda device: (2**34, 2**34))
    seen = []
    forward = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda ids, pos, meta, **kw: seen.append(
        (ids.shape[0], meta.host_seq_lens, meta.logits_indices.shape[0])) or forward(ids, pos, meta, **kw))
    assert runner._profile_free_memory() > 0
    assert seen == [(96, [40, 40, 16], 8)]


def test_sampler_warm_up_draws_tokens_of_the_vocabulary():
    llm = LLM(str(DEMO_MODEL))
    runner = llm.engine.runner
    logits = torch.randn(3, runner.vocab_size)
    calls = []
    sample = runner.ops.sample
    runner.ops.sample = lambda *a: calls.append(sample(*a)) or calls[-1]
    try:
        runner._warm_sampler(logits)
    finally:
        runner.ops.sample = sample
    (ids,) = calls
    assert ids.shape == (3,) and bool(((ids >= 0) & (ids < runner.vocab_size)).all())


class _Fn:
    module, name = "deepserve.ops.triton.norm", "_rms_norm_kernel"


def test_compile_watch_logs_compiles_only_once_serving(caplog):
    watch = CompileWatch()
    watch.started(_Fn(), ("key", 1))
    watch.finished(_Fn(), ("key", 1), "_rms_norm_kernel[num_warps=4]")
    assert watch.compiles == 1
    watch.serving = True
    with caplog.at_level(logging.INFO, logger="deepserve"):
        watch.started(_Fn(), ("key", 2))
        watch.finished(_Fn(), ("key", 2), "_rms_norm_kernel[num_warps=8]")
    assert watch.compiles == 2 and watch.seconds >= 0
    (line,) = [r.getMessage() for r in caplog.records if "while serving" in r.getMessage()]
    assert "deepserve.ops.triton.norm._rms_norm_kernel" in line and "num_warps=8" in line


def test_compile_watch_chains_the_hooks_already_set():
    knobs = pytest.importorskip("triton").knobs
    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    seen = []
    rt.jit_cache_hook = lambda **kw: seen.append(("start", kw["key"])) or False
    rt.jit_post_compile_hook = lambda **kw: seen.append(("done", kw["key"]))
    try:
        watch = CompileWatch()
        assert watch.install() and watch.install()
        assert rt.jit_cache_hook(key=7, fn=_Fn(), repr="r") is False
        rt.jit_post_compile_hook(key=7, fn=_Fn(), repr="r")
        assert seen == [("start", 7), ("done", 7)] and watch.compiles == 1
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
