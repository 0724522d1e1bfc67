"""DeepSeek V2/V3 (MLA, MoE, MTP) against transformers on tiny random checkpoints, plus the
MoE ops against transformers' routers/experts and the absorbed MLA decode against the
expanded path."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve.ops import REFERENCE_OPS
from deepserve.config import HFConfig, load_hf_config
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.mla import MLAAttention
from deepserve.layers.moe import FusedMoE
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.models.deepseek_mtp import DeepseekMTP
from deepserve.models.deepseek_v3 import DeepseekV3ForCausalLM, routing_settings
from deepserve.models.loader import process_weights_after_loading
from deepserve.models.weights import iterate_checkpoint
from tests.models.hf_reference import assert_close_rel, hf_greedy, hf_logits, load_ours, save_tiny
from tests.models.paged_harness import allocate_kv_cache, build_meta, greedy_generate, prefill_logits

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123], [200, 11, 54, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 31]]
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False, eos_token_id=None)  # no EOS: generate(min_new_tokens) would mask it
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}


def r1_style():
    return transformers.DeepseekV3Config(
        **TINY, num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=48, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rope_parameters=YARN)


def v2_lite_style():
    return transformers.DeepseekV2Config(
        **TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, routed_scaling_factor=1.5, norm_topk_prob=False,
        scoring_func="softmax", topk_method="greedy", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def v2_group_limited():
    return transformers.DeepseekV2Config(
        **TINY, num_hidden_layers=2, first_k_dense_replace=1, q_lora_rank=24, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=16.0,
        norm_topk_prob=False, scoring_func="softmax", topk_method="group_limited_greedy",
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))


CASES = {"r1_v3": (transformers.DeepseekV3ForCausalLM, r1_style),
         "v2_lite": (transformers.DeepseekV2ForCausalLM, v2_lite_style),
         "v2_group_limited": (transformers.DeepseekV2ForCausalLM, v2_group_limited)}


def save_deepseek(cls, config, path):
    """A tiny checkpoint whose routing is decisive: gate weights scaled up (the default init
    gives near-equal scores) and a random nonzero e_score_correction_bias."""
    model = save_tiny(cls, config, path)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is None:
                continue
            gate.weight.mul_(30.0)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(torch.randn(gate.weight.shape[0]) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cls, make_config = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = save_deepseek(cls, make_config(), path)
    return request.param, path, ref, load_ours(path)


def test_logits_match_transformers(case):
    _, _, ref, ours = case
    logits = prefill_logits(ours, PROMPTS)
    assert_close_rel(logits, torch.cat(hf_logits(ref, PROMPTS)))


def test_greedy_matches_transformers(case):
    _, _, ref, ours = case
    got = greedy_generate(ours, PROMPTS, max_new=32)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == hf_greedy(ref, prompt, 32)


def test_mixed_decode_and_chunked_prefill_in_one_forward(case):
    """Step 1 prefills A and the first chunk of B; step 2 holds A's decode token (absorbed
    path) and B's second chunk (expanded path over context + new) in one flat batch."""
    _, _, ref, ours = case
    a, b = PROMPTS[0] + [77], PROMPTS[2]
    block_size, blocks_per_seq = 4, 8
    allocate_kv_cache(ours, 2 * blocks_per_seq, block_size)
    with torch.no_grad():
        meta, pos = build_meta([len(a) - 1, 6], [len(a) - 1, 6], block_size, blocks_per_seq)
        ours(torch.tensor(a[:-1] + b[:6]), pos, meta)
        meta, pos = build_meta([1, len(b) - 6], [len(a), len(b)], block_size, blocks_per_seq)
        assert meta.num_decodes == 1
        logits = ours.compute_logits(ours(torch.tensor(a[-1:] + b[6:]), pos, meta))
    ref_a, ref_b = hf_logits(ref, [a, b])
    assert_close_rel(logits, torch.cat([ref_a[-1:], ref_b[6:]]))


def test_old_hub_config_spelling_loads_the_same(case, tmp_path):
    """config.json as Hub checkpoints write it (rope_scaling + rope_theta + torch_dtype)."""
    name, path, ref, ours = case
    data = json.loads((path / "config.json").read_text())
    rope = data.pop("rope_parameters")
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = None if rope["rope_type"] == "default" else dict(rope, type=rope.pop("rope_type"))
    data["torch_dtype"] = data.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    old = load_ours(tmp_path)
    old_scaling = {k: v for k, v in (old.config.rope_scaling or {}).items() if k != "type"}
    assert old_scaling == (ours.config.rope_scaling or {})
    assert torch.equal(prefill_logits(old, PROMPTS), prefill_logits(ours, PROMPTS))


