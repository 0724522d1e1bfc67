"""`deepserve convert quantize --method w4a16|w4a8`: round-to-nearest and GPTQ 4-bit checkpoints.

- RTN output, unpacked here by each format's published rule (numpy, independent of deepserve's
  unpacking), holds exactly round(W / s) + z with the min-max scales, and the 4-bit model
  deepserve loads from it gives exactly the logits of the fp32 model holding (u - z) * s;
- GPTQ-converted stories260k keeps its story (teacher-forced top-1 agreement with fp32 >= 90%
  over a 200-token greedy story), and GPTQ's error is lower than RTN's on the calibration data:
  per layer (the Hessian-weighted error of every Linear) and for the whole model (KL to fp32);
- GPTQ on an identity Hessian is RTN; on correlated inputs it beats RTN, with act order too;
- W4A8 output loads (int8 activations) and serves; a tiny DeepSeek-V3's experts are quantized
  with their own routed tokens and stay packed when served;
- an interrupted GPTQ conversion resumes from the shards written and ends identical;
- bad input is one line on stderr and writes nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams
from deepserve.cli.main import main
from deepserve.models.calibration import LayerRunner
from deepserve.quant import Int4Options, pipeline, quantize_checkpoint
from deepserve.quant.calib_data import calibration_samples
from deepserve.quant.checkpoint import open_checkpoint
from deepserve.quant.gptq import gptq_quantize, gptq_quantize_batch, rtn_quantize
from deepserve.quant.quantize_int4 import QuantizeInt4
from tests.conftest import DEMO_MODEL

CALIB = "datasets/serving/ShareGPT_V3_unfiltered_cleaned_split.first500.json"
# stories260k's down_proj has 172 input features: they do not pack into int32s of eight
NO_DOWN = ("re:.*down_proj$",)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROMPT = "Once upon a time, there was a little girl named Lily."


def _opts(shared_dir=None, **kw) -> Int4Options:
    base = dict(group_size=16, symmetric=False, ignore=NO_DOWN, calib_samples=8, calib_seq_len=128,
                calib_dataset=str(shared_dir / CALIB) if shared_dir else None)
    return Int4Options(**{**base, **kw})


def _convert(src: Path, dst: Path, opts: Int4Options, method: str = "w4a16") -> Path:
    quantize_checkpoint(src, dst, method, progress=False, int4=opts, runner=LayerRunner)
    return dst


# ---------------------------------------------------------------- independent unpacking (numpy)
def _nibbles(packed: torch.Tensor, axis: int, order=range(8)) -> np.ndarray:
    """int32 -> nibbles 8x longer along `axis`: nibble i of index c is index 8c + order[i]."""
    p = np.moveaxis(packed.numpy().view(np.uint32), axis, -1)
    out = np.zeros(p.shape[:-1] + (p.shape[-1] * 8,), dtype=np.int64)
    for i, col in enumerate(order):
        out[..., col::8] = (p >> (4 * i)) & 0xF
    return np.moveaxis(out, -1, axis)


def _read_int4(folder: Path, module: str, fmt: str, n: int, k: int):
    """(u [N, K], z [N, G] or 8, s [N, G]) of `module` as stored."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        t = {name.rsplit(".", 1)[1]: f.get_tensor(name) for name in f.keys() if name.startswith(module + ".")}
    if fmt == "awq":
        u = _nibbles(t["qweight"], 1, AWQ_ORDER).T
        z = _nibbles(t["qzeros"], 1, AWQ_ORDER).T
        return torch.from_numpy(u), torch.from_numpy(z), t["scales"].t()
    assert t["weight_shape"].tolist() == [n, k]
    u = _nibbles(t["weight_packed"], 1)
    z = _nibbles(t["weight_zero_point"], 0)[:n] if "weight_zero_point" in t else 8
    return torch.from_numpy(u), z if isinstance(z, int) else torch.from_numpy(z), t["weight_scale"]


def _linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t for n, t in load_file(str(folder / "model.safetensors")).items()
            if n.endswith(".weight") and t.dim() == 2 and "embed" not in n}


# ---------------------------------------------------------------- the fp32 story, once
@pytest.fixture(scope="module")
def story():
    ref = LLM(model=str(DEMO_MODEL), dtype="float32")
    prompt = ref.tokenizer.encode(PROMPT)
    out = ref.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))[0].outputs[0].token_ids
    return prompt, list(out)


