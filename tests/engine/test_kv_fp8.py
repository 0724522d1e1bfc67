"""FP8 KV cache (`--kv-cache-dtype fp8`): pools stored in float8 e4m3 (the checkpoint's per-layer
scales, 1.0 without), written by the KV-write ops and read by the attention kernels (op tests:
tests/ops/test_kv_fp8_ops.py).

- models: a tiny DeepSeek-V3 (MLA latent cache) and stories260k (a trained Llama, GQA K/V) with fp8 KV against
  bf16-style (model dtype) KV: pool bytes, logit KL bounded, greedy agreement >= 90%;
- a KV dtype the engine does not have is refused naming the choices.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from tests.models.test_deepseek import r1_style, save_deepseek
from tests.quant.test_serving import RANDOM_PROMPTS, STORIES, STORY_TEXTS, TOKENIZER, _compare

FP8 = torch.float8_e4m3fn


def _greedy(llm, prompts, n=10):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvfp8")
    ds = save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), root / "deepseek")
    with torch.no_grad():      # decisive greedy choices (see tests/quant/test_serving.py)
        ds.model.embed_tokens.weight.mul_(2.0)
    ds.save_pretrained(root / "deepseek")
    return {"deepseek": root / "deepseek", "stories": STORIES}


@pytest.mark.parametrize("model", ["deepseek", "stories"])
def test_fp8_kv_cache_against_model_dtype_kv(models, model):
    kw = dict(model=str(models[model]), tokenizer=TOKENIZER, dtype="bfloat16", kv_cache_memory_bytes=1 << 22)
    ref, fp8 = LLM(**kw), LLM(**kw, kv_cache_dtype="fp8")
    layers = [m for m in fp8.engine.runner.kv_layers]
    assert all(t.dtype == FP8 for m in layers for t in m.kv_cache)
    # the same bytes hold twice the tokens of the bf16 pool
    assert abs(fp8.engine.runner.num_blocks - 2 * ref.engine.runner.num_blocks) <= 1   # floor of bytes / block
    assert 2 * fp8.engine.runner.bytes_per_block() == ref.engine.runner.bytes_per_block()
    if model == "stories":   # a trained model: real text, not random ids
        prompts = [ref.tokenizer.encode(t) for t in STORY_TEXTS + ["Once upon a time", "The cat sat on"]]
    else:
        prompts = RANDOM_PROMPTS + [[9, 8, 7, 6, 5, 4, 3], [100, 101, 102, 250, 3, 3]]
    top1, kl = _compare(torch.cat(ref.prompt_logits(prompts)).float(), torch.cat(fp8.prompt_logits(prompts)).float())
    got, want = _greedy(fp8, prompts), _greedy(ref, prompts)
    agree = sum(a == b for x, y in zip(got, want) for a, b in zip(x, y)) / sum(map(len, want))
    print(f"{model}: fp8 KV vs bf16 KV: top-1 {top1:.3f}, KL {kl:.2e}, greedy agreement {agree:.3f}")
    # stories260k (dim 64) keeps many K/V values below e4m3's normal range at scale 1.0, so its
    # greedy text drifts sooner (measured 0.80); the R1-shaped MLA model holds 0.95
    floor = 0.9 if model == "deepseek" else 0.7
    assert agree >= floor and top1 >= 0.9 and kl < 2e-2, (agree, top1, kl)


def test_unknown_kv_cache_dtype_names_the_choices():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bfloat16, float16, fp8, fp8_e4m3, "
                                         "got 'int4'"):
        EngineArgs(kv_cache_dtype="int4")


def test_a_named_16_bit_kv_dtype_is_the_model_dtype_or_refused():
    """vLLM's --kv-cache-dtype bfloat16 / float16: the pool in that dtype, which must be the
    model's (no conversion between two 16-bit formats); the same tokens as auto."""
    kw = dict(model=str(STORIES), tokenizer=TOKENIZER, kv_cache_memory_bytes=1 << 20)
    named, auto = LLM(**kw, dtype="bfloat16", kv_cache_dtype="bfloat16"), LLM(**kw, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for m in named.engine.runner.kv_layers for t in m.kv_cache)
    assert named.engine.runner.num_blocks == auto.engine.runner.num_blocks
    prompts = [named.tokenizer.encode(t) for t in STORY_TEXTS[:2]]
    assert _greedy(named, prompts) == _greedy(auto, prompts)
    with pytest.raises(ValueError, match="--kv-cache-dtype float16 names the model's own dtype, and this model runs "
                                         "in bfloat16: pass --dtype float16 too"):
        LLM(**kw, dtype="bfloat16", kv_cache_dtype="float16")


