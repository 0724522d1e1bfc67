"""MTP drafts (engine/mtp_proposer.py) against a reference written from the checkpoint's own
tensor names: enorm(embed_tokens(next token)), hnorm(hidden), eh_proj(concat), the decoder
layer (transformers' DeepseekV3 layer holding the MTP block's tensors), shared_head.norm and
shared_head.head; drafts past the first feed the layer's own output back (vLLM's k > 1)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from deepserve.config import HFConfig
from deepserve.engine.mtp_proposer import MTPProposer
from deepserve.models.deepseek_mtp import DeepseekMTP
from deepserve.models.loader import process_weights_after_loading
from tests.models.hf_reference import assert_close_rel
from tests.models.paged_harness import allocate_kv_cache, build_meta
from tests.models.test_deepseek import r1_style, save_deepseek

MTP_LAYER = 4          # R1 saves its MTP as model.layers.{num_hidden_layers}.*
BLOCK, BLOCKS_PER_SEQ = 4, 8


@pytest.fixture(scope="module")
def mtp_pair(tmp_path_factory):
    """(our DeepseekMTP loaded from R1-style tensor names, the tensors, transformers' one-layer
    model whose layer 0 is the MTP block)."""
    path = tmp_path_factory.mktemp("mtp_block")
    block_cfg = r1_style()
    block_cfg.num_hidden_layers, block_cfg.first_k_dense_replace = 1, 0      # layer 0: MoE like layer 4
    ref = save_deepseek(transformers.DeepseekV3ForCausalLM, block_cfg, path)
    tensors = {name.replace("model.layers.0.", f"model.layers.{MTP_LAYER}."): t
               for name, t in load_file(str(path / "model.safetensors")).items() if name.startswith("model.layers.0.")}
    gen = torch.Generator().manual_seed(11)
    d, v = block_cfg.hidden_size, block_cfg.vocab_size
    for part, shape in {"embed_tokens.weight": (v, d), "enorm.weight": (d,), "hnorm.weight": (d,),
                        "eh_proj.weight": (d, 2 * d), "shared_head.norm.weight": (d,),
                        "shared_head.head.weight": (v, d)}.items():
        scale = 0.1 if part.endswith("norm.weight") else 0.2
        base = 1.0 if part.endswith("norm.weight") else 0.0
        tensors[f"model.layers.{MTP_LAYER}.{part}"] = base + scale * torch.randn(shape, generator=gen)
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=MTP_LAYER, first_k_dense_replace=2, num_nextn_predict_layers=1)
    ours = DeepseekMTP(HFConfig(config), layer_idx=MTP_LAYER)
    assert ours.load_weights(iter(tensors.items())) == {n for n, _ in ours.named_parameters()}
    process_weights_after_loading(ours)
    return ours, {k.split(f"layers.{MTP_LAYER}.")[1]: t for k, t in tensors.items()}, ref


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def reference_mtp(t, ref, next_ids, hidden):
    """One sequence from position 0: (pre-norm output [n, D], logits [n, V])."""
    x = torch.cat((rms(t["embed_tokens.weight"][next_ids], t["enorm.weight"]),
                   rms(hidden, t["hnorm.weight"])), dim=-1) @ t["eh_proj.weight"].T
    captured = {}
    hook = ref.model.layers[0].register_forward_hook(
        lambda _m, _i, out: captured.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        ref.model.norm.weight.copy_(t["shared_head.norm.weight"])
        normed = ref.model(inputs_embeds=x[None]).last_hidden_state[0]
    finally:
        hook.remove()
    return captured["h"][0], normed @ t["shared_head.head.weight"].T


def reference_drafts(t, ref, tokens, hidden, k):
    """k drafts after `tokens` (whose last one was just sampled), `hidden` the target's output
    at positions 0..len-2: the module runs on (token i+1, hidden i), then on its own outputs."""
    next_ids, hid = list(tokens[1:]), hidden
    drafts, logits = [], []
    for _ in range(k):
        pre, lg = reference_mtp(t, ref, torch.tensor(next_ids), hid)
        logits.append(lg[-1])
        drafts.append(int(lg[-1].argmax()))
        next_ids.append(drafts[-1])
        hid = torch.cat((hid, pre[-1:]))
    return drafts, torch.stack(logits)


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_drafts_match_the_reference(mtp_pair, k):
    ours, tensors, ref = mtp_pair
    gen = torch.Generator().manual_seed(k)
    d = tensors["eh_proj.weight"].shape[0]
    # two sequences of 9 and 14 tokens (the last one just sampled) in one flat batch
    seqs = [torch.randint(0, 256, (9,), generator=gen).tolist(), torch.randint(0, 256, (14,), generator=gen).tolist()]
    hiddens = [3 * torch.randn(len(s) - 1, d, generator=gen) for s in seqs]
    lens = [len(s) - 1 for s in seqs]
    allocate_kv_cache(ours, BLOCKS_PER_SEQ * 2, BLOCK)
    meta, positions = build_meta(lens, lens, BLOCK, BLOCKS_PER_SEQ)
    next_ids = torch.tensor([t for s in seqs for t in s[1:]])
    drafts, logits = MTPProposer(ours, k, BLOCK, BLOCK * BLOCKS_PER_SEQ).propose(torch.cat(hiddens), next_ids, positions, meta)
    assert drafts.shape == (2, k) and logits.shape == (2, k, 256)
    for b, (s, h) in enumerate(zip(seqs, hiddens)):
        want_ids, want_logits = reference_drafts(tensors, ref, s, h, k)
        assert_close_rel(logits[b], want_logits)
        assert drafts[b].tolist() == want_ids


def test_mtp_drafts_over_cached_context(mtp_pair):
    """A verify-like step: the module already holds KV for a sequence's first positions, the
    step adds several positions (its queries attend to the cached context)."""
    ours, tensors, ref = mtp_pair
    gen = torch.Generator().manual_seed(5)
    d = tensors["eh_proj.weight"].shape[0]
    seq = torch.randint(0, 256, (13,), generator=gen).tolist()
    hidden = 3 * torch.randn(len(seq) - 1, d, generator=gen)
    next_ids = torch.tensor(seq[1:])
    allocate_kv_cache(ours, BLOCKS_PER_SEQ, BLOCK)
    first = 7
    with torch.no_grad():
        meta, pos = build_meta([first], [first], BLOCK, BLOCKS_PER_SEQ)
        ours(next_ids[:first], pos, hidden[:first], meta)
    meta, pos = build_meta([len(seq) - 1 - first], [len(seq) - 1], BLOCK, BLOCKS_PER_SEQ)
    drafts, logits = MTPProposer(ours, 2, BLOCK, BLOCK * BLOCKS_PER_SEQ).propose(hidden[first:], next_ids[first:], pos, meta)
    want_ids, want_logits = reference_drafts(tensors, ref, seq, hidden, 2)
    assert_close_rel(logits[0], want_logits)
    assert drafts[0].tolist() == want_ids
