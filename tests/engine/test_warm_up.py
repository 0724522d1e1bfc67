"""The start-up warm-up (engine/warm_up.py): which steps it runs, that they write nothing to the
KV pool, and the compile watch that logs what it missed."""
from __future__ import annotations

import logging
import weakref

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from deepserve import LLM, SamplingParams
from deepserve.engine.step_inputs import StepMessage
from deepserve.engine.warm_up import (CompileWatch, WarmUpStep, nearest_key_diff, profile_inputs, split_key, step_inputs,
                                      warm_up_steps, warm_up_wanted)
from tests.conftest import DEMO_MODEL


def _class(n: int) -> str:
    return "one" if n == 1 else "x16" if n % 16 == 0 else "other"


def _shape(s: WarmUpStep) -> dict:
    return {"tokens": s.decodes * (1 + s.drafts) + sum(s.prompts), "seqs": s.decodes + len(s.prompts),
            "longest": max((1 + s.drafts,) * bool(s.decodes) + s.prompts)}


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


def test_mixed_steps_cover_each_token_tile_of_the_mla_prep_kernels():
    """A mixed step's eager MLA attention sizes the q-absorb / v-up token tile by its decodes
    (GPU table: 16 to 64 rows): some warm-up step beside prompts, within the piecewise limit,
    has each tile that decode counts up to max_num_seqs give (V2-Lite compiled the 64-row
    q-absorb at its first burst of 33+ decodes before)."""
    import json
    from pathlib import Path

    from deepserve.ops.triton import mla_prep
    table = json.loads((Path(mla_prep.__file__).with_name("configs") / "mla_prep" / "default.json").read_text())
    cap = next(r["set"]["BLOCK_T_MAX"] for r in table if r.get("if", {}).get("kernel") == "q_absorb")

    def tile(n: int) -> int:
        return mla_prep._token_block(n, {"BLOCK_T_MAX": cap})

    for max_seqs, piecewise_max in ((256, 512), (256, 2048), (48, 96), (20, 64)):
        steps = warm_up_steps(max_tokens=8192, max_seqs=max_seqs, max_model_len=2048, piecewise_max=piecewise_max)
        warmed = {tile(s.decodes) for s in steps if s.decodes and s.prompts and s.num_tokens <= piecewise_max}
        assert warmed == {tile(n) for n in range(1, max_seqs)}, (max_seqs, warmed)


@pytest.mark.parametrize("drafts", [0, 1, 3])
@pytest.mark.parametrize("limits", [(64, 4, 32, 0), (8192, 8, 300, 512), (100, 1, 100, 16), (6000, 256, 8192, 512),
                                    (131072, 256, 131072, 512), (8, 8, 4, 0)])
def test_steps_keep_within_the_limits(limits, drafts):
    max_tokens, max_seqs, max_model_len, piecewise_max = limits
    steps = warm_up_steps(max_tokens, max_seqs, max_model_len, piecewise_max, drafts)
    assert steps
    for s in steps:
        sh = _shape(s)
        assert 0 < sh["tokens"] <= max_tokens and sh["seqs"] <= max_seqs
        assert s.num_tokens == sh["tokens"] and s.drafts in ((0, drafts) if s.decodes else (0,))
        assert all(0 < n <= max_model_len for n in s.prompts)
        assert not s.drafts or s.drafts + 2 <= max_model_len      # context, last token, drafts
    largest = min(max_tokens, max_seqs * max_model_len)
    if largest > piecewise_max:
        assert largest == max(_shape(s)["tokens"] for s in steps)
    big = sorted(_shape(s)["tokens"] for s in steps if _shape(s)["tokens"] > 16384)
    assert big in ([], [largest - 2, largest])          # past 16,384 tokens: max_num_batched_tokens alone


def test_verify_steps_cover_every_integer_class_alone_and_beside_prompts():
    """With k drafts the steps hold verify sequences (last token + k drafts each) whose count
    takes the values 1, a multiple of 16 and neither, alone and beside prompt chunks; the
    steps without drafts are the same as without speculative decoding."""
    plain = warm_up_steps(max_tokens=8192, max_seqs=256, max_model_len=2048, piecewise_max=512)
    steps = warm_up_steps(max_tokens=8192, max_seqs=256, max_model_len=2048, piecewise_max=512, drafts=2)
    assert [s for s in steps if not s.drafts] == plain and not any(s.drafts for s in plain)
    verify = [s for s in steps if s.drafts]
    assert {s.drafts for s in verify} == {2}
    assert {_class(s.decodes) for s in verify if not s.prompts} == {"one", "x16", "other"}
    assert {_class(s.decodes) for s in verify if s.prompts} == {"one", "x16", "other"}
    assert max(s.num_tokens for s in verify) <= 33 * 3 + 15          # small steps only: start-up stays short