# --------------------------------------------------------------------------- MLA layer
def test_absorbed_decode_equals_expanded_attention():
    """The same decode token through the absorbed latent MQA (num_decodes=1) and through the
    expanded prefill path (num_decodes=0) gives the same output, with and without q_lora."""
    torch.manual_seed(0)
    for q_lora in (None, 24):
        rotary = RotaryEmbedding(8, 64, 10000.0, YARN, is_neox_style=False)
        attn = MLAAttention(64, 4, q_lora, 32, 16, 8, 16, rotary, scale=0.3)
        with torch.no_grad():
            for p in attn.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        attn.process_weights_after_loading()
        outs = []
        for num_decodes in (1, 0):
            attn.kv_cache = [torch.zeros(8, 4, 1, 40)]
            x = torch.randn(11, 64, generator=torch.Generator().manual_seed(1))
            meta, pos = build_meta([10], [10], 4, 8)
            attn(pos, x[:10], meta)
            meta, pos = build_meta([1], [11], 4, 8)
            meta.num_decodes = num_decodes
            outs.append(attn(pos, x[10:], meta))
        assert outs[0].abs().max() > 0.1
        assert_close_rel(outs[0], outs[1], rtol=1e-5)


# --------------------------------------------------------------------------- MoE ops
def _router(cls, config, seed=0):
    torch.manual_seed(seed)
    router = cls(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts) * 0.3)
    return router


@pytest.mark.parametrize("make_config,router_cls", [
    (r1_style, transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter),
    (v2_lite_style, transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter),
    (v2_group_limited, transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter)])
def test_moe_route_matches_transformers_router(make_config, router_cls):
    config = make_config()
    router = _router(router_cls, config)
    x = torch.randn(50, config.hidden_size)
    logits, ref_w, ref_ids = router(x)
    bias = getattr(router, "e_score_correction_bias", None)
    settings = routing_settings(HFConfig(config.to_dict()))
    w, ids = REFERENCE_OPS.moe_route(logits, bias, **settings)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    ref_order, order = ref_ids.argsort(-1), ids.long().argsort(-1)
    assert torch.equal(ids.long().gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-6, atol=1e-7)


def test_noaux_tc_groups_rank_by_top2_sum_and_weights_skip_bias():
    logits = torch.tensor([[0.0, 0.0, 3.0, -3.0, 1.0, 1.0, -5.0, -5.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    w, ids = REFERENCE_OPS.moe_route(logits, bias, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc",
                           n_group=4, topk_group=1, norm_topk_prob=False, routed_scaling_factor=2.0)
    # group sums (biased): g0 1.0, g1 ~1.0, g2 1.46, g3 ~2.01 -> group 3; weights unbiased
    assert sorted(ids[0].tolist()) == [6, 7]
    torch.testing.assert_close(w[0], torch.sigmoid(torch.tensor([-5.0, -5.0])) * 2.0)


def test_fused_moe_matches_transformers_experts():
    config = r1_style()
    experts = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts(config)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x = torch.randn(40, 64)
    ids = torch.randint(0, 8, (40, 2))
    ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 7, (40,))) % 8   # distinct experts per token
    w = torch.rand(40, 2)
    expected = experts(x, ids, w)
    got = REFERENCE_OPS.fused_moe(x, experts.gate_up_proj.data, experts.down_proj.data, w, ids.int())
    assert_close_rel(got, expected, rtol=1e-5)


def _fp8_block_quant(w):
    """Quantize [E, N, K] to e4m3 with one scale per 128x128 block -> (q, scale_inv)."""
    e, n, k = w.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = torch.zeros(e, nb * 128, kb * 128)
    padded[:, :n, :k] = w
    blocks = padded.view(e, nb, 128, kb, 128)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / 448.0          # [E, nb, kb]
    q = (blocks / scale[:, :, None, :, None]).view(e, nb * 128, kb * 128)[:, :n, :k]
    return q.to(torch.float8_e4m3fn), scale


def test_fused_moe_fp8_block_scales_dequantized():
    torch.manual_seed(0)
    w13, w2 = torch.randn(4, 320, 200) * 0.1, torch.randn(4, 200, 160) * 0.1
    q13, s13 = _fp8_block_quant(w13)
    q2, s2 = _fp8_block_quant(w2)
    x, ids, w = torch.randn(9, 200), torch.randint(0, 4, (9, 2)).int(), torch.rand(9, 2)
    deq13 = q13.float() * s13.repeat_interleave(128, 1)[:, :320].repeat_interleave(128, 2)[:, :, :200]
    deq2 = q2.float() * s2.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[:, :, :160]
    from tests.quant.test_fp8_experts import w8a8_reference      # activations quantized per 128-group
    got = REFERENCE_OPS.fused_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2)
    assert_close_rel(got, w8a8_reference(x, deq13, deq2, w, ids), rtol=1e-5)
    assert_close_rel(got, REFERENCE_OPS.fused_moe(x, w13, w2, w, ids), rtol=0.1)   # fp8 stays close