def test_checkpoint_kv_scales_keep_a_small_latent_in_e4m3s_range(tmp_path):
    """vLLM's per-layer fp8 KV scales in the checkpoint (`self_attn.k_scale`: MLA's latent cache
    has the one scale, k_scale, as in vLLM). The tiny DeepSeek's latent is shrunk 128x (its
    kv_a_layernorm weight and the rope rows of kv_a_proj_with_mqa; kv_b_proj grown to match), so
    at scale 1.0 most latent values fall below e4m3's normal range (2^-6) and lose bits; with
    k_scale = 1/128 the pool holds latent * 128 and the fp8-KV logits come closer to the
    model-dtype-KV logits of the same weights. The prompts are scored in chunks of 3 tokens, so
    that each chunk reads its context from the fp8 cache (a chunk's own tokens attend their latent
    unrounded)."""
    from safetensors.torch import load_file, save_file
    small = 1 / 128
    base, scaled = tmp_path / "base", tmp_path / "scaled"
    ds = save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), base)
    cfg = ds.config
    with torch.no_grad():
        ds.model.embed_tokens.weight.mul_(2.0)
        for layer in ds.model.layers:
            attn = layer.self_attn
            attn.kv_a_layernorm.weight.mul_(small)
            attn.kv_a_proj_with_mqa.weight[cfg.kv_lora_rank:].mul_(small)
            attn.kv_b_proj.weight.div_(small)
    ds.save_pretrained(base)
    ds.save_pretrained(scaled)
    tensors = load_file(scaled / "model.safetensors")
    for i in range(cfg.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(small)
    save_file(tensors, scaled / "model.safetensors", metadata={"format": "pt"})

    kw = dict(tokenizer=TOKENIZER, dtype="bfloat16", kv_cache_memory_bytes=1 << 22)
    prompts = RANDOM_PROMPTS + [[9, 8, 7, 6, 5, 4, 3], [100, 101, 102, 250, 3, 3]]
    ref = torch.cat(LLM(str(base), **kw).prompt_logits(prompts)).float()
    kls = {}
    for name, folder in (("scale 1.0", base), ("k_scale", scaled)):
        llm = LLM(str(folder), **kw, kv_cache_dtype="fp8", max_num_batched_tokens=3, max_num_seqs=1)
        scales = {m.kv_scale for m in llm.engine.runner.kv_layers}
        assert scales == ({small} if name == "k_scale" else {1.0}), scales
        kls[name] = _compare(ref, torch.cat(llm.prompt_logits(prompts)).float())[1]
    print(f"KL vs model-dtype KV: {kls}")
    assert kls["k_scale"] < 0.5 * kls["scale 1.0"], kls


@pytest.mark.parametrize("value, match", [(float("nan"), "must be finite and > 0, got nan"),
                                          (-0.5, "must be finite and > 0, got -0.5"),
                                          ([0.5, 0.5], r"must hold one value, got shape \(2,\)")])
def test_bad_kv_scale_is_refused_naming_the_tensor(value, match):
    from deepserve.layers.attention import Attention
    from deepserve.models.weights import load_kv_scale
    model = torch.nn.Module()
    model.attn = Attention(2, 16, 1, 0.25)
    name = "attn.k_scale"
    with pytest.raises(ValueError, match=f"fp8 KV scale {name} {match}"):
        load_kv_scale(model, name, torch.tensor(value))
    assert load_kv_scale(model, "attn.kv_scale", torch.tensor(0.25)) and (model.attn.k_scale, model.attn.v_scale) == (0.25, 0.25)
    assert not load_kv_scale(model, "attn.weight", torch.tensor(0.25))


def test_gqa_checkpoint_scales_reach_each_layer(tmp_path):
    """A Llama checkpoint's `self_attn.k_scale` / `v_scale` (vLLM's names, on the attention block
    whose `attn` holds the cache) reach each layer's K and V scales; the older single
    `kv_scale` sets both; a layer without any keeps 1.0. With them the fp8-KV logits of
    stories260k stay within the scale-1.0 run's distance of the model-dtype KV (its K/V are
    O(1), so these scales only shift which values fall under e4m3's normal range)."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "stories"
    shutil.copytree(STORIES, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor(2.0)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    kw = dict(tokenizer=TOKENIZER, dtype="bfloat16", kv_cache_memory_bytes=1 << 22)
    llm = LLM(str(folder), **kw, kv_cache_dtype="fp8")
    scales = [(m.k_scale, m.v_scale) for m in llm.engine.runner.kv_layers]
    assert scales[:2] == [(0.5, 0.25), (2.0, 2.0)] and set(scales[2:]) <= {(1.0, 1.0)}, scales
    prompts = [llm.tokenizer.encode(t) for t in STORY_TEXTS]
    ref = torch.cat(LLM(str(STORIES), **kw).prompt_logits(prompts)).float()
    unscaled = torch.cat(LLM(str(STORIES), **kw, kv_cache_dtype="fp8").prompt_logits(prompts)).float()
    kl = _compare(ref, torch.cat(llm.prompt_logits(prompts)).float())[1]
    assert kl < 2 * _compare(ref, unscaled)[1] + 1e-4, kl


def test_a_kv_cache_scheme_without_fp8_kv_is_named(tmp_path, caplog):
    """An llm-compressor checkpoint with a kv_cache_scheme (fp8 KV scales) served with the default
    KV dtype keeps a model-dtype cache, where vLLM switches to fp8 unasked: a warning says so and
    names --kv-cache-dtype fp8, with which the pool is e4m3 and the warning absent."""
    import json
    import logging
    import shutil
    from tests.quant.test_real_packers import DATA
    folder = tmp_path / "w8a8"
    shutil.copytree(DATA / "llama-w8a8-channel", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    for kv, warned in (("auto", True), ("fp8", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepserve"):
            llm = LLM(str(folder), tokenizer=TOKENIZER, dtype="float32", kv_cache_memory_bytes=1 << 20, kv_cache_dtype=kv)
        assert (llm.engine.runner.kv_dtype == FP8) == (kv == "fp8")
        assert ("kv_cache_scheme" in caplog.text and "--kv-cache-dtype fp8" in caplog.text) == warned, caplog.text


def test_fp8_kv_is_transformers_with_k_and_v_rounded_to_e4m3(models):
    """The oracle of an fp8 KV cache at scale 1.0 (vLLM's default): transformers' Llama with each
    layer's keys (after RoPE, as cached) and values rounded to e4m3 (nearest, saturating at 448)
    before attention. stories260k's fp8-KV logits are that model's to float summation, while the
    unrounded model is far off: the cache's drift from model-dtype KV is e4m3's own rounding
    (measured: greedy 64-token text equal to that model's on 8 prompts; K/V in the pool equal
    to their e4m3 round trip byte for byte, 2.5-3% relative error a layer)."""
    from transformers.models.llama import modeling_llama
    e4m3 = lambda t: t.float().clamp(-448, 448).to(FP8).to(t.dtype)     # noqa: E731
    llm = LLM(model=str(models["stories"]), tokenizer=TOKENIZER, dtype="float32", kv_cache_dtype="fp8",
              kv_cache_memory_bytes=1 << 22)
    prompts = [llm.tokenizer.encode(t) for t in STORY_TEXTS + ["Once upon a time", "The cat sat on"]]
    got = torch.cat(llm.prompt_logits(prompts))
    hf = transformers.LlamaForCausalLM.from_pretrained(models["stories"], torch_dtype=torch.float32).eval()

    def logits():
        with torch.no_grad():
            return torch.cat([hf(torch.tensor([p])).logits[0] for p in prompts])
    plain = logits()
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_round(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, e4m3(k)
    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: e4m3(o)) for layer in hf.model.layers]
    try:
        modeling_llama.apply_rotary_pos_emb = rope_then_round
        rounded = logits()
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
        for h in hooks:
            h.remove()
    err, drift = (got - rounded).abs().max().item(), (got - plain).abs().max().item()
    assert err < 1e-3 and drift > 0.05, (err, drift)


@pytest.mark.parametrize("folder", ["stories", "llama-w8a8-channel"])
@pytest.mark.parametrize("k_name, v_name", [
    ("self_attn.k_scale", "self_attn.v_scale"),                  # vLLM's own
    ("self_attn.attn.k_scale", "self_attn.attn.v_scale"),
    ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),    # ModelOpt
    ("self_attn.qkv_proj.k_scale", "self_attn.qkv_proj.v_scale"),
    ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),   # llm-compressor kv_cache_scheme
])
def test_kv_scales_under_every_name_vllm_reads(tmp_path, folder, k_name, v_name):
    """A layer's fp8 KV scales under each name vLLM's cache-scale mappers read reach its K and V
    scales, in a 16-bit checkpoint and in a compressed-tensors W8A8 int8 one with a kv_cache_scheme
    (whose loader took `self_attn.k_scale` for an int8 weight's scale and refused the folder)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from tests.quant.test_real_packers import DATA
    src = STORIES if folder == "stories" else DATA / folder
    shutil.copytree(src, tmp_path / "m")
    shard = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors[f"model.layers.0.{k_name}"], tensors[f"model.layers.0.{v_name}"] = torch.tensor(0.5), torch.tensor(0.25)
    save_file(tensors, shard, metadata={"format": "pt"})
    if folder != "stories":
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                         "dynamic": False, "symmetric": True}
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path / "m"), tokenizer=TOKENIZER, dtype="float32", kv_cache_dtype="fp8",
              kv_cache_memory_bytes=1 << 20)
    scales = [(m.k_scale, m.v_scale) for m in llm.engine.runner.kv_layers]
    assert scales[0] == (0.5, 0.25) and set(scales[1:]) == {(1.0, 1.0)}, scales