@pytest.mark.parametrize("step", [WarmUpStep(3, (), 2), WarmUpStep(1, (15,), 1), WarmUpStep(2, (5, 3), 3),
                                  WarmUpStep(4, (9,), 0)])
def test_verify_step_inputs_are_those_of_a_served_verify_step(step):
    """A warm-up verify step's inputs equal spec_decode.verify_inputs' for sequences at those
    lengths (each decode sequence one context token, its last token and its drafts; each
    prompt from position 0) in the same block tables, but for the slots: none is written."""
    from deepserve.engine.sequence import Sequence
    from deepserve.engine.spec_decode import verify_inputs
    block_size, num_blocks = 4, 5
    seqs, num_new, drafts = [], [], []
    for i in range(step.decodes):
        seq = Sequence("d", i, [7, 8], SamplingParams(temperature=0))
        seq.num_computed_tokens = 1
        seqs.append(seq)
        num_new.append(1)
        drafts.append([0] * step.drafts)
    for n in step.prompts:
        seqs.append(Sequence("p", 0, [7] * n, SamplingParams(temperature=0)))
        num_new.append(n)
        drafts.append([])
    got = step_inputs(step, block_size, num_blocks)
    for seq, table in zip(seqs, got.tables):   # (the warm-up's tables: every sequence as wide as the longest)
        seq.block_table = table
    want, order = verify_inputs(seqs, num_new, drafts, block_size)
    assert order == list(range(len(seqs)))
    for name in ("q_lens", "seq_lens", "logits_rows", "num_decodes"):
        assert getattr(got, name) == getattr(want, name), name
    assert got.positions.tolist() == want.positions.tolist() and len(got.ids) == len(want.ids)
    assert got.slots.tolist() == [-1] * len(got.ids) and min(want.slots) >= 0


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


def _pools(runner) -> list[torch.Tensor]:
    return [t.clone() for m in runner.kv_layers for t in m.kv_cache]


def _cache_state(engine) -> tuple:
    bm = engine.block_manager
    return list(bm.ref_counts), list(bm.hash_of), dict(bm.cached), list(bm.free), bm.prefix_queries, bm.prefix_hits


def warm_up_again(llm) -> list:
    """Run the driver's whole warm-up again on a serving engine: the KV pools (every layer's,
    the MTP module's too), the block manager and its prefix cache stay byte for byte as they
    were. Returns the messages the warm-up published to the other ranks."""
    engine, runner = llm.engine, llm.engine.runner
    pools, state = _pools(runner), _cache_state(engine)
    published = []
    publish = runner.publish
    runner.publish = lambda msg: published.append(msg) or publish(msg)
    try:
        runner.warm_up()
    finally:
        runner.publish = publish
    assert all(torch.equal(a, b) for a, b in zip(pools, _pools(runner)))
    assert _cache_state(engine) == state
    return published


def serves_again(llm, prompts, params, reference) -> None:
    """The prompts' greedy tokens are still `reference`, from prefix-cache hits."""
    hits = llm.engine.gauges()["prefix_cache_hits"]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == reference
    assert llm.engine.gauges()["prefix_cache_hits"] > hits


def test_ngram_warm_up_runs_verify_steps_writes_nothing_and_keeps_greedy_outputs(monkeypatch):
    """With n-gram drafts (k = 2) the warm-up also runs verify steps (three rows a decode
    sequence); greedy text with the warm-up (DEEPSERVE_WARM_UP=1) equals the text without it
    (=0), and running it again on the serving engine leaves pools and prefix cache as they were."""
    kw = dict(block_size=4, max_model_len=64, max_num_batched_tokens=96, max_num_seqs=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1})
    prompts = ["Once upon a time, there was a little girl. The little girl", "The little dog saw the little dog"]
    params = SamplingParams(temperature=0, max_tokens=16)
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "0")
    plain = LLM(str(DEMO_MODEL), **kw)
    reference = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert "warm_up_s" not in plain.engine.runner.timings and plain.engine.gauges()["spec_decode_num_drafts"] > 0
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    llm = LLM(str(DEMO_MODEL), **kw)
    assert llm.engine.runner.timings["warm_up_s"] > 0
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == reference
    published = warm_up_again(llm)
    serves_again(llm, prompts, params, reference)
    shapes = [(m.inputs.num_tokens, tuple(m.inputs.q_lens)) for m in published]
    assert (9, (3, 3, 3)) in shapes and (3 + 15, (3, 15)) in shapes        # verify alone, beside a prompt
    assert all(m.warm_up for m in published)


