"""lm-eval's local-completions requests, sent as it sends them (no lm-eval needed): a batch of
token-id prompts with echo, max_tokens 1 and logprobs 1, read as it reads them (the sum of the
continuation's echoed logprobs, greedy when each is its position's top). The numbers must be
transformers' own (fp32 log_softmax of the demo model's logits over the same tokens)."""
from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY

from deepserve.config import DEMO_MODEL

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PAIRS = [("Once upon a time, there was a little", " girl"),
         ("The sun was", " shining brightly in the sky"),
         ("Lily wanted to play with her", " spoon"),
         ("One day, a big dog", " saw a red ball and ran to get it. The dog was very happy")]


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    import torch
    with torch.no_grad():
        logprobs = model(torch.tensor([context + continuation])).logits[0].double().log_softmax(-1)
    rows = logprobs[len(context) - 1:-1]
    total = sum(rows[i, t].item() for i, t in enumerate(continuation))
    return total, all(int(rows[i].argmax()) == t for i, t in enumerate(continuation))


def lm_eval_read(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-eval 0.4's LocalCompletionsAPI.parse_logprobs for one choice."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))


def tokenize(server, text: str, special: bool) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "add_special_tokens": special}, headers=HEADERS)
    return r.json()["tokens"]


def test_batched_loglikelihoods_are_transformers(demo_server, hf_model):
    """Four pairs of different lengths in one request: each choice (in index order) scores its own
    prompt; the first pair's continuation is the demo model's greedy word, the third's is not."""
    pairs = []
    for context, continuation in PAIRS:
        whole = tokenize(demo_server, context + continuation, special=True)
        ctx = tokenize(demo_server, context, special=True)
        assert whole[:len(ctx)] == ctx
        pairs.append((ctx, whole[len(ctx):]))
    body = {"model": "stories260k", "prompt": [c + t for c, t in pairs], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(demo_server.v1 + "/completions", json=body, headers=HEADERS, timeout=60).json()
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert len(choices) == len(pairs)
    got = [lm_eval_read(choice, len(ctx)) for choice, (ctx, _) in zip(choices, pairs)]
    want = [reference(hf_model, ctx, cont) for ctx, cont in pairs]
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-3)
        assert g_greedy == w_greedy
    assert got[0][1] and not got[2][1]


def test_rolling_windows_are_transformers(demo_server, hf_model):
    """loglikelihood_rolling (perplexity): a text longer than lm-eval's window, scored as disjoint
    windows that each open with the prefix token (BOS) or the last tokens of the one before; the
    windows' sum is transformers' log-likelihood of each token given its window."""
    text = " ".join(c + t for c, t in PAIRS) * 3
    tokens = tokenize(demo_server, text, special=False)
    window = 48
    assert len(tokens) > 2 * window
    prompts, ctxlens, refs = [], [], []
    for start in range(0, len(tokens), window):
        context = [1] if start == 0 else tokens[start - 1:start]   # context_len 1, as lm-eval's max_seq_len - 1 windows
        scored = tokens[start:start + window]
        prompts.append(context + scored)
        ctxlens.append(len(context))
        refs.append(reference(hf_model, context, scored)[0])
    body = {"model": "stories260k", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "echo": True}
    r = httpx.post(demo_server.v1 + "/completions", json=body, headers=HEADERS, timeout=60).json()
    choices = sorted(r["choices"], key=lambda c: c["index"])
    got = [lm_eval_read(choice, n)[0] for choice, n in zip(choices, ctxlens)]
    assert sum(got) == pytest.approx(sum(refs), abs=1e-3)
    assert got == pytest.approx(refs, abs=1e-3)
