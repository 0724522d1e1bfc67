"""Programmatic dependent launch changes when kernels start, never what they compute: on a GPU
the engine's outputs with PDL (the default on Hopper) equal those with DEEPSERVE_PDL=0, token
for token and logprob for logprob, through CUDA-graph decode steps of an MLA + MoE model and
a dense one (random weights of small configs of the presets)."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu

TINY = {
    "deepseek-v2-lite": {"num_hidden_layers": 3, "hidden_size": 256, "intermediate_size": 512,
                         "moe_intermediate_size": 128, "n_routed_experts": 16, "num_attention_heads": 4,
                         "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
                         "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 1000},
    "r1-distill-llama-8b": {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000},
}
PROMPTS = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (1, 7, 40)]


def run(preset: str, pdl: bool, monkeypatch) -> list:
    monkeypatch.setenv("DEEPSERVE_PDL", "1" if pdl else "0")
    llm = LLM(preset, load_format="dummy", hf_overrides=dict(TINY[preset]), dtype="bfloat16", seed=0,
              max_model_len=256, max_num_seqs=8, kv_cache_memory_bytes=64 << 20)
    try:
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
        outs = llm.generate(PROMPTS, params)
        return [(o.outputs[0].token_ids, [sorted(lp.items()) for lp in o.outputs[0].logprobs]) for o in outs]
    finally:
        del llm
        torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("preset", sorted(TINY))
def test_pdl_does_not_change_outputs(preset, monkeypatch):
    from deepserve.ops.triton._common import pdl_launch
    if not pdl_launch(torch.device("cuda", 0))["USE_PDL"]:
        pytest.skip("PDL needs an NVIDIA sm_90+ GPU")
    assert run(preset, True, monkeypatch) == run(preset, False, monkeypatch)
