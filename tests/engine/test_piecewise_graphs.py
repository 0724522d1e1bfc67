"""Piecewise CUDA graphs (engine/piecewise_graphs.py). On the CPU the pieces run as plain calls
over the same padded static buffers, with eager attention between them: that equals the
model's forward (hidden states and the KV written) on stories260k and a tiny DeepSeek-V3
(MLA + MoE) over prompt-only, mixed and decode-only steps, whose padding rows hold stale data
of larger earlier steps, both with outputs copied into buffers and handed on as they are; the
engine steps through them (greedy text equals the plain engine's); cudagraph_mode maps onto
the settings. The `gpu` tests capture the pieces (both ways) and compare their replay with the
eager forward and an eager engine, and check that an alias holds no memory."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.cli.main import build_parser, normalize_argv
from deepserve.config import EngineArgs
from deepserve.engine.piecewise_graphs import (PiecewiseGraphs, alias, capture_for, capture_sizes, layout_reason, restride,
                                               span_elements, splittable)
from tests.conftest import DEMO_MODEL
from tests.models.hf_reference import load_ours
from tests.models.paged_harness import allocate_kv_cache, build_meta

BLOCK, BLOCKS_PER_SEQ = 4, 8
# (q_lens, seq_lens) of three consecutive steps over four sequences (decodes first): prompts
# (the last one a first chunk), two decodes beside a chunk with context, then decodes only
STEPS = [([7, 5, 9, 6], [7, 5, 9, 6]),
         ([1, 1, 1, 8], [8, 6, 10, 14]),
         ([1, 1, 1, 1], [9, 7, 11, 15])]
SIZES = [8, 16, 32]   # 27, 11 and 4 tokens run padded to 32, 16 and 8 rows

TINY_V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=256,
               hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
               n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
               routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
               max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
               torch_dtype="float32")


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_v3")
    (path / "config.json").write_text(json.dumps(TINY_V3))
    return path


def kv_caches(model) -> list[list[torch.Tensor]]:
    return [m.kv_cache for m in model.modules() if hasattr(m, "kv_cache_shapes")]


def use_caches(model, caches) -> None:
    for m, c in zip([m for m in model.modules() if hasattr(m, "kv_cache_shapes")], caches):
        m.kv_cache = c


def on_device(meta, device):
    return dataclasses.replace(meta, **{f.name: getattr(meta, f.name).to(device) for f in dataclasses.fields(meta)
                                        if isinstance(getattr(meta, f.name), torch.Tensor)})


@torch.no_grad()
def compare_steps(model, vocab: int, pieces: PiecewiseGraphs, tol: float = 1e-5) -> list[int]:
    """Run STEPS through the model's forward and through `pieces`, each on a KV pool of its own
    (whatever its block size); assert equal hidden states and pools after every step. Returns the
    padded sizes."""
    dev = pieces.device
    ref_pool = kv_caches(model)
    block = ref_pool[0][0].shape[1]
    pieces_pool = [[c.clone() for c in caches] for caches in ref_pool]
    gen = torch.Generator().manual_seed(0)
    padded = []
    for q_lens, seq_lens in STEPS:
        meta, positions = build_meta(q_lens, seq_lens, block, BLOCKS_PER_SEQ * BLOCK // block)
        meta, positions = on_device(meta, dev), positions.to(dev)
        ids = torch.randint(0, vocab, (sum(q_lens),), generator=gen).to(dev)
        use_caches(model, ref_pool)
        want = model(ids, positions, meta)
        use_caches(model, pieces_pool)
        got = pieces.run(ids, positions, meta)
        padded.append(pieces.size_for(ids.shape[0]))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for ref, ours in zip(ref_pool, pieces_pool):
            for a, b in zip(ref, ours):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    use_caches(model, ref_pool)
    return padded


def cpu_pieces(model, copy_outputs: bool) -> PiecewiseGraphs:
    allocate_kv_cache(model, BLOCKS_PER_SEQ * 4, BLOCK)
    return PiecewiseGraphs(model, max(SIZES), torch.device("cpu"), sizes=SIZES, copy_outputs=copy_outputs)


@pytest.mark.parametrize("copy_outputs", [True, False])
def test_pieces_equal_the_forward_llama(copy_outputs):
    model = load_ours(DEMO_MODEL)
    assert splittable(model)
    pieces = cpu_pieces(model, copy_outputs)
    assert compare_steps(model, model.config.vocab_size, pieces) == [32, 16, 8]
    assert pieces.steps == len(STEPS) and pieces.replays == 0    # nothing captured on the CPU


@pytest.mark.parametrize("copy_outputs", [True, False])
def test_pieces_equal_the_forward_deepseek_v3(tiny_v3, copy_outputs):
    model = load_ours(tiny_v3, load_format="dummy")
    assert splittable(model) and any(layer.is_moe for layer in model.model.layers)
    assert compare_steps(model, TINY_V3["vocab_size"], cpu_pieces(model, copy_outputs)) == [32, 16, 8]


@pytest.mark.parametrize("copy_outputs", [True, False])
def test_padding_rows_do_not_reach_the_real_rows(copy_outputs):
    """A step padded to 32 rows whose padding holds huge values gives the unpadded result."""
    model = load_ours(DEMO_MODEL)
    allocate_kv_cache(model, BLOCKS_PER_SEQ * 4, BLOCK)
    q_lens, seq_lens = STEPS[0]
    meta, positions = build_meta(q_lens[:2], seq_lens[:2], BLOCK, BLOCKS_PER_SEQ)
    ids = torch.arange(12) % model.config.vocab_size
    with torch.no_grad():
        want = model(ids, positions, meta)
        pieces = PiecewiseGraphs(model, 32, torch.device("cpu"), sizes=[32], copy_outputs=copy_outputs)
        pieces.run(ids, positions, meta)
        pieces.input_ids[12:] = model.config.vocab_size - 1
        pieces.positions[12:] = 200
        for buf in pieces.buffers.values():
            buf[12:] = 1e4
        assert set(pieces.buffers) == ({"attn_out", "residual", "part0", "part1", "part2", "hidden"}
                                       if copy_outputs else {"attn_out"})
        got = pieces.run(ids, positions, meta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restride_sees_the_bytes_as_the_tensor(dtype):
    """`alias`'s view of raw bytes (here over CPU memory): v of a fused qkv, strided, with an offset."""
    qkv = torch.randn(5, 24).to(dtype)
    v = qkv[:, 16:].view(5, 2, 4)
    assert span_elements(v) == 4 * 24 + 8 and span_elements(qkv[:0]) == 0
    nbytes = span_elements(v) * v.element_size()
    raw = torch.empty(0, dtype=torch.uint8).set_(v.untyped_storage(), v.storage_offset() * v.element_size(),
                                                 (nbytes,), (1,))
    seen = restride(raw, v)
    assert seen.data_ptr() == v.data_ptr() and seen.stride() == v.stride() and torch.equal(seen, v)


