"""Llama and Qwen2 logits and greedy text against transformers on tiny random checkpoints."""
import math

import pytest
import torch
import transformers

from deepserve import LLM, SamplingParams

from tests.models.hf_reference import assert_close_rel, hf_greedy, hf_logits, load_ours, save_tiny
from tests.models.paged_harness import greedy_generate, prefill_logits

PROMPTS = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123], [200, 11, 54, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 31]]


def llama_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


CASES = {
    "llama": (transformers.LlamaForCausalLM, llama_config()),
    "llama3_rope_tied": (transformers.LlamaForCausalLM, llama_config(
        tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # a vocabulary off the 64-row padding (the LM head's rows padded, its logits cut back), tied
    "llama_odd_vocab_tied": (transformers.LlamaForCausalLM, llama_config(vocab_size=250, tie_word_embeddings=True)),
    "llama_linear_rope": (transformers.LlamaForCausalLM, llama_config(
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # transformers' dynamic NTK keeps the base up to max_position_embeddings, as vLLM's table does
    "llama_dynamic_rope": (transformers.LlamaForCausalLM, llama_config(
        max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False)),
    "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    cls, cfg = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(cls, cfg, path)
    return ref, load_ours(path)


def test_logits_match_transformers(pair):
    ref, ours = pair
    logits = prefill_logits(ours, PROMPTS)
    expected = torch.cat(hf_logits(ref, PROMPTS))
    assert_close_rel(logits, expected)


def test_vocab_rows_padded_to_64_and_logits_cut_to_the_vocab(tmp_path):
    """The embedding / LM head hold 64-row multiples (vLLM's padding; an odd GEMM width takes
    a slow cuBLAS kernel), the padding rows stay zero and the logits keep the vocabulary's width."""
    ref = save_tiny(transformers.LlamaForCausalLM, llama_config(vocab_size=250), tmp_path)
    ours = load_ours(tmp_path)
    assert ours.lm_head.weight.shape[0] == ours.model.embed_tokens.weight.shape[0] == 256
    assert not ours.lm_head.weight[250:].any() and not ours.model.embed_tokens.weight[250:].any()
    logits = prefill_logits(ours, PROMPTS)
    assert logits.shape[-1] == 250
    assert_close_rel(logits, torch.cat(hf_logits(ref, PROMPTS)))
    # through the engine (its sampler and logprobs read the cut logits)
    llm = LLM(str(tmp_path), skip_tokenizer_init=True, dtype="float32", kv_cache_memory_bytes=1 << 20)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=3)   # hf_greedy: min_new_tokens
    for prompt, out in zip(PROMPTS, llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)):
        got = out.outputs[0]
        assert list(got.token_ids) == hf_greedy(ref, prompt, 16)
        # logprobs over the vocabulary alone (the raw distribution: min_tokens' EOS mask is not in it)
        assert all(t in lp and max(lp) < 250 and all(math.isfinite(x.logprob) for x in lp.values())
                   for t, lp in zip(got.token_ids, got.logprobs))


def test_greedy_matches_transformers(pair):
    ref, ours = pair
    got = greedy_generate(ours, PROMPTS, max_new=32)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == hf_greedy(ref, prompt, 32)


@pytest.mark.parametrize("scaling, base", [({"factor": 4.0, "max_trained_positions": 16}, 1e4 * 13 ** (8 / 6)),
                                           ({"alpha": 2.0}, 1e4 * 2 ** (8 / 6))])
def test_dynamic_ntk_table_is_vllms(scaling, base):
    """vLLM's dynamic NTK tables: base * (factor * max_position / max_trained_positions - (factor - 1))^(d / (d - 2)),
    or base * alpha^(d / (d - 2)), over max_position rows."""
    from deepserve.layers.rotary import RotaryEmbedding
    got = RotaryEmbedding(8, 64, 1e4, {"rope_type": "dynamic", **scaling}).cos_sin_cache
    assert torch.allclose(got, RotaryEmbedding(8, 64, base).cos_sin_cache, atol=1e-6)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                                            "mscale": 1.0, "mscale_all_dim": 1.0}])
def test_rotary_table_is_computed_once_materialized(monkeypatch, scaling):
    """Built on the meta device (every model is, then materialized; `serve`'s checks and `plan`
    stop there), the cos/sin table is only its shape: its [max_position, rotary_dim] values (a
    CPU-second a layer at 128K positions) are computed by rebuild_buffers, equal to a CPU build's."""
    from deepserve.layers.rotary import RotaryEmbedding
    from deepserve.models.loader import _materialize
    expected = RotaryEmbedding(8, 64, 1e4, scaling).cos_sin_cache
    tables = []
    outer = torch.outer
    monkeypatch.setattr(torch, "outer", lambda *a: tables.append(a) or outer(*a))
    with torch.device("meta"):
        rotary = RotaryEmbedding(8, 64, 1e4, scaling)
    assert not tables and rotary.cos_sin_cache.shape == expected.shape and rotary.cos_sin_cache.dtype == expected.dtype
    _materialize(rotary, torch.device("cpu"))
    assert len(tables) == 1 and torch.equal(rotary.cos_sin_cache, expected)
    with torch.device("meta"), pytest.raises(ValueError, match="unsupported rope_scaling type 'su'"):
        RotaryEmbedding(8, 64, 1e4, {"rope_type": "su"})   # refused on the meta device still