@pytest.mark.parametrize("layout", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2},
                                    {"pipeline_parallel_size": 2,
                                     "speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}],
                         ids=["tp2", "pp2", "pp2-ngram"])
def test_warm_up_through_every_rank_keeps_greedy_outputs(monkeypatch, layout):
    """DEEPSERVE_WARM_UP=1 runs the start-up warm-up on a CPU: its steps go through the worker
    ranks (TP peers, the second pipeline stage; verify steps with n-gram drafts) without a
    hang, and greedy text after it equals an engine's without it."""
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


def _launch_key(logits, temperature, top_k, top_p, min_p, noise) -> tuple:
    """What Triton specialises the sampling kernel's launch on (ops/triton/sampling.py): each
    tensor's dtype and 16-byte alignment, and the value class (1, a multiple of 16, other) of
    its integer arguments, the vocabulary and the rows' strides (of contiguous rows)."""
    tensors = (logits, noise, temperature, top_k, top_p, min_p)
    ints = (logits.shape[1], logits.stride(0) if logits.stride(-1) == 1 else logits.shape[1],
            noise.stride(0) if noise.stride(-1) == 1 else noise.shape[1])
    return (tuple((t.dtype, t.data_ptr() % 16 == 0, t.dim()) for t in tensors)
            + tuple((v == 1, v % 16 == 0) for v in ints))


def test_sampling_kernel_launch_is_the_warm_ups_for_every_request_setting():
    """The warm-up samples once (engine/warm_up.py): every sampled request setting (penalties,
    logit_bias, min_tokens, logprobs, allowed_token_ids, a seed, greedy rows beside) and row
    count reaches ops.sample with the launch key of the warm-up's draw, so none compiles a
    kernel of its own."""
    from deepserve.engine.sequence import Sequence
    llm = LLM(str(DEMO_MODEL))
    runner = llm.engine.runner
    keys = []
    sample = runner.ops.sample
    runner.ops.sample = lambda *a: keys.append(_launch_key(*a)) or sample(*a)
    settings = [{}, {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2},
                {"logit_bias": {3: 5.0}}, {"min_tokens": 4, "stop_token_ids": [7]}, {"logprobs": 3},
                {"allowed_token_ids": [1, 2, 3]}, {"seed": 11}, {"top_k": 0, "top_p": 1.0}]
    try:
        runner._warm_sampler(torch.randn(1, runner.vocab_size))
        for rows in (1, 16, 17):
            for kw in settings:
                seqs = [Sequence("r", i, [5, 6], SamplingParams(temperature=0.7 if i % 3 else 0.0,
                                                                **{"top_k": 9, **kw})) for i in range(rows)]
                seqs[-1].params = SamplingParams(temperature=0.7, **kw)
                ids = runner.sampler(torch.randn(rows, runner.vocab_size), seqs).token_ids
                assert len(ids) == rows and all(0 <= t < runner.vocab_size for t in ids)
                runner.sampler.sample_ids(torch.randn(rows, runner.vocab_size), seqs)
    finally:
        runner.ops.sample = sample
    assert len(keys) == 1 + 2 * 3 * len(settings) and set(keys) == {keys[0]}


class _Params:
    params = [type("P", (), {"name": n})() for n in ("x_ptr", "w_ptr", "n_rows", "eps", "BLOCK")]


class _Fn:
    module, name = "deepserve.ops.triton.norm", "_rms_norm_kernel"
    jit_function = _Params()


# keys as Triton 3.6 writes them: str(specialization) + str(options)
KEY_A = "[('*fp16', 'D'), ('*fp16', 'D'), ('i32', 'D'), ('fp32', None), ('constexpr', 64)]{'num_warps': 4}"
KEY_B = "[('*fp16', ''), ('*fp16', 'D'), ('i32', ''), ('fp32', None), ('constexpr', 64)]{'num_warps': 4}"
KEY_C = "[('*fp16', 'D'), ('*fp16', 'D'), ('constexpr', 1), ('fp32', None), ('constexpr', 64)]{'num_warps': 8}"