def test_capture_sizes():
    sizes = capture_sizes(512)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-3:] == [480, 496, 512]
    assert all(b - a <= 16 for a, b in zip(sizes[3:], sizes[4:]))
    assert capture_sizes(100)[-2:] == [96, 100] and capture_sizes(1) == [1]
    # above 512, every 64 tokens: 2,048 takes 24 sizes more than 512, not 96
    big = capture_sizes(2048)
    assert big[:len(sizes)] == sizes and big[len(sizes):] == list(range(576, 2049, 64))
    assert capture_sizes(600)[-3:] == [512, 576, 600]
    pieces = PiecewiseGraphs(load_ours(DEMO_MODEL), 100, torch.device("cpu"))
    assert [pieces.size_for(n) for n in (1, 3, 9, 97, 100)] == [1, 4, 16, 100, 100]
    assert pieces.can_run(100) and not pieces.can_run(101)
    with pytest.raises(ValueError, match="max_tokens >= 1, got 0"):
        PiecewiseGraphs(load_ours(DEMO_MODEL), 0, torch.device("cpu"))


def test_engine_steps_through_the_pieces():
    """An engine whose runner steps through uncaptured pieces (the path a CUDA runner takes
    with PIECEWISE) gives the plain engine's greedy tokens; steps of more than max_tokens
    tokens run the plain forward."""
    prompts = ["Once upon a time", "The dog saw a big red ball and", "Lily", "Tom and Lily went to the park"]
    params = SamplingParams(temperature=0, max_tokens=20)
    plain = LLM(block_size=4)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    llm = LLM(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.piecewise is None   # the CPU captures nothing
    runner.piecewise = PiecewiseGraphs(runner.model, 8, runner.device)
    seen, real = [], runner.piecewise.run
    runner.piecewise.run = lambda ids, *a: (seen.append(ids.shape[0]), real(ids, *a))[1]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert seen and max(seen) <= 8 and runner.piecewise.steps == len(seen)
    assert llm.engine.gauges()["steps"] > len(seen)     # the 16-token prompt steps ran unsplit


@pytest.mark.parametrize("kwargs, mode, eager, max_tokens", [
    ({}, "FULL_AND_PIECEWISE", False, 2048),
    ({"cudagraph_mode": "FULL_DECODE_ONLY"}, "FULL_DECODE_ONLY", False, 2048),
    ({"compilation_config": {"cudagraph_mode": "piecewise"}}, "PIECEWISE", False, 2048),
    ({"compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE", "max_cudagraph_capture_size": 128}},
     "FULL_AND_PIECEWISE", False, 128),
    ({"cudagraph_mode": "full_and_piecewise", "piecewise_max_tokens": 2048, "max_num_batched_tokens": 1024},
     "FULL_AND_PIECEWISE", False, 1024),
    ({"compilation_config": {"cudagraph_mode": "NONE"}}, "NONE", True, 2048),
])
def test_cudagraph_mode_settings(kwargs, mode, eager, max_tokens):
    args = EngineArgs(**kwargs)
    config = args.create_engine_config()
    assert (config.cudagraph_mode, config.enforce_eager, config.piecewise_max_tokens) == (mode, eager, max_tokens)


