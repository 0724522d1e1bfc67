"""Int8 routed experts (layers/moe_int8.py): a tiny DeepSeek-V3 served from an msModelSlim
W8A8 folder (made by the format's rule from `convert quantize --method w8a8-int8`, as
test_modelslim.py does) keeps its experts int8 (bytes checked) and its greedy tokens follow
the same model holding the bf16 dequantization of every int8 weight; experts split over TP or
EP ranks sum to the whole; a float checkpoint tensor is quantized at load as the converter
does; a layer whose experts disagree on their type is refused."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.moe import FusedMoE
from deepserve.layers.moe_int8 import Int8Experts
from deepserve.quant import quant_int8_per_channel, quantize_checkpoint
from tests.models.test_deepseek import r1_style, save_deepseek
from tests.quant.test_modelslim import TOKENIZER, to_modelslim

PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 200, 11, 54, 9], [250, 1, 77, 77, 13, 140, 6, 93],
           [9, 8, 7, 6, 5, 4, 3], [100, 101, 102, 250, 3, 3]]


def _dequantized(slim, dst):
    """The msModelSlim folder with every int8 weight replaced by (q - offset) * scale in bf16
    (written independently of the loader's dequantization)."""
    dst.mkdir()
    for f in slim.iterdir():
        if f.suffix != ".safetensors":
            if f.name != "quant_model_description.json":
                dst.joinpath(f.name).write_bytes(f.read_bytes())
            continue
        tensors = load_file(str(f))
        out = {}
        for name, t in tensors.items():
            if t.dtype == torch.int8:
                m = name[: -len(".weight")]
                w = (t.double() - tensors[m + ".weight_offset"].double()) * tensors[m + ".weight_scale"].double()
                out[name] = w.to(torch.bfloat16)
            elif not name.endswith((".weight_scale", ".weight_offset")):
                out[name] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {n: s for n, s in data["weight_map"].items()
                              if not n.endswith((".weight_scale", ".weight_offset"))}
        index.write_text(json.dumps(data))
    return dst


def _greedy(llm, n=12):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


def test_modelslim_deepseek_keeps_experts_int8_and_follows_its_bf16_dequantization(tmp_path):
    model = save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    with torch.no_grad():   # decisive greedy choices (tests/quant/test_serving.py's deepseek_decisive)
        model.model.embed_tokens.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "ref")
    quantize_checkpoint(tmp_path / "ref", tmp_path / "ct", "w8a8-int8", progress=False)
    slim = to_modelslim(tmp_path / "ct", tmp_path / "slim")
    llm = LLM(model=str(slim), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[3].mlp.experts
    assert isinstance(experts.quant, Int8Experts)
    e, d, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == torch.int8
    nbytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    assert nbytes == e * (2 * i * d + d * i) + 4 * e * (2 * i + d)     # one byte a value + fp32 row scales
    # the stored int8 values, as the checkpoint holds them
    stored = load_file(str(next(slim.glob("*.safetensors"))))
    assert torch.equal(experts.w2_weight[5], stored["model.layers.3.mlp.experts.5.down_proj.weight"])
    bf16 = LLM(model=str(_dequantized(slim, tmp_path / "bf16")), dtype="float32", tokenizer=TOKENIZER)
    assert bf16.engine.runner.model.model.layers[3].mlp.experts.w13_weight.dtype == torch.float32
    got, ref = _greedy(llm), _greedy(bf16)
    agree = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / sum(len(y) for y in ref)
    print(f"msModelSlim W8A8 vs its bf16 dequantization: greedy agreement {agree:.3f}")
    assert agree >= 0.95, (got, ref)


def _ckpt(e, d, i, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for ex in range(e):
        for part, (n, k) in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
            out[(ex, part)] = quant_int8_per_channel(torch.randn(n, k, generator=g) * 0.1)
    return out


def _build(ckpt, e, d, i, pctx, float_weights=False):
    moe = FusedMoE(e, d, i, pctx=pctx, reduce_results=False)
    Int8Experts().create(moe)
    for (ex, part), (q, s) in ckpt.items():
        which = "w2" if part == "w2" else "w13"
        w, sc = getattr(moe, f"{which}_weight"), getattr(moe, f"{which}_weight_scale")
        if float_weights:
            w.weight_loader(w, q.float() * s, (ex, part))
        else:
            w.weight_loader(w, q, (ex, part))
            sc.weight_loader(sc, s, (ex, part))
    return moe


def test_int8_experts_split_over_tp_and_ep_ranks_sum_to_the_whole():
    e, d, i = 4, 64, 64
    ckpt = _ckpt(e, d, i, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, d, generator=g)
    wts, ids = torch.rand(3, 2, generator=g), torch.tensor([[0, 3], [1, 2], [3, 1]])
    whole = _build(ckpt, e, d, i, ParallelContext())
    out = whole(x, wts, ids)
    # one process: exactly the torch op on the checkpoint's tensors
    want = torch.zeros_like(out)
    for t in range(3):
        for j in range(2):
            ex = int(ids[t, j])
            (q1, s1), (q3, s3), (q2, s2) = (ckpt[(ex, p)] for p in ("w1", "w3", "w2"))
            from deepserve.ops.quant import int8_linear
            h = torch.nn.functional.silu(int8_linear(x[t:t + 1], q1, s1)) * int8_linear(x[t:t + 1], q3, s3)
            want[t] += wts[t, j] * int8_linear(h, q2, s2)[0]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    tp = [_build(ckpt, e, d, i, ParallelContext(tp_rank=r, tp_size=2)) for r in range(2)]
    assert tp[0].w13_weight.shape == (e, i, d) and tp[0].w2_weight_scale.shape == (e, d, 1)
    # per-token int8 of each rank's own slice of h: close to the whole, not bit-equal
    torch.testing.assert_close(tp[0](x, wts, ids) + tp[1](x, wts, ids), out, rtol=0.02, atol=0.02 * out.abs().max().item())
    ep = [_build(ckpt, e, d, i, ParallelContext(ep_rank=r, ep_size=2)) for r in range(2)]
    assert ep[1].w13_weight.shape == (2, 2 * i, d)
    torch.testing.assert_close(ep[0](x, wts, ids) + ep[1](x, wts, ids), out, rtol=1e-6, atol=1e-6)
    # float checkpoint tensors are quantized at load with the converter's rule
    floats = _build(ckpt, e, d, i, ParallelContext(), float_weights=True)
    for name in ("w13_weight", "w2_weight"):      # q * s quantized again: within one step of q
        torch.testing.assert_close(getattr(floats, name), getattr(whole, name), rtol=0, atol=1)
    for name in ("w13_weight_scale", "w2_weight_scale"):
        torch.testing.assert_close(getattr(floats, name), getattr(whole, name), rtol=1e-6, atol=0)


def test_experts_of_one_layer_with_different_types_are_refused(tmp_path):
    from deepserve.layers.quantization_modelslim import quantize_modelslim_experts
    moe = torch.nn.Module()
    moe.layers = torch.nn.ModuleList([torch.nn.Module()])
    moe.layers[0].experts = FusedMoE(2, 16, 16)
    desc = {f"layers.0.experts.{e}.{p}.weight": "W8A8_DYNAMIC" for e in range(2)
            for p in ("gate_proj", "up_proj", "down_proj")}
    assert quantize_modelslim_experts(moe, desc) == ["layers.0.experts"]
    moe.layers[0].experts = FusedMoE(2, 16, 16)
    desc["layers.0.experts.1.down_proj.weight"] = "W8A8"
    with pytest.raises(ValueError, match="layers.0.experts.1.down_proj is not"):
        quantize_modelslim_experts(moe, desc)


def test_static_w8a8_experts_are_dequantized_at_load(tmp_path):
    """Experts the description stores as static "W8A8" (one activation quantizer per matrix) are
    not run as int8: they load as (q - offset) * scale in the model dtype, their activation
    quantizers dropped, while the layers beside them stay int8."""
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    quantize_checkpoint(tmp_path / "ref", tmp_path / "ct", "w8a8-int8", progress=False)
    slim = to_modelslim(tmp_path / "ct", tmp_path / "slim")
    desc_file = slim / "quant_model_description.json"
    desc = json.loads(desc_file.read_text())
    desc.update({n: "W8A8" for n in desc if ".experts." in n})
    desc_file.write_text(json.dumps(desc))
    shard = next(slim.glob("*.safetensors"))
    tensors = load_file(str(shard))
    for n in [n for n in tensors if ".experts." in n and n.endswith(".weight") and tensors[n].dtype == torch.int8]:
        m = n[: -len(".weight")]
        tensors[m + ".input_scale"], tensors[m + ".input_offset"] = torch.tensor([0.02]), torch.tensor([0.0])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    model = LLM(model=str(slim), dtype="float32", tokenizer=TOKENIZER).engine.runner.model
    experts = model.model.layers[3].mlp.experts
    assert not isinstance(experts.quant, Int8Experts) and experts.w2_weight.dtype == torch.float32
    m = "model.layers.3.mlp.experts.5.down_proj"
    torch.testing.assert_close(experts.w2_weight[5], tensors[m + ".weight"].float() * tensors[m + ".weight_scale"])
    assert model.model.layers[3].self_attn.o_proj.weight.dtype == torch.int8