def test_a_query_scale_is_checked_and_left_unused_with_a_warning(tmp_path, caplog):
    """llm-compressor's attention scheme writes `self_attn.q_scale` (or `q_proj.output_scale`)
    beside the KV scales; vLLM ignores it where its backend keeps queries unquantized, as
    deepserve's attention does: loaded without error, one warning naming it, KV scales applied
    (it was refused as a tensor with no model parameter); a malformed one is refused."""
    import logging
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(STORIES, tmp_path / "m")
    shard = tmp_path / "m" / "model.safetensors"
    tensors = load_file(shard)
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.q_scale"] = torch.tensor(0.3)
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    save_file(tensors, shard, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        llm = LLM(str(tmp_path / "m"), tokenizer=TOKENIZER, dtype="float32", kv_cache_dtype="fp8",
                  kv_cache_memory_bytes=1 << 20)
    assert caplog.text.count("fp8 query scales") == 1 and "model.layers.0.self_attn.q_scale" in caplog.text
    assert llm.engine.runner.kv_layers[0].k_scale == 0.5
    tensors["model.layers.1.self_attn.q_scale"] = torch.tensor([float("nan")])
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^fp8 query scale model.layers.1.self_attn.q_scale must hold one finite"):
        LLM(str(tmp_path / "m"), tokenizer=TOKENIZER, dtype="float32", kv_cache_dtype="fp8",
            kv_cache_memory_bytes=1 << 20)


def test_mla_fp8_prefill_rounds_only_the_cached_context(tmp_path):
    """MLA's fp8 cache holds the latent (kv_a_layernorm's output and the roped k_pe). As in vLLM's
    MLA prefill, a chunk's own tokens attend their latent as computed and only the context cached
    by earlier chunks through e4m3. Oracle, transformers chunk by chunk: the rows of the chunk
    starting at a come from a pass whose latents at positions < a are those the earlier chunks'
    passes computed, rounded to e4m3; a prompt in one chunk is the unrounded model's. The old
    prefill read every key back from the cache (the chunk's own too): every latent rounded."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as md
    from tests.models.hf_reference import save_tiny_mla_moe
    save_tiny_mla_moe(tmp_path / "m")
    prompts, chunk = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 100, 11, 54, 9], [120, 1, 77, 77, 13]], 5
    llm = LLM(model=str(tmp_path / "m"), dtype="float32", tokenizer=TOKENIZER, kv_cache_dtype="fp8",
              kv_cache_memory_bytes=1 << 22, max_num_batched_tokens=chunk, max_num_seqs=1)
    got = llm.prompt_logits(prompts)
    e4m3 = lambda t: t.float().clamp(-448, 448).to(FP8).to(t.dtype)     # noqa: E731
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float32).eval()
    ropes = md.apply_rotary_pos_emb, md.apply_rotary_pos_emb_interleave
    seen: list[torch.Tensor] = []    # each layer's normed latent, then its roped k_pe, in call order

    def run(prompt, cached: int = 0, everywhere: bool = False) -> torch.Tensor:
        """Logits with the latents of positions < `cached` the recorded ones rounded, recording
        this pass's latents at positions >= `cached`; `everywhere`: every latent rounded."""
        calls = iter(range(10 ** 6))

        def swap(t, dim):       # t [..., S, W], the positions on `dim`
            if everywhere:
                return e4m3(t)
            i = next(calls)
            if not cached:
                seen.append(t.detach().clone())
                return t
            seen[i] = torch.cat([seen[i].narrow(dim, 0, cached), t.narrow(dim, cached, t.shape[dim] - cached)], dim)
            return torch.cat([e4m3(seen[i].narrow(dim, 0, cached)), t.narrow(dim, cached, t.shape[dim] - cached)], dim)
        hooks = [layer.self_attn.kv_a_layernorm.register_forward_hook(lambda m, i, o: swap(o, 1))
                 for layer in hf.model.layers]
        try:
            md.apply_rotary_pos_emb, md.apply_rotary_pos_emb_interleave = (
                (lambda q, k, *a, rope=rope, **kw: (lambda qk: (qk[0], swap(qk[1], 2)))(rope(q, k, *a, **kw)))
                for rope in ropes)
            with torch.no_grad():
                return hf(torch.tensor([prompt])).logits[0]
        finally:
            md.apply_rotary_pos_emb, md.apply_rotary_pos_emb_interleave = ropes
            for h in hooks:
                h.remove()

    for prompt, logits in zip(prompts, got):
        seen.clear()
        plain = run(prompt)
        want = torch.cat([plain[:chunk]] + [run(prompt, a)[a:a + chunk] for a in range(chunk, len(prompt), chunk)])
        err = (logits - want).abs().max().item()
        if len(prompt) <= chunk:
            assert err < 1e-5, err
            continue
        old = (logits - run(prompt, everywhere=True)).abs().max().item()
        drift = (logits - plain).abs().max().item()
        assert err < 1e-5 and old > 1e-3 and drift > 1e-3, (err, old, drift)
