"""CUDA graph memory kept out of the KV pool (engine/graph_memory.py): which graphs a layout
captures, the estimate's arithmetic (per pipeline stage), the budget, the start-up line, and
the unused part of the estimate going back to the pool (on the CPU with the capture and the
memory measurement faked); on a GPU the line after capture, with the graphs' measured memory
beside the estimate."""
import logging
import re

import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from deepserve.engine import graph_memory
from deepserve.engine.graph_memory import (GraphPlan, estimate_graph_bytes, graph_plan, graphs_line, grown_blocks,
                                           grown_line, kept_row_bytes, kv_budget, overrun_warning,
                                           unused_estimate)
from deepserve.engine.model_runner import ModelRunner
from deepserve.engine.piecewise_graphs import capture_sizes
from tests.conftest import DEMO_MODEL

MIB, GIB = 2**20, 2**30


def _config(**kw):
    return EngineArgs(max_num_seqs=64, **kw).create_engine_config()


DECODE_64 = [1, 2, 4, 8, 16, 32, 64]      # the default sizes up to max_num_seqs
MIXED_64 = DECODE_64 + [128, 256, 320]        # ... up to max_num_seqs + --mixed-graph-tokens (256)


@pytest.mark.parametrize("kw, device, backend, pp, exchange, want", [
    ({}, "cuda", "triton", 1, False, (MIXED_64, [], capture_sizes(2048))),     # FULL_AND_PIECEWISE
    ({"cudagraph_mode": "FULL_DECODE_ONLY"}, "cuda", "triton", 1, False, (DECODE_64, [], [])),
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cuda", "triton", 1, False, (MIXED_64, [], capture_sizes(2048))),
    ({"mixed_graph_tokens": 0}, "cuda", "triton", 1, False, (DECODE_64, [], capture_sizes(2048))),
    ({"cudagraph_mode": "PIECEWISE", "piecewise_max_tokens": 64}, "cuda", "triton", 1, False,
     ([], [], capture_sizes(64))),
    ({"pipeline_parallel_size": 2}, "cuda", "triton", 2, False, (DECODE_64, [], [])),   # per stage
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cuda", "triton", 1, True, (MIXED_64, [], [])),    # DP x EP
    ({"all2all_backend": "alltoall"}, "cuda", "triton", 1, True, ([], [], [])),
    ({}, "cuda", "torch", 1, False, ([], [], [])),                  # host syncs: no capture
    ({}, "cuda", "flaggems", 1, False, (MIXED_64, [], capture_sizes(2048))),  # Triton kernels + FlagGems
    ({"enforce_eager": True}, "cuda", "triton", 1, False, ([], [], [])),
    ({}, "cpu", "torch", 1, False, ([], [], [])),
])
def test_plan_follows_what_the_runner_captures(kw, device, backend, pp, exchange, want):
    plan = graph_plan(_config(**kw), device, backend, pp, exchange, splittable=True)
    assert (plan.decode_sizes, plan.mtp_sizes, plan.piecewise_sizes) == want