@pytest.mark.parametrize("model, kwargs, max_tokens", [
    ("deepseek-v2-lite", {}, 2048),
    ("deepseek-v2-lite", {"piecewise_max_tokens": 512}, 512),
    ("r1-distill-llama-8b", {}, 2048),
    ("r1-distill-llama-8b", {"max_num_batched_tokens": 1024}, 1024),
    ("deepseek-v2-lite", {"compilation_config": {"max_cudagraph_capture_size": 1024}}, 1024),
])
def test_piecewise_max_tokens_default_by_model(model, kwargs, max_tokens):
    assert EngineArgs(model=model, **kwargs).create_engine_config().piecewise_max_tokens == max_tokens


def test_cudagraph_mode_flags():
    args = build_parser().parse_args(normalize_argv(
        ["serve", "m", "--cudagraph-mode", "FULL_AND_PIECEWISE", "--piecewise-max-tokens", "256"]))
    assert (args.cudagraph_mode, args.piecewise_max_tokens) == ("FULL_AND_PIECEWISE", 256)


@pytest.mark.parametrize("kwargs, message", [
    ({"cudagraph_mode": "SOMETIMES"}, "cudagraph_mode must be one of NONE, PIECEWISE"),
    ({"piecewise_max_tokens": 0}, "piecewise_max_tokens must be >= 1, got 0"),
])
def test_cudagraph_mode_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


def test_layouts_without_pieces_say_why():
    """The runner logs this reason where a piecewise cudagraph_mode meets a layout it does not
    cover, instead of running those steps eagerly without a word."""
    assert layout_reason(1, False) is None
    assert "2 pipeline stages" in layout_reason(2, False)
    assert "DP attention + EP" in layout_reason(1, True)


