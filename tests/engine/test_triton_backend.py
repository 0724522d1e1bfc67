"""The triton backend's greedy outputs equal the torch backend's, end to end through the
engine (kernels interpreted on CPU hosts: tests/conftest.py sets TRITON_INTERPRET=1); engines
of different backends live side by side in one process, each through its own op table."""
import pytest
import torch

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL
from tests.models.hf_reference import save_tiny_mla_moe

pytest.importorskip("triton")
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)   # the prefill, then 4 decode steps
PROMPTS = [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11, 12, 13]}]


def _greedy(model, backend, prompts=PROMPTS):
    llm = LLM(str(model), ops=backend, block_size=4, max_model_len=64)
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    return outs, llm.engine.runner.ops.triton_share()      # of the start-up step's op calls


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory):
    return save_tiny_mla_moe(tmp_path_factory.mktemp("mla"), max_position_embeddings=128)


@pytest.mark.parametrize("which", ["demo", "mla", "mla-batch1"])
def test_triton_greedy_equals_torch(which, tiny_mla, monkeypatch):
    """mla-batch1: one request, so every decode step is one row (the one-launch moe_gate).
    demo and mla-batch1 run --ops triton-all: every several-row projection (prefill, the demo's
    two-row decode) on the Triton GEMM instead of cuBLAS (the interpreter table's choice)."""
    from deepserve.ops.triton import gemv
    model = DEMO_MODEL if which == "demo" else tiny_mla
    prompts = PROMPTS[1:] if which == "mla-batch1" else PROMPTS
    backend = "triton" if which == "mla" else "triton-all"
    gemm_rows, real_gemm = [], gemv.gemm
    monkeypatch.setattr(gemv, "gemm", lambda x, *a: gemm_rows.append(x.numel() // x.shape[-1]) or real_gemm(x, *a))
    expected, _ = _greedy(model, "torch", prompts)
    got, share = _greedy(model, backend, prompts)
    assert got == expected
    assert share > 0.5  # most op calls really ran as Triton kernels
    assert (len(gemm_rows) > 4 and min(gemm_rows) > 1) if backend == "triton-all" else not gemm_rows


def test_two_backends_in_one_process(monkeypatch):
    """An --ops torch engine and an --ops triton-all engine built side by side: each model's
    layers hold its own table, the steps of one never call the other's ops, and each gives
    what it gives alone (its logits are those of its own backend's kernels)."""
    monkeypatch.setenv("DEEPSERVE_OPS_COUNT", "1")       # count every call, not just the start-up step
    a = LLM(str(DEMO_MODEL), ops="torch", block_size=4, max_model_len=64)
    b = LLM(str(DEMO_MODEL), ops="triton-all", block_size=4, max_model_len=64)
    ta, tb = a.engine.runner.ops, b.engine.runner.ops
    assert (ta.name, tb.name, tb.backend, tb.force_triton) == ("torch", "triton-all", "triton", True)
    assert all(m.ops is ta for m in a.engine.runner.model.modules())
    assert all(m.ops is tb for m in b.engine.runner.model.modules())
    prompt = [{"prompt_token_ids": PROMPTS[1]["prompt_token_ids"]}]

    def run(llm):
        table = llm.engine.runner.ops
        before = dict(table.counts)
        logits = llm.prompt_logits(prompt)[0]
        return logits, {k: n - before.get(k, 0) for k, n in table.counts.items() if n != before.get(k, 0)}

    a_counts_before_b = dict(ta.counts)
    logits_b, calls_b = run(b)
    assert dict(ta.counts) == a_counts_before_b              # B's step went through B's table only
    logits_a, calls_a = run(a)
    assert {backend for _, backend in calls_a} == {"torch"}
    assert {backend for _, backend in calls_b} == {"triton"}  # every op the demo model runs has a kernel
    assert set(op for op, _ in calls_a) == set(op for op, _ in calls_b)
    # each engine's logits are its backend's: A's equal the torch reference of the same step run
    # again, B's those of B alone again; the two backends agree to float tolerance
    again_b, _ = run(b)
    again_a, _ = run(a)
    assert torch.equal(logits_a, again_a) and torch.equal(logits_b, again_b)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-3)