def test_plan_with_mtp_drafts_counts_their_rows_and_graphs():
    args = dict(model="deepseek-v2-lite", hf_overrides={"num_nextn_predict_layers": 1}, max_num_seqs=16,
                speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    cfg = EngineArgs(**args, mixed_graph_tokens=0).create_engine_config()
    plan = graph_plan(cfg, "cuda", "triton", 1, False, splittable=True)
    assert plan.decode_sizes == plan.mtp_sizes == [1, 2, 4, 8, 16, 32]      # rows: 16 x (1 + 1)
    assert plan.piecewise_sizes == capture_sizes(cfg.piecewise_max_tokens)  # the default mode's prefill graphs
    assert plan.num_sizes == 12 + len(plan.piecewise_sizes)
    # verify rows beside the default 256 prompt rows of a small mixed step: 16 x (1 + 1) + 256
    plan = graph_plan(EngineArgs(**args).create_engine_config(), "cuda", "triton", 1, False, splittable=True)
    assert plan.decode_sizes == plan.mtp_sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_estimate_and_budget_arithmetic():
    plan = GraphPlan([1, 2, 4, 8], [], [1, 2, 4, 8, 16])
    # 1,000 bytes a token over 8,192 profiled tokens; rows keep 100 bytes each
    got = estimate_graph_bytes(plan, 8_192_000, 8192, 100)
    assert got == 1000 * 8 + 1000 * 16 + 100 * (1 + 2 + 4 + 8)
    assert estimate_graph_bytes(GraphPlan(), 8_192_000, 8192, 100) == 0
    gib = GIB
    # 80 GiB device at 0.9, 20 GiB peak, 1 GiB held by another process (free 58, reserved 21)
    assert kv_budget(80 * gib, 0.9, 20 * gib, 58 * gib, 21 * gib, 0) == int(72 * gib - 20 * gib - gib)
    assert kv_budget(80 * gib, 0.9, 20 * gib, 58 * gib, 21 * gib, gib // 2) == int(72 * gib - 21.5 * gib)


def test_graphs_line():
    plan = GraphPlan([1, 2], [], [1, 2, 4])
    line = graphs_line(plan, 3.25, 3 * 2**29, 2**30)
    assert line == ("CUDA graphs: 5 sizes (2 decode, 3 piecewise) captured in 3.2 s, 1.50 GiB; "
                    "1.00 GiB was estimated and kept from the KV pool")
    assert "sized by --num-gpu-blocks-override" in graphs_line(plan, 1.0, 0, None)


def test_only_the_last_pipeline_stage_keeps_logits_rows():
    """R1 (vocab 129,280, hidden 7,168, bf16) over two stages at max_num_seqs 256: decode graphs
    of 1..256 rows (511 in all). The last stage keeps hidden states and logits per row, the
    first the (hidden, residual) pair it sends on, 0.12 GiB less."""
    cfg = EngineArgs(model="deepseek-r1", load_format="dummy", max_num_seqs=256,
                     pipeline_parallel_size=2).create_engine_config()
    hf = cfg.model.hf_config
    first, last = (graph_plan(cfg, "cuda", "triton", 2, False, True, pp_rank=r) for r in (0, 1))
    assert first.decode_sizes == last.decode_sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (first.last_stage, last.last_stage) == (False, True)
    assert graph_plan(cfg, "cuda", "triton", 1, False, True).last_stage      # one stage: its own last
    assert kept_row_bytes(last, hf.vocab_size, hf.hidden_size, 2) == (129_280 + 7_168) * 2
    assert kept_row_bytes(first, hf.vocab_size, hf.hidden_size, 2) == 2 * 7_168 * 2

    def estimate(plan):   # 10 KiB of activations a token, profiled at 8,192 tokens
        return estimate_graph_bytes(plan, 10_240 * 8192, 8192, kept_row_bytes(plan, hf.vocab_size, hf.hidden_size, 2))
    assert estimate(last) == 10_240 * 256 + 511 * (129_280 + 7_168) * 2
    assert estimate(first) == 10_240 * 256 + 511 * 2 * 7_168 * 2
    assert (estimate(last) - estimate(first)) / GIB == pytest.approx(0.1162, abs=1e-4)


@pytest.mark.parametrize("estimate, taken, want", [
    (4 * GIB, GIB, 3 * GIB),                 # three quarters unused
    (4 * GIB, 3 * GIB + 512 * MIB, 0),       # 0.5 GiB unused: not over a quarter of the estimate
    (512 * MIB, 0, 512 * MIB),               # the capture failed: all of it
    (200 * MIB, 0, 0),                       # not over 256 MiB
    (GIB, 2 * GIB, 0),                       # the graphs took more than the estimate
    (GIB, -5 * MIB, GIB),                    # the allocator released more than capture took
])
def test_unused_estimate_thresholds(estimate, taken, want):
    assert unused_estimate(estimate, taken) == want


def test_overrun_warning_where_the_graphs_took_much_more():
    assert overrun_warning(GIB, GIB + 200 * MIB) is None            # not over 256 MiB
    assert overrun_warning(4 * GIB, 4 * GIB + 512 * MIB) is None    # not over a quarter
    assert overrun_warning(GIB, GIB) is None and overrun_warning(GIB, 0) is None
    assert overrun_warning(GIB, 2 * GIB) == (
        "the CUDA graphs took 2.00 GiB, 1.00 GiB more than the 1.00 GiB estimate kept from the KV pool: eager "
        "steps may run out of device memory; lower --gpu-memory-utilization or --max-num-batched-tokens")


def test_grown_blocks_within_what_the_sequences_can_use():
    assert grown_blocks(100, 7 * 1000 + 999, 1000, 10_000) == 107
    assert grown_blocks(100, 10**9, 1000, 150) == 150       # max_num_seqs full-length sequences
    assert grown_blocks(100, 10**9, 1000, 80) == 100        # never smaller
    assert grown_blocks(100, 0, 1000, 10_000) == 100
    assert grown_line(100, 107, 4 * GIB, GIB, 2.5) == (
        "KV pool grown from 100 to 107 blocks: the CUDA graphs took 1.00 GiB of the 4.00 GiB estimate kept "
        "from it; decode graphs captured again over the bigger pool in 2.5 s")
    assert grown_line(100, 107, GIB, 0, None).endswith("took 0.00 GiB of the 1.00 GiB estimate kept from it")


class _FakeGraphs:
    """Stands for a CudaGraphRunner on the CPU: records the pool it was captured over and
    never replays (every step runs eagerly)."""

    def __init__(self, runner, enabled: bool):
        self.enabled = enabled
        self.graphs = {1: None, 2: None} if enabled else {}
        self.pool_blocks = [m.kv_cache[0].shape[0] for m in runner.kv_layers]
        self.pool_ptrs = [m.kv_cache[0].data_ptr() for m in runner.kv_layers]

    def can_run(self, meta) -> bool:
        return False

    def fits_as_rows(self, batch, mixed_tokens: int, drafts: int = 0) -> bool:
        return False           # mixed steps stay off the graphs too


def _fake_gpu_start(monkeypatch, estimate_blocks: int, taken_blocks: int, capture_ok: bool = True):
    """ModelRunner's start on the CPU as on a GPU: the pool sizing keeps `estimate_blocks`
    blocks' bytes for graphs; each whole-graph capture takes `taken_blocks` blocks' bytes of
    the allocator (fake reserved-memory counter) and records the pool it saw."""
    reserved = [0]
    captures: list[_FakeGraphs] = []
    decide = ModelRunner._decide_num_blocks

    def decide_num_blocks(self):
        blocks = decide(self)
        self.graph_estimate = estimate_blocks * self.bytes_per_block()
        return blocks

    def capture_whole_graphs(self):
        self.graphs = _FakeGraphs(self, capture_ok)
        captures.append(self.graphs)
        reserved[0] += taken_blocks * self.bytes_per_block() if capture_ok else 0
        return True

    monkeypatch.setattr(ModelRunner, "_decide_num_blocks", decide_num_blocks)
    monkeypatch.setattr(ModelRunner, "_capture_whole_graphs", capture_whole_graphs)
    monkeypatch.setattr(ModelRunner, "_reserved_after_empty_cache", lambda self: reserved[0])
    monkeypatch.setattr(graph_memory, "GIVE_BACK_MIN_BYTES", 0)   # the demo model's blocks are small
    return captures


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 40, 41, 26, 7]}, {"prompt_token_ids": [1, 9]}]
ENGINE = dict(block_size=4, max_model_len=64, max_num_seqs=4)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _pool_bytes(blocks: int) -> int:
    probe = LLM(str(DEMO_MODEL), num_gpu_blocks_override=16, **ENGINE)   # 16 x 4 tokens: max_model_len
    try:
        return blocks * probe.engine.runner.bytes_per_block()
    finally:
        probe.shutdown()