# --------------------------------------------------------------------------- on a CUDA device
def piecewise_llm(model: str, mode: str = "FULL_AND_PIECEWISE", **kwargs) -> LLM:
    """An engine on CUDA with Triton ops and piecewise graphs up to 64 tokens (FULL_AND_PIECEWISE:
    and decode graphs)."""
    return LLM(model=model, dtype="float32", block_size=16, ops="triton", num_gpu_blocks_override=64,
               compilation_config={"cudagraph_mode": mode}, piecewise_max_tokens=64, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("copy_outputs", [True, False])
@pytest.mark.parametrize("which", ["llama", "deepseek_v3"])
def test_gpu_captured_pieces_equal_the_eager_forward(which, copy_outputs, tiny_v3):
    """Captured pieces (the runner's, which copy their outputs; or aliased outputs, captured
    here) replay prompt, mixed and decode steps (27, 11, 4 tokens -> sizes 32, 16, 4) with the
    eager forward's hidden states and KV, one replay per piece."""
    llm = piecewise_llm(str(DEMO_MODEL) if which == "llama" else str(tiny_v3),
                        **({} if which == "llama" else {"load_format": "dummy"}))
    runner = llm.engine.runner
    pieces = runner.piecewise
    assert pieces is not None, "piecewise capture failed or was skipped: see the log's warning"
    if not copy_outputs:
        pieces = capture_for(runner.model, runner.ops, 64, runner.device, copy_outputs=False)
        assert pieces is not None and not pieces.buffers.keys() - {"attn_out"}
    assert sorted(pieces.graphs) == capture_sizes(64) and all(len(g) == pieces.num_pieces
                                                               for g in pieces.graphs.values())
    replays, steps = pieces.replays, pieces.steps
    with torch.inference_mode():
        # (Triton's fp32 dots round inputs to tf32: a GEMM of another shape may sum differently)
        assert compare_steps(runner.model, runner.vocab_size, pieces, tol=2e-3) == [32, 16, 4]
    assert (pieces.replays - replays, pieces.steps - steps) == (len(STEPS) * pieces.num_pieces, len(STEPS))
    llm.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_gpu_engine_with_piecewise_graphs_equals_eager(mode):
    """Greedy tokens of an engine replaying piecewise graphs for its prompt and mixed steps
    (prompts arrive while others decode; with PIECEWISE its decode steps too) equal an eager
    engine's."""
    prompts = ["Once upon a time", "The dog saw a big red ball and", "Lily", "Tom and Lily went to the park"]
    params = SamplingParams(temperature=0, max_tokens=32)
    with LLM(dtype="float32", block_size=16, enforce_eager=True) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    with piecewise_llm(str(DEMO_MODEL), mode) as llm:
        eng, pieces = llm.engine, llm.engine.runner.piecewise
        assert pieces is not None and (eng.runner.graphs is None) == (mode == "PIECEWISE")
        outputs = {}
        for i, p in enumerate(prompts):   # each prompt joins the running ones: mixed steps
            eng.add_request(str(i), p, params)
            for _ in range(3):
                for out in eng.step():
                    if out.finished:
                        outputs[int(out.request_id)] = out.outputs[0].token_ids
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    outputs[int(out.request_id)] = out.outputs[0].token_ids
        assert [outputs[i] for i in range(len(prompts))] == want
        assert pieces.steps >= len(prompts) and pieces.replays == pieces.steps * pieces.num_pieces
        if mode == "PIECEWISE":   # the decode steps too: at least one a generated token
            assert pieces.steps >= params.max_tokens


@pytest.mark.gpu
def test_gpu_alias_does_not_hold_memory():
    base = torch.randn(1000, 64, device="cuda").to(torch.bfloat16)
    t = base[3:, 8:24].view(997, 2, 8)
    a = alias(t)
    assert (a.data_ptr(), a.shape, a.stride(), a.dtype) == (t.data_ptr(), t.shape, t.stride(), t.dtype)
    assert torch.equal(a, t)
    held = torch.cuda.memory_allocated()
    del base, t
    assert torch.cuda.memory_allocated() <= held - 1000 * 64 * 2