@pytest.mark.parametrize("split", ["ep", "tp"])
def test_expert_and_tensor_parallel_shards_sum_to_the_whole(split):
    """Two ranks' partial outputs (before the all-reduce) add up to the single-rank output;
    each rank's weight_loader keeps only its experts (EP) or intermediate slice (TP)."""
    torch.manual_seed(0)
    e, d, i = 8, 32, 24
    tensors = {(x, p): torch.randn(*((d, i) if p == "w2" else (i, d))) * 0.2
               for x in range(e) for p in ("w1", "w3", "w2")}

    def build(pctx):
        moe = FusedMoE(e, d, i, pctx=pctx, reduce_results=False)
        for (x, p), t in tensors.items():
            param = moe.w2_weight if p == "w2" else moe.w13_weight
            moe.weight_loader(param, t, (x, p))
        return moe

    x = torch.randn(20, d)
    weights, ids = REFERENCE_OPS.moe_route(torch.randn(20, e), None, top_k=2, scoring_func="softmax",
                                           topk_method="greedy", n_group=None, topk_group=None,
                                           norm_topk_prob=False, routed_scaling_factor=1.0)
    whole = build(ParallelContext())(x, weights, ids)
    kw = (lambda r: dict(ep_rank=r, ep_size=2)) if split == "ep" else (lambda r: dict(tp_rank=r, tp_size=2))
    parts = [build(ParallelContext(**kw(r))) for r in range(2)]
    if split == "ep":
        assert parts[1].w13_weight.shape[0] == 4
        assert torch.equal(parts[1].w2_weight[0], tensors[(4, "w2")])
    else:
        assert parts[1].w13_weight.shape[1] == i
        assert torch.equal(parts[1].w13_weight[0, i // 2:], tensors[(0, "w3")][i // 2:])
    assert_close_rel(parts[0](x, weights, ids) + parts[1](x, weights, ids), whole, rtol=1e-5)


# --------------------------------------------------------------------------- MTP
@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """The R1-style checkpoint plus a model.layers.4.* MTP set in a second shard."""
    path = tmp_path_factory.mktemp("r1_mtp")
    ref = save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), path)
    main = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    mtp = {name.replace("model.layers.3.", "model.layers.4."): torch.randn(t.shape, generator=gen)
           for name, t in main.items() if name.startswith("model.layers.3.")}
    for part, shape in {"embed_tokens.weight": (256, 64), "enorm.weight": (64,), "hnorm.weight": (64,),
                        "eh_proj.weight": (64, 128), "shared_head.norm.weight": (64,),
                        "shared_head.head.weight": (256, 64)}.items():
        mtp[f"model.layers.4.{part}"] = torch.randn(shape, generator=gen)
    save_file(mtp, str(path / "model-mtp.safetensors"))
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return path, ref, mtp


def test_mtp_layer_skipped_by_default(mtp_checkpoint):
    path, ref, _ = mtp_checkpoint
    ours = load_ours(path)   # the loader's missing-tensor check passes and nothing is unknown
    assert ours.mtp is None and len(ours.model.layers) == 4
    assert not any(n.startswith("mtp") for n, _ in ours.named_parameters())
    assert_close_rel(prefill_logits(ours, PROMPTS), torch.cat(hf_logits(ref, PROMPTS)))