@pytest.mark.parametrize("capture_ok", [True, False])
def test_unused_estimate_grows_the_pool_and_decode_graphs_are_captured_again(monkeypatch, caplog, capture_ok):
    """A 20-block pool after 10 blocks' bytes were kept for graphs that take 3 (or, when their
    capture fails, none): the pool grows by 7 (or 10) blocks, reallocated, and the decode graphs
    are captured again over the new pool (none after a failed capture); the engine's block
    manager gets the grown count and its outputs are the reference's."""
    reference = _tokens(LLM(str(DEMO_MODEL), **ENGINE))
    kv_bytes = _pool_bytes(20)
    captures = _fake_gpu_start(monkeypatch, estimate_blocks=10, taken_blocks=3, capture_ok=capture_ok)
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM(str(DEMO_MODEL), kv_cache_memory_bytes=kv_bytes, **ENGINE)
    runner = llm.engine.runner
    grown = 27 if capture_ok else 30
    assert runner.num_blocks == llm.engine.block_manager.num_blocks == grown
    assert all(t.shape[0] == grown for m in runner.kv_layers for t in m.kv_cache)
    if capture_ok:
        assert [c.pool_blocks[0] for c in captures] == [20, grown]
        assert runner.graphs is captures[-1]
        # the second capture ran over the pool as it is now (the old one's addresses may be reused)
        assert captures[-1].pool_ptrs == [m.kv_cache[0].data_ptr() for m in runner.kv_layers]
        assert "KV pool grown from 20 to 27 blocks" in caplog.text
        assert "decode graphs captured again over the bigger pool" in caplog.text
    else:
        assert len(captures) == 1 and not runner.graphs.enabled
        assert "KV pool grown from 20 to 30 blocks" in caplog.text
        assert "captured again" not in caplog.text
    assert _tokens(llm) == reference


