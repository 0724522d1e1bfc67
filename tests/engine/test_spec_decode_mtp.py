"""MTP speculative decoding through LLMEngine.step on a tiny DeepSeek-V3 whose checkpoint
carries an MTP layer as R1 saves it (model.layers.{N}.*: enorm, hnorm, eh_proj, embed_tokens,
shared_head, one decoder layer): greedy output with k = 1 and k = 3 equals plain decoding
token for token, every block is free afterwards. (Random MTP weights draft badly, so this shows
exactness, not acceptance.)"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams
from tests.models.test_deepseek import r1_style, save_deepseek

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123], [200, 11, 54, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 31]]


@pytest.fixture(scope="module")
def r1_with_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("r1_mtp_engine")
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), path)
    main = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    # the MTP block: layer 3's tensors, perturbed; its own parts random
    mtp = {name.replace("model.layers.3.", "model.layers.4."): t + 0.05 * torch.randn(t.shape, generator=gen)
           for name, t in main.items() if name.startswith("model.layers.3.")}
    d, v = 64, 256
    for part, shape in {"embed_tokens.weight": (v, d), "eh_proj.weight": (d, 2 * d),
                        "shared_head.head.weight": (v, d)}.items():
        mtp[f"model.layers.4.{part}"] = 0.2 * torch.randn(shape, generator=gen)
    for part in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        mtp[f"model.layers.4.{part}"] = 1.0 + 0.1 * torch.randn(d, generator=gen)
    save_file(mtp, str(path / "model-mtp.safetensors"))
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return str(path)


@pytest.fixture(scope="module")
def plain_outputs(r1_with_mtp):
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4)
    params = SamplingParams(temperature=0, max_tokens=24)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_mtp_equals_plain(r1_with_mtp, plain_outputs, k):
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4,
              speculative_config={"method": "mtp", "num_speculative_tokens": k})
    assert llm.engine.runner.model.mtp is not None
    got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in got] == plain_outputs
    g = llm.engine.gauges()
    assert g["spec_decode_num_drafts"] > 0 and g["spec_decode_num_draft_tokens"] >= g["spec_decode_num_drafts"]
    assert g["spec_decode_num_draft_tokens"] <= k * g["spec_decode_num_drafts"]
    assert g["num_free_blocks"] == g["num_blocks"]


@pytest.mark.parametrize("decode_rows", [False, True], ids=["flat", "decode-rows"])
def test_engine_mtp_drafts_equal_drafts_from_scratch(r1_with_mtp, decode_rows):
    """The drafts the engine keeps after each step (its MTP KV built step by step over kept
    positions, accepted drafts and emitted tokens) equal the drafts of the same module run once
    over the whole sequence with the target's hidden states; also when the verify step and the
    module run as one-token rows (as where CUDA graphs replay them)."""
    from deepserve.engine.mtp_proposer import MTPProposer
    from tests.models.paged_harness import allocate_kv_cache, build_meta

    k = 2
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4,
              speculative_config={"method": "mtp", "num_speculative_tokens": k})
    engine = llm.engine
    if decode_rows:
        from tests.engine.eager_graphs import install
        install(llm, max_bs=64)
    rid = engine.add_request(None, {"prompt_token_ids": PROMPTS[2]}, SamplingParams(temperature=0, max_tokens=12))
    seq = engine.requests[rid].seqs[0]
    snapshots = []
    while engine.has_unfinished_requests():
        engine.step()
        if not seq.is_finished:
            snapshots.append((list(seq.token_ids), engine.spec.pending.get(seq)))
    assert len(snapshots) >= 3 and all(d is not None and len(d) == k for _, d in snapshots)
    model = engine.runner.model
    for tokens, drafts in snapshots:
        n = len(tokens) - 1
        allocate_kv_cache(model, 16, 4)
        meta, positions = build_meta([n], [n], 4, 16)
        with torch.no_grad():
            hidden = model(torch.tensor(tokens[:-1]), positions, meta)
        want, _ = MTPProposer(model.mtp[0], k, 4, 64).propose(hidden, torch.tensor(tokens[1:]), positions, meta)
        assert want[0].tolist() == drafts, tokens


def test_greedy_to_the_context_end_with_mtp(r1_with_mtp):
    """A request that runs to the end of a context as long as the model's positions (a chat
    request without max_tokens): the drafts made near the end reach past it (positions 64 and
    on, beyond the rotary table), are dropped, and the output is the plain one to position 64."""
    kw = dict(dtype="float32", block_size=4, max_model_len=64, hf_overrides={"max_position_embeddings": 64})
    params = SamplingParams(temperature=0, max_tokens=64 - len(PROMPTS[0]), ignore_eos=True)
    plain = LLM(model=r1_with_mtp, **kw).generate([{"prompt_token_ids": PROMPTS[0]}], params)[0].outputs[0]
    llm = LLM(model=r1_with_mtp, speculative_config={"method": "mtp", "num_speculative_tokens": 3}, **kw)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (plain.token_ids, "length") and len(out.token_ids) == 57
    g = llm.engine.gauges()
    assert g["num_free_blocks"] == g["num_blocks"]

def test_fp8_checkpoint_keeps_the_mtp_layers_experts_in_fp8(r1_with_mtp, tmp_path):
    """The checkpoint in DeepSeek's FP8 format (`convert quantize --method fp8-block`, the MTP
    layer in its own shard): the MTP block's routed experts and linears stay e4m3 with their
    block scales, and greedy output with MTP k = 2 equals plain decoding of the same folder."""
    from deepserve.quant import quantize_checkpoint
    fp8 = tmp_path / "fp8"
    quantize_checkpoint(r1_with_mtp, fp8, "fp8-block", progress=False)
    prompts, params = [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=24)
    plain = [o.outputs[0].token_ids for o in LLM(model=str(fp8), dtype="float32", block_size=4).generate(prompts, params)]
    llm = LLM(model=str(fp8), dtype="float32", block_size=4, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    block = llm.engine.runner.model.mtp[0].mtp_block
    experts = block.mlp.experts
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == torch.float8_e4m3fn
    assert experts.w13_weight_scale_inv.dtype == torch.float32
    assert block.self_attn.o_proj.weight.dtype == block.mlp.shared_experts.down_proj.weight.dtype == torch.float8_e4m3fn
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain
    g = llm.engine.gauges()
    assert g["spec_decode_num_drafts"] > 0 and g["num_free_blocks"] == g["num_blocks"]


def test_async_scheduling_with_mtp_equals_plain(r1_with_mtp, plain_outputs):
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4, async_scheduling=True,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert llm.engine.async_scheduling
    got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in got] == plain_outputs
    g = llm.engine.gauges()
    assert g["spec_decode_num_drafts"] > 0 and g["num_free_blocks"] == g["num_blocks"]


def test_tp2_greedy_with_mtp_equals_plain(r1_with_mtp, plain_outputs, monkeypatch):
    """TP=2 (gloo): the MTP layer is sharded like the target's (vocab-parallel embedding and
    head, TP attention and experts); both ranks keep the verify step's hidden states and run
    the MTP step their driver publishes, drafting the same tokens from gathered logits; also
    after the start-up warm-up (as on a GPU), whose verify and MTP steps both ranks run."""
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    prompts, params = [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=24)

    def drafts_seen(llm):
        seen, real = [], llm.engine.spec.verify
        llm.engine.spec.verify = lambda logits, seqs, drafts: (seen.append(drafts), real(logits, seqs, drafts))[1]
        return seen
    small = dict(max_model_len=64, max_num_batched_tokens=64)    # (a short warm-up)
    with LLM(model=r1_with_mtp, dtype="float32", block_size=4, speculative_config=spec, **small) as one:
        want = drafts_seen(one)
        one.generate(prompts, params)
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    with LLM(model=r1_with_mtp, dtype="float32", block_size=4, tensor_parallel_size=2,
             speculative_config=spec, **small) as llm:
        assert llm.engine.runner.timings["warm_up_s"] > 0
        got_drafts = drafts_seen(llm)
        got = llm.generate(prompts, params)
        g = llm.engine.gauges()
    assert [o.outputs[0].token_ids for o in got] == plain_outputs
    # the same drafts, step by step, as the MTP layer drafts in one process
    assert len(want) > 5 and got_drafts == want
    assert g["num_free_blocks"] == g["num_blocks"]


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_warm_up_drafts_writes_nothing_and_keeps_greedy_outputs(r1_with_mtp, monkeypatch, k):
    """With mtp the warm-up runs the MTP module after every step, its k draft forwards
    included; greedy tokens with the warm-up (DEEPSERVE_WARM_UP=1) equal those without it
    (=0), and running it again on the serving engine leaves every pool (the module's too) and
    the prefix cache as they were."""
    from deepserve.engine.step_inputs import MTPStepMessage, StepMessage
    from tests.engine.test_warm_up import serves_again, warm_up_again
    kw = dict(model=r1_with_mtp, dtype="float32", block_size=4, max_model_len=64, max_num_batched_tokens=64,
              max_num_seqs=8, speculative_config={"method": "mtp", "num_speculative_tokens": k})
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=12)
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "0")
    reference = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params)]
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    llm = LLM(**kw)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == reference
    mtp = llm.engine.runner.mtp
    forwards = []
    forward = mtp.forward
    monkeypatch.setattr(mtp, "forward", lambda ids, *a: forwards.append(ids.shape[0]) or forward(ids, *a))
    published = warm_up_again(llm)
    warm_forwards = list(forwards)
    serves_again(llm, prompts, params, reference)
    steps = [m for m in published if isinstance(m, StepMessage)]
    mtp_steps = [m for m in published if isinstance(m, MTPStepMessage)]
    assert len(mtp_steps) == len(steps) > 10 and all(m.warm_up and m.keep_hidden for m in steps)
    assert all(m.warm_up for m in mtp_steps)
    assert [m.target_rows for m in mtp_steps] == [list(range(m.inputs.num_tokens)) for m in steps]
    assert any(q == 1 + k for m in steps for q in m.inputs.q_lens)                # verify steps
    # a drafting MTP step: one forward over the step's rows, then k - 1 over its drafting rows
    want = [n for m in mtp_steps if m.inputs.logits_rows
            for n in [m.inputs.num_tokens] + [len(m.inputs.logits_rows)] * (k - 1)]
    assert len(want) > 10 * k and warm_forwards == want


def test_mtp_warm_up_as_decode_rows_writes_nothing(r1_with_mtp, monkeypatch):
    """Where CUDA graphs would replay verify steps (here: a graph runner that never replays),
    the warm-up runs its decode-only verify steps, and the MTP steps after them, as one-token
    rows (spec_decode.as_decode_rows) as served steps run; no slot written, greedy tokens kept."""
    import types
    from deepserve.engine.step_inputs import MTPStepMessage, StepMessage
    from tests.engine.test_warm_up import serves_again, warm_up_again
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4, max_model_len=64, max_num_batched_tokens=64,
              max_num_seqs=8, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=12)
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    monkeypatch.setattr(llm.engine.runner, "graphs", types.SimpleNamespace(enabled=True, can_run=lambda meta: False,
                                                                           fits_as_rows=lambda *a: False))
    published = warm_up_again(llm)
    serves_again(llm, prompts, params, reference)
    pairs = list(zip([m for m in published if isinstance(m, StepMessage)],
                     [m for m in published if isinstance(m, MTPStepMessage)]))
    # verify steps alone (a sequence: its token at position 1, drafts at 2 and 3) as one-token rows
    verify = [(s, a) for s, a in pairs if s.inputs.positions.tolist()[:3] == [1, 2, 3]
              and s.inputs.q_lens == [1] * s.inputs.num_tokens]
    assert sorted(s.inputs.num_tokens for s, _ in verify) == [3, 9, 24]      # 1, 3, 16 -> max_num_seqs 8
    for step, after in verify:
        n = step.inputs.num_tokens
        # the MTP step too, drafting from each sequence's last row
        assert after.inputs.q_lens == [1] * n and after.inputs.logits_rows == list(range(2, n, 3))