def test_compile_watch_logs_compiles_only_once_serving(caplog):
    watch = CompileWatch()
    watch.started(_Fn(), KEY_A)
    watch.finished(_Fn(), KEY_A)
    assert watch.compiles == 1
    watch.serving = True
    with caplog.at_level(logging.INFO, logger="deepserve"):
        watch.started(_Fn(), KEY_C)
        watch.finished(_Fn(), KEY_C)
    assert watch.compiles == 2 and watch.seconds >= 0
    (line,) = [r.getMessage() for r in caplog.records if "while serving" in r.getMessage()]
    assert "deepserve.ops.triton.norm._rms_norm_kernel" in line
    assert "n_rows: ('i32', 'D') -> ('constexpr', 1)" in line and "num_warps': 4} -> {'num_warps': 8}" in line


def test_key_diff_names_the_parameters_whose_class_changed():
    names = [p.name for p in _Params.params]
    assert split_key(KEY_A) == (["('*fp16', 'D')", "('*fp16', 'D')", "('i32', 'D')", "('fp32', None)",
                                 "('constexpr', 64)"], "{'num_warps': 4}")
    # the nearest earlier key: KEY_A differs from KEY_B in two parameters, from KEY_C in two and the options
    assert nearest_key_diff(names, KEY_B, [KEY_C, KEY_A]) == (
        "differs from the nearest of 2 earlier keys in x_ptr: ('*fp16', 'D') -> ('*fp16', ''); "
        "n_rows: ('i32', 'D') -> ('i32', '')")
    assert nearest_key_diff(names, KEY_A, []) == "the kernel's first compile"
    assert nearest_key_diff(names, KEY_A, [KEY_A]).endswith("in nothing")
    # constexpr strings (callables' hashes, dtype names) may hold commas and brackets
    odd = "[('constexpr', 'a,(b]'), ('*i32', 'D')]{}"
    assert split_key(odd) == (["('constexpr', 'a,(b]')", "('*i32', 'D')"], "{}")
    assert nearest_key_diff(["F", "p"], odd, ["[('constexpr', 'a,(b]'), ('*i32', '')]{}"]).endswith(
        "p: ('*i32', '') -> ('*i32', 'D')")


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


class _AllocatedBytes(TorchDispatchMode):
    """The CPU stand-in for torch.cuda's memory_allocated / max_memory_allocated: bytes of the
    storages that ops under this mode allocated (an output sharing no input's storage) and
    that are still alive, and their peak since `reset`."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def reset(self, *args) -> None:
        self.peak = self.live

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._alive:
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self._alive[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._freed(key, n))
        return out


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "num_speculative_tokens": 2}], ids=["plain", "ngram-k2"])
def test_profile_peak_holds_the_samplers_rows_times_vocab(monkeypatch, spec):
    """The profile run's measured peak (the allocator's counters, here counted on the CPU),
    which the KV budget is what is left after, holds the sampler's temporaries: it grows by
    several fp32 [rows, vocab] tensors per logits row (max_num_seqs x (1 + k) rows; the plain
    sampler over max_num_seqs of them, the rejection sampler over all), where the forward
    alone adds one (the logits) to a peak its activations set."""
    llm = LLM(str(DEMO_MODEL), block_size=4, max_model_len=64, max_num_batched_tokens=64, max_num_seqs=8,
              speculative_config=spec)
    runner = llm.engine.runner
    counter = _AllocatedBytes()
    for name, fn in (("reset_peak_memory_stats", counter.reset), ("synchronize", lambda *a: None),
                     ("empty_cache", lambda *a: None), ("memory_allocated", lambda *a: counter.live),
                     ("max_memory_allocated", lambda *a: counter.peak), ("memory_reserved", lambda *a: 0)):
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(runner.platform, "memory_info", lambda device: (2**34, 2**34))
    k = spec["num_speculative_tokens"] if spec else 0
    rows, peaks = [], []
    for max_seqs in ((32, 64) if not spec else (11, 21)):
        monkeypatch.setattr(runner.config.scheduler, "max_num_seqs", max_seqs)
        with counter:
            budget = runner._profile_free_memory()
        assert budget == int(2**34 * runner.config.cache.gpu_memory_utilization) - counter.peak - runner.graph_estimate
        rows.append(min(64, max_seqs * (1 + k)))
        peaks.append(counter.peak)
    fp32_row = runner.vocab_size * 4
    # the torch sampler keeps about ten [rows, V] fp32 tensors alive at once; four is a floor
    assert peaks[1] - peaks[0] >= 4 * (rows[1] - rows[0]) * fp32_row, (rows, peaks)