def test_small_unused_estimate_leaves_the_pool(monkeypatch, caplog):
    """Graphs that took 9 of the 10 blocks' bytes kept for them: the pool stays as sized, its
    tensors and the graphs over them untouched."""
    kv_bytes = _pool_bytes(20)
    captures = _fake_gpu_start(monkeypatch, estimate_blocks=10, taken_blocks=9)
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM(str(DEMO_MODEL), kv_cache_memory_bytes=kv_bytes, **ENGINE)
    runner = llm.engine.runner
    assert runner.num_blocks == 20 and len(captures) == 1
    assert captures[0].pool_ptrs == [m.kv_cache[0].data_ptr() for m in runner.kv_layers]
    assert "KV pool grown" not in caplog.text


def test_graphs_over_the_estimate_warn(monkeypatch, caplog):
    """Graphs that took 9 blocks' bytes where 2 were kept for them: a warning, the pool as sized."""
    kv_bytes = _pool_bytes(20)
    _fake_gpu_start(monkeypatch, estimate_blocks=2, taken_blocks=9)
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM(str(DEMO_MODEL), kv_cache_memory_bytes=kv_bytes, **ENGINE)
    assert llm.engine.runner.num_blocks == 20
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "more than the" in r.getMessage()]
    assert len(warned) == 1 and "eager steps may run out of device memory" in warned[0].getMessage()


@pytest.mark.gpu
def test_gpu_graph_memory_logged_beside_the_estimate(caplog):
    """On a CUDA device: decode and piecewise graphs of an 8B-wide Llama (2 layers, dummy
    weights) take memory that the line reports, and the estimate kept from the pool is within
    a factor of 3 of it."""
    from deepserve import LLM, SamplingParams
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM("r1-distill-llama-8b", hf_overrides={"num_hidden_layers": 2}, max_model_len=4096,
                  gpu_memory_utilization=0.5, compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"})
    try:
        m = re.search(r"CUDA graphs: (\d+) sizes \((\d+) decode, (\d+) piecewise\) captured in [\d.]+ s, "
                      r"([\d.]+) GiB; ([\d.]+) GiB was estimated", caplog.text)
        assert m, caplog.text
        taken, estimate = float(m.group(4)), float(m.group(5))
        print(f"graphs took {taken:.3f} GiB, estimated {estimate:.3f} GiB")
        assert taken > 0 and estimate / 3 <= taken <= estimate * 3
        assert llm.engine.runner.graph_estimate == pytest.approx(estimate * 2**30, rel=0.01, abs=2**20)
        out = llm.generate({"prompt_token_ids": list(range(10, 2010))}, SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4      # an eager step beyond the graphs still fits
    finally:
        llm.shutdown()


@pytest.mark.gpu
def test_gpu_pool_grown_after_capture_decodes_as_before(monkeypatch, caplog):
    """On a CUDA device, with the estimate 2 GiB above the arithmetic's: after capture the pool
    grows by what the graphs did not take of it, the decode graphs are captured again over the
    new pool, and greedy decodes (replaying those graphs, which read the KV the prompts wrote
    into the new pool) give the tokens of an engine sized by the plain estimate."""
    from deepserve.engine import model_runner
    # 256 sequences of 64k tokens could use more than half the device: the budget, not that,
    # sizes the pool
    kw = dict(hf_overrides={"num_hidden_layers": 2}, max_model_len=65536, gpu_memory_utilization=0.5)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 10 for j in range(40 + 9 * i)]} for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM("r1-distill-llama-8b", **kw) as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        plain_blocks = llm.engine.runner.num_blocks
    estimate = model_runner.estimate_graph_bytes
    monkeypatch.setattr(model_runner, "estimate_graph_bytes", lambda *args: estimate(*args) + 2 * GIB)
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM("r1-distill-llama-8b", **kw)
    with llm:
        runner = llm.engine.runner
        m = re.search(r"KV pool grown from (\d+) to (\d+) blocks: the CUDA graphs took ([\d.]+) GiB of the "
                      r"([\d.]+) GiB estimate kept from it; decode graphs captured again", caplog.text)
        assert m, caplog.text
        old, new, taken, kept = int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
        print(f"pool {old} -> {new} blocks (plain estimate: {plain_blocks}); graphs took {taken:.2f} of {kept:.2f} GiB")
        assert new == runner.num_blocks == llm.engine.block_manager.num_blocks
        assert (new - old) * runner.bytes_per_block() / GIB == pytest.approx(kept - taken, abs=0.02)
        # the plain engine's pool was sized by the estimate (kept - 2 GiB), the grown one by what the
        # graphs took: they differ by the estimate's error, not more (0.05 GiB: the log's rounding and
        # the allocator's state after the first engine)
        expected = plain_blocks + ((kept - 2) - taken) * GIB / runner.bytes_per_block()
        assert abs(new - expected) * runner.bytes_per_block() <= 0.05 * GIB, (new, expected)
        assert runner.graphs is not None and runner.graphs.enabled
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == reference