def _check_mtp_values(mtp_module, tensors):
    p = dict(mtp_module.named_parameters())
    src = {k[len("model.layers.4."):]: v for k, v in tensors.items()}
    assert torch.equal(p["eh_proj.weight"], src["eh_proj.weight"])
    assert torch.equal(p["shared_head.head.weight"], src["shared_head.head.weight"])
    assert torch.equal(p["mtp_block.self_attn.kv_b_proj.weight"], src["self_attn.kv_b_proj.weight"])
    assert torch.equal(p["mtp_block.mlp.gate.e_score_correction_bias"], src["mlp.gate.e_score_correction_bias"])
    assert torch.equal(p["mtp_block.mlp.experts.w13_weight"][5],
                       torch.cat([src["mlp.experts.5.gate_proj.weight"], src["mlp.experts.5.up_proj.weight"]]))
    assert torch.equal(p["mtp_block.mlp.shared_experts.gate_up_proj.weight"][32:],
                       src["mlp.shared_experts.up_proj.weight"])


def test_mtp_layer_loads_into_its_own_module(mtp_checkpoint):
    path, ref, tensors = mtp_checkpoint
    cfg = load_hf_config(str(path))
    model = DeepseekV3ForCausalLM(cfg, load_mtp=True)
    loaded = model.load_weights(iterate_checkpoint(path))
    assert loaded == {n for n, _ in model.named_parameters()}
    process_weights_after_loading(model)
    assert len(model.model.layers) == 4 and len(model.mtp) == 1
    _check_mtp_values(model.mtp[0], tensors)
    # the main model is untouched by the MTP tensors
    assert_close_rel(prefill_logits(model, PROMPTS), torch.cat(hf_logits(ref, PROMPTS)))
    standalone = DeepseekMTP(cfg, layer_idx=4)
    assert standalone.load_weights(iterate_checkpoint(path)) == {n for n, _ in standalone.named_parameters()}
    _check_mtp_values(standalone, tensors)


@pytest.mark.parametrize("edit, error", [
    ("short", r"^tensor model\.layers\.4\.mlp\.experts\.5\.down_proj\.weight: checkpoint shape \(63, 32\) does "
              r"not match the model's \(64, 32\)$"),
    ("drop", r"lacks tensor\(s\) for: model\.layers\.4\.eh_proj\.weight$")])
def test_a_bad_mtp_tensor_is_named_as_the_checkpoint_names_it(mtp_checkpoint, tmp_path, edit, error):
    """The MTP layer's modules live under `mtp.0.` (`mtp.0.mtp_block.` for its decoder layer) in
    the model: a refused or missing tensor there is named as the checkpoint names it
    (model.layers.4.*), not by the model's name, which no checkpoint holds."""
    import dataclasses
    import shutil

    from deepserve.config import EngineArgs
    from deepserve.models.loader import load_model
    path, _, mtp = mtp_checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    name = "model.layers.4.mlp.experts.5.down_proj.weight" if edit == "short" else "model.layers.4.eh_proj.weight"
    mtp = dict(mtp)
    if edit == "short":
        mtp[name] = mtp[name][:-1].clone()
    else:
        del mtp[name]
    save_file(mtp, str(bad / "model-mtp.safetensors"))
    config = EngineArgs(model=str(bad), dtype="float32").create_engine_config().model
    with pytest.raises(ValueError, match=error):
        load_model(dataclasses.replace(config, load_mtp=True), torch.device("cpu"))


# --------------------------------------------------------------------------- TP / EP (gloo)
def _parallel_worker(rank, mode, port, path, out_dir):
    import os

    import torch.distributed as dist
    # a forked child must not enter the parent's OpenMP pool (it would hang): run single-threaded
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_hf_config(str(path))
        pctx = ParallelContext(**{f"{mode}_rank": rank, f"{mode}_size": 2})
        model = DeepseekV3ForCausalLM(cfg, pctx=pctx)
        model.load_weights(iterate_checkpoint(path))
        process_weights_after_loading(model)
        torch.save(prefill_logits(model, PROMPTS), f"{out_dir}/{mode}{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["tp", "ep"])
def test_two_process_parallel_matches_single(mode, mtp_checkpoint, tmp_path):
    """TP=2 (heads and expert intermediate dims split) or EP=2 (experts split) over gloo gives
    the single-process logits on every rank."""
    import socket

    import torch.multiprocessing as mp
    path, ref, _ = mtp_checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imports (spawn would re-import transformers in each)
    mp.start_processes(_parallel_worker, args=(mode, port, path, str(tmp_path)), nprocs=2,
                       start_method="fork")
    expected = torch.cat(hf_logits(ref, PROMPTS))
    for rank in range(2):
        assert_close_rel(torch.load(tmp_path / f"{mode}{rank}.pt"), expected)