def _agreement(folder: Path, story) -> float:
    prompt, out = story
    llm = LLM(model=str(folder), dtype="float32", tokenizer=str(DEMO_MODEL))
    logits = llm.prompt_logits([prompt + out])[0]
    return (logits[len(prompt) - 1:-1].argmax(-1) == torch.tensor(out)).float().mean().item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_dir):
    """algorithm -> stories260k in compressed-tensors W4A16, asymmetric, group 16, down_proj kept fp32."""
    root = tmp_path_factory.mktemp("int4")
    return {algo: _convert(DEMO_MODEL, root / algo, _opts(shared_dir, algorithm=algo)) for algo in ("gptq", "rtn")}


# ---------------------------------------------------------------- RTN: exact round trip
RTN_CASES = [("compressed-tensors", 32, True, NO_DOWN), ("compressed-tensors", -1, False, NO_DOWN),
             ("awq", 32, False, ("re:.*mlp\\..*",))]   # AWQ packs output features: gate/up's 172 rows do not


@pytest.mark.parametrize("fmt,group,sym,ignore", RTN_CASES, ids=["ct-g32-sym", "ct-channel-asym", "awq-g32"])
def test_rtn_round_trip_is_the_exact_dequantization(tmp_path, fmt, group, sym, ignore):
    q = _convert(DEMO_MODEL, tmp_path / "q", _opts(algorithm="rtn", fmt=fmt, group_size=group, symmetric=sym,
                                                    ignore=ignore))
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == ("awq" if fmt == "awq" else "compressed-tensors")
    floats, kept = _linear_weights(DEMO_MODEL), _linear_weights(q)
    deq = load_file(str(DEMO_MODEL / "model.safetensors"))
    quantized = 0
    for name, w in floats.items():          # the min-max grid, in fp32 like the stored weights
        module = name[: -len(".weight")]
        if name in kept:
            continue                                         # kept in fp32 (ignored / lm_head)
        n, k = w.shape
        u, z, s = _read_int4(q, module, fmt, n, k)
        g = k if group == -1 else group
        wg = w.reshape(n, k // g, g)
        if sym:
            want_s = wg.abs().amax(-1) / 7.5
        else:
            lo = wg.amin(-1).clamp(max=0)
            want_s = (wg.amax(-1).clamp(min=0) - lo) / 15
        assert torch.equal(s.float(), want_s), module
        if not sym:
            assert torch.equal(z, torch.round(-lo / want_s).long()), module
        zz = z if isinstance(z, int) else z.repeat_interleave(g, 1)
        want_u = torch.clamp(torch.round(w / want_s.repeat_interleave(g, 1)) + zz, 0, 15)
        assert torch.equal(u, want_u.long()), module
        deq[name] = ((u - zz).double() * s.double().repeat_interleave(g, 1)).float().contiguous()
        quantized += 1
    assert quantized == 5 * (4 if fmt == "awq" else 6)     # q, k, v, o (gate, up) per layer
    folder = tmp_path / "deq"
    shutil.copytree(DEMO_MODEL, folder)
    save_file(deq, str(folder / "model.safetensors"), metadata={"format": "pt"})
    prompts = [[1, 403, 261, 378, 9, 11], [1, 68, 19, 300, 44, 2, 7, 99, 131]]
    got = torch.cat(LLM(model=str(q), dtype="float32", tokenizer=str(DEMO_MODEL)).prompt_logits(prompts))
    want = torch.cat(LLM(model=str(folder), dtype="float32").prompt_logits(prompts))
    assert torch.equal(got, want), (got - want).abs().max()


# ---------------------------------------------------------------- GPTQ
def test_gptq_stories260k_keeps_its_story(converted, story):
    packed = [n for n in load_file(str(converted["gptq"] / "model.safetensors")) if n.endswith(".weight_packed")]
    assert len(packed) == 5 * 6                           # q, k, v, o, gate, up per layer, 4-bit
    agree = _agreement(converted["gptq"], story)
    print(f"stories260k GPTQ W4A16 g16: top-1 agreement with fp32 over 200 tokens {agree:.3f}")
    assert agree >= 0.90


def _calibration(shared_dir) -> list[torch.Tensor]:
    cfg = json.loads((DEMO_MODEL / "config.json").read_text())
    return calibration_samples(shared_dir / CALIB, DEMO_MODEL, 8, 128, cfg["eos_token_id"])


def test_gptq_error_is_lower_than_rtn_on_the_calibration_data(converted, shared_dir):
    # per layer: tr((W - Q) H (W - Q)^T), H over layer 0's calibration inputs
    ckpt = open_checkpoint(DEMO_MODEL)
    floats = load_file(str(DEMO_MODEL / "model.safetensors"))
    samples = _calibration(shared_dir)
    runner = LayerRunner(ckpt.config, floats["model.embed_tokens.weight"], samples)
    stats = runner.capture(0, {n: t for n, t in floats.items() if n.startswith("model.layers.0.")})
    for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"model.layers.0.self_attn.{module}"
        w, h = floats[name + ".weight"], stats.hessians[name].double()
        err = {}
        for algo, q in (("gptq", gptq_quantize(w, stats.hessians[name], 32, True, torch.float32)),
                        ("rtn", rtn_quantize(w, 32, True, torch.float32))):
            d = (w - q.dequant()).double()
            err[algo] = torch.trace(d @ h @ d.t()).item()
        print(f"{name}: output error GPTQ {err['gptq']:.4g}, RTN {err['rtn']:.4g}")
        assert err["gptq"] < 0.9 * err["rtn"], (name, err)
    # whole model: mean KL(fp32 || 4-bit) over the calibration tokens
    ids = [s.tolist() for s in samples]
    ref = torch.cat(LLM(model=str(DEMO_MODEL), dtype="float32").prompt_logits(ids)).log_softmax(-1)
    kl = {}
    for algo, folder in converted.items():
        lq = torch.cat(LLM(model=str(folder), dtype="float32", tokenizer=str(DEMO_MODEL)).prompt_logits(ids))
        kl[algo] = (ref.exp() * (ref - lq.log_softmax(-1))).sum(-1).mean().item()
    print(f"stories260k calibration KL to fp32: GPTQ {kl['gptq']:.4f}, RTN {kl['rtn']:.4f}")
    assert 0 < kl["gptq"] < kl["rtn"]


def test_gptq_on_identity_hessian_is_rtn_and_beats_it_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * 0.05
    for group, sym in ((32, True), (-1, False), (64, False)):
        rtn = rtn_quantize(w, group, sym, torch.float16)
        same = gptq_quantize(w, torch.eye(128), group, sym, torch.float16)
        assert torch.equal(same.u, rtn.u) and torch.equal(same.scales, rtn.scales)
    # inputs with a few dominant, correlated directions (as LLM activations have)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128, generator=g)
    x[:, :4] *= 20
    h = x.t() @ x
    ref = x @ w.t()

    def err(q):
        return (x @ q.dequant().t() - ref).pow(2).mean().item()
    rtn = err(rtn_quantize(w, 32, True, torch.float16))
    plain = gptq_quantize(w, h, 32, True, torch.float16)
    ordered = gptq_quantize(w, h, 32, True, torch.float16, act_order=True)
    assert plain.g_idx is None and ordered.g_idx is not None
    # act order: the most active inputs (the scaled ones) are quantized first, in group 0
    assert ordered.g_idx[:4].tolist() == [0, 0, 0, 0] and sorted(torch.bincount(ordered.g_idx).tolist()) == [32] * 4
    print(f"output MSE: RTN {rtn:.3g}, GPTQ {err(plain):.3g}, GPTQ act-order {err(ordered):.3g}")
    assert err(plain) < 0.7 * rtn and err(ordered) < 0.7 * rtn
    # experts of one projection in one batch: each as it would be alone
    ws = torch.stack([w, w.flip(0), w * 2])
    hs = torch.stack([h, torch.eye(128), h.flip(0).flip(1)])
    for act_order in (False, True):
        batch = gptq_quantize_batch(ws, hs, 32, False, torch.float16, act_order=act_order)
        for wi, hi, q in zip(ws, hs, batch):
            one = gptq_quantize(wi, hi, 32, False, torch.float16, act_order=act_order)
            assert (q.u == one.u).float().mean() > 0.999 and (q.g_idx is None) == (not act_order)
            torch.testing.assert_close(q.dequant(), one.dequant(), rtol=0, atol=2e-3)


def test_w4a8_output_loads_and_serves(tmp_path, shared_dir, story):
    q = _convert(DEMO_MODEL, tmp_path / "w4a8", _opts(shared_dir), method="w4a8")
    acts = json.loads((q / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert acts["input_activations"]["num_bits"] == 8 and acts["input_activations"]["dynamic"]
    llm = LLM(model=str(q), dtype="float32", tokenizer=str(DEMO_MODEL))
    model = llm.engine.runner.model
    assert model.quantization == "w4a8-int8"
    assert model.model.layers[0].self_attn.qkv_proj.quant_method.spec.activations == "int8-token"
    text = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0].text
    assert len(text.split()) >= 10, text
    agree = _agreement(q, story)
    print(f"stories260k GPTQ W4A8: top-1 agreement with fp32 over 200 tokens {agree:.3f}; {text!r}")
    assert agree >= 0.85


def _dequantized_folder(q: Path, dst: Path) -> Path:
    """The fp32 folder holding (u - z) * s for every compressed-tensors 4-bit module of `q`."""
    tensors = load_file(str(q / "model.safetensors"))
    out = {n: t for n, t in tensors.items() if not n.rsplit(".", 1)[1].startswith("weight_")}
    for name in tensors:
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            n, k = tensors[module + ".weight_shape"].tolist()
            u, z, s = _read_int4(q, module, "compressed-tensors", n, k)
            g = k // s.shape[1]
            zz = z if isinstance(z, int) else z.repeat_interleave(g, 1)
            out[module + ".weight"] = ((u - zz).double() * s.double().repeat_interleave(g, 1)).float()
    shutil.copytree(q, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_deepseek_experts_are_quantized_with_their_tokens_and_stay_packed(tmp_path, shared_dir):
    transformers = pytest.importorskip("transformers")
    from tests.models.test_deepseek import r1_style, save_deepseek
    cfg = r1_style()
    cfg.vocab_size = 512                                   # stories260k's tokenizer for calibration
    save_deepseek(transformers.DeepseekV3ForCausalLM, cfg, tmp_path / "ref")
    shutil.copy(DEMO_MODEL / "tokenizer.json", tmp_path / "ref" / "tokenizer.json")
    conv = QuantizeInt4(_opts(shared_dir, group_size=16, ignore=(), calib_samples=4, calib_seq_len=64),
                        runner=LayerRunner)
    pipeline.run_conversion(tmp_path / "ref", tmp_path / "q", conv, open_checkpoint(tmp_path / "ref"), progress=False)
    experts = [n for n in load_file(str(tmp_path / "q" / "model.safetensors")) if ".experts." in n]
    assert sum(n.endswith(".weight_packed") for n in experts) == 2 * 8 * 3     # 2 MoE layers x 8 x 3
    # GPTQ ran on every matrix (each expert on the tokens routed to it), none fell back to RTN
    assert conv.rtn_fallback == []
    llm = LLM(model=str(tmp_path / "q"), dtype="float32", tokenizer=str(DEMO_MODEL))
    assert llm.engine.runner.model.model.layers[2].mlp.experts.quant is not None
    deq = LLM(model=str(_dequantized_folder(tmp_path / "q", tmp_path / "deq")), dtype="float32",
              tokenizer=str(DEMO_MODEL))
    prompts = [[1, 403, 261, 378, 9, 11], [1, 68, 19, 300, 44, 2, 7, 99, 131]]
    got, want = torch.cat(llm.prompt_logits(prompts)), torch.cat(deq.prompt_logits(prompts))
    assert torch.equal(got, want), (got - want).abs().max()


# ---------------------------------------------------------------- resume
def _two_shards(dst: Path) -> Path:
    """stories260k split into two shards (layers 0-2 with the embedding, then the rest)."""
    shutil.copytree(DEMO_MODEL, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(DEMO_MODEL / "model.safetensors"))
    first = {n for n in tensors if "embed" in n or any(f"layers.{i}." in n for i in range(3))}
    shards = {"model-00001-of-00002.safetensors": {n: tensors[n] for n in first},
              "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in first}}
    for fname, ts in shards.items():
        save_file(ts, str(dst / fname), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ts in shards.items() for n in ts}}))
    return dst


def test_interrupted_gptq_conversion_resumes_and_ends_identical(tmp_path, shared_dir, monkeypatch):
    src = _two_shards(tmp_path / "src")
    opts = _opts(shared_dir)
    whole = _convert(src, tmp_path / "whole", opts)
    write = pipeline._write_shard

    def fail_second(path, tensors):
        if path.name.startswith("model-00002"):
            raise OSError("disk went away")
        return write(path, tensors)
    monkeypatch.setattr(pipeline, "_write_shard", fail_second)
    with pytest.raises(OSError, match="disk went away"):
        _convert(src, tmp_path / "out", opts)
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "model-00001-of-00002.safetensors").is_file()
    monkeypatch.setattr(pipeline, "_write_shard", write)
    rep = quantize_checkpoint(src, tmp_path / "out", "w4a16", progress=False, int4=opts, runner=LayerRunner)
    assert (rep.shards_converted, rep.shards_skipped) == (1, 1)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a, b = load_file(str(whole / shard)), load_file(str(tmp_path / "out" / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard


# ---------------------------------------------------------------- bad input
def _fails(capsys, argv, dst, *fragments):
    assert main(["convert", "quantize", str(DEMO_MODEL), str(dst), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepserve convert: error: "), err
    for frag in fragments:
        assert frag in err, err
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()


def test_bad_input_is_one_line(tmp_path, capsys, shared_dir):
    dst = tmp_path / "out"
    rtn = ["--algorithm", "rtn"]
    _fails(capsys, ["--method", "w4a3"], dst, "--method must be one of fp8-block, w8a8-int8, w4a16, w4a8, got 'w4a3'")
    _fails(capsys, ["--method", "w4a16", "--group-size", "48", *rtn, "--ignore", NO_DOWN[0]], dst,
           "tensor model.layers.0.mlp.gate_proj.weight: --group-size 48 does not divide its 64 input features")
    _fails(capsys, ["--method", "w4a16", "--group-size", "20", *rtn], dst, "--group-size must be -1 or a positive "
           "multiple of 8, got 20")
    _fails(capsys, ["--method", "w4a16", *rtn, "--group-size", "32"], dst,
           "tensor model.layers.0.mlp.down_proj.weight: 172 input features do not pack",
           "--ignore 're:model\\.layers\\.\\d+\\.mlp\\.down_proj$'")   # every layer's, not layer 0's
    _fails(capsys, ["--method", "w4a16", *rtn], dst,   # group size 128: both problems in one message
           "tensor model.layers.0.mlp.down_proj.weight: 172 input features do not pack",
           "; and tensor model.layers.0.mlp.gate_proj.weight: --group-size 128 does not divide its 64 input features")
    gptq = ["--method", "w4a16", "--group-size", "32", "--ignore", NO_DOWN[0]]
    _fails(capsys, [*gptq, "--calib-dataset", str(shared_dir / "datasets/gsm8k/test.jsonl"),
                    "--calib-seq-len", "100000"], dst, "--calib-seq-len 100000 exceeds the model's "
           "max_position_embeddings 512")
    _fails(capsys, [*gptq, "--calib-dataset", str(shared_dir / "datasets/gsm8k")], dst, "gsm8k is a folder")
    _fails(capsys, [*gptq, "model.layers.0.mlp.dwn_proj", *rtn], dst,      # a typo: would quantize down_proj
           "--ignore model.layers.0.mlp.dwn_proj matches no module of")
    _fails(capsys, ["--method", "w4a16", "--group-size", "32", "--ignore", NO_DOWN[0]], dst,
           "--algorithm gptq needs --calib-dataset FILE")
    _fails(capsys, ["--method", "w4a8", "--format", "awq", *rtn], dst, "--format awq holds W4A16 weights only")
    _fails(capsys, ["--method", "w4a16", "--format", "gguf", *rtn], dst, "--format must be one of")
    _fails(capsys, ["--method", "w4a16", *rtn, "--group-size", "32", "--ignore", NO_DOWN[0],
                    "model.layers.1.self_attn.q_proj"], dst, "run as one fused layer")
    _fails(capsys, ["--method", "fp8-block", "--group-size", "32"], dst, "--group-size applies to the 4-bit methods")
    _fails(capsys, ["--method", "w4a16", *rtn, "--ignore", "re:["], dst,      # was a re.error traceback
           "--ignore 're:[' is not a valid regular expression (unterminated character set")
    _fails(capsys, ["--method", "w4a16", "--group-size", "32", "--ignore", NO_DOWN[0], "--calib-dataset",
                    str(shared_dir / "datasets/gsm8k/test.jsonl"), "--calib-samples", "100000"], dst,
           "fewer than --calib-samples 100000 x --calib-seq-len 512")


def test_a_tokenizer_larger_than_the_model_is_one_line(tmp_path, capsys, shared_dir):
    """GPTQ calibration tokenizes with the checkpoint's tokenizer.json: one whose ids run past
    the model's vocab_size (here R1-Distill-Qwen's beside the 512-token demo model) is named,
    not an IndexError from the embedding."""
    src = tmp_path / "mixed"
    shutil.copytree(DEMO_MODEL, src)
    shutil.copy(shared_dir / "tokenizers/deepseek-r1-distill-qwen-7b/tokenizer.json", src / "tokenizer.json")
    dst = tmp_path / "out"
    argv = ["convert", "quantize", str(src), str(dst), "--method", "w4a16", "--group-size", "32",
            "--ignore", NO_DOWN[0], "--calib-dataset", str(shared_dir / "datasets/gsm8k/test.jsonl"),
            "--calib-samples", "2", "--calib-seq-len", "32", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the model's vocab_size 512" in err, err
    assert not dst.exists() and not dst.with_name("out.partial").exists()
