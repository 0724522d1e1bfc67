"""The start-up warm-up compiles every Triton kernel a server then launches: each kernel
launch's specialization key while serving a varied request mix (batch sizes 1-40, prompts of
1-300 tokens, chunked prefill beside decodes, prefix-cache hits, sampled and greedy rows) was
already launched during the engine's start (DEEPSERVE_WARM_UP=1). The keys are Triton's own
(tests/engine/launch_keys.py), computed from interpreted launches on the CPU, where tensors'
16-byte alignment and the integers' classes are what a GPU's would be; launch settings come
from the interpreter's tables, so this checks the arguments' classes, not the GPU's tiles."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreted launches only (a CUDA host compiles for real)", allow_module_level=True)

from deepserve.engine.warm_up import nearest_key_diff  # noqa: E402
from tests.engine.launch_keys import record_launch_keys  # noqa: E402

# kernels whose outputs steer the host or index memory (sampled ids, the expert blocks sorted
# from a routing) run interpreted, the router has a stand-in; the others only have their launch keys taken, which depend on
# shapes, strides, alignments and host integers, not on the values they would compute
EXECUTED = ("sampling", "moe_align")


def executed(name: str) -> bool:
    return any(f".{m}." in name for m in EXECUTED)


def route_round_robin(logits, bias, weights, ids, *_):
    """Stands in for the interpreted router (one program a token, most of the test's time):
    token t's k experts are t, t + 1, ... (mod E), equal weights; the MoE kernels' launches
    read no routing value on the host, so their keys are those of any routing."""
    t, k = ids.shape
    e = logits.shape[1]
    ids.copy_((torch.arange(t)[:, None] + torch.arange(k)[None, :]) % e)
    weights.fill_(1.0 / k)


STAND_INS = {"deepserve.ops.triton.moe_route._moe_route_kernel": route_round_robin}

BATCHES = (1, 2, 3, 6, 16, 17, 40)
PROMPT_LENS = (1, 2, 5, 18, 34, 47, 100, 130, 254, 300)
ENGINE = dict(ops="triton", block_size=16, max_model_len=320, max_num_seqs=48, max_num_batched_tokens=96,
              enable_prefix_caching=True)


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    from tests.models.hf_reference import save_tiny_mla_moe
    return save_tiny_mla_moe(tmp_path_factory.mktemp("v3"), max_position_embeddings=512)


def request_mix(vocab: int) -> list[tuple[list[dict], SamplingParams]]:
    """Batches of every size in BATCHES over cycling prompt lengths; the first prompts of a
    batch share a 40-token prefix with an earlier batch's (prefix-cache hits); greedy and
    sampled batches alternate."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, vocab, (40,), generator=g).tolist()
    mix, k = [], 0
    for b, batch in enumerate(BATCHES):
        prompts = []
        for i in range(batch):
            n = PROMPT_LENS[k % len(PROMPT_LENS)]
            k += 1
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            if i < 2 and b and n > 40:
                ids = shared + ids[40:]
            prompts.append({"prompt_token_ids": ids})
        sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=3, ignore_eos=True)
        greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        mix.append((prompts, sampled if b % 2 else greedy))
    return mix


# by default the Triton GEMM's keys on the Llama and MLA + MoE's on the DeepSeek; the other two
# pairs run the same kernels at other shapes (slow: `-m slow`)
@pytest.mark.parametrize("model,ops", [("llama", "triton-all"), ("deepseek_v3", "triton"),
                                       pytest.param("llama", "triton", marks=pytest.mark.slow),
                                       pytest.param("deepseek_v3", "triton-all", marks=pytest.mark.slow)])
def test_serving_launches_only_kernels_the_warm_up_compiled(model, ops, tiny_v3, monkeypatch):
    """triton-all: the several-row projections on the Triton GEMM too."""
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    path = DEMO_MODEL if model == "llama" else tiny_v3
    with record_launch_keys(executed, STAND_INS) as warm:
        llm = LLM(str(path), **{**ENGINE, "ops": ops})
    with record_launch_keys(executed, STAND_INS) as served:
        for prompts, params in request_mix(llm.engine.runner.vocab_size):
            outs = llm.generate(prompts, params)
            assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outs)
    kernels = {name.rsplit(".", 2)[1] for name in served}
    assert {"attention_prefill", "attention_decode", "rotary" if model == "llama" else "mla_prep", "sampling"} <= kernels
    assert model == "llama" or {"moe_route", "moe_align"} <= kernels, kernels
    missed = [f"{name}: {nearest_key_diff(served.params[name], key, sorted(warm.get(name, ())))}"
              for name, keys in sorted(served.items()) for key in sorted(keys - warm.get(name, set()))]
    assert not missed, "\n".join(missed)
