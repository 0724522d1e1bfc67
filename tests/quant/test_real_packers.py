"""Checkpoints written by the quantization libraries themselves, served by deepserve.

tests/quant/data/real_packers/<case>/ holds a tiny model's checkpoint as compressed-tensors
0.20.1 wrote it (its ModelCompressor, with scales from its own calculate_qparams: see
test_real_packers_live.py, which also rewrites them) and, in reference/weights.safetensors,
the library's own decompression of every quantized module (fp32). CI has no compressed-tensors,
so these files are what it checks: deepserve's logits must equal those of transformers' fp32
model built from the library's decompressed weights, the activations quantized as deepserve
runs them (int8 per token, amax / 127; fp8 per token and 128-wide group, amax / 448) where the
scheme quantizes activations, and greedy tokens must agree.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams

DATA = Path(__file__).resolve().parent / "data" / "real_packers"
TOKENIZER = str(Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "stories260k")
# the method each case must run as: the weights stay in their stored form
METHODS = {"w4a16": "w4a16", "w4a8": "w4a8-int8", "w8a8": "w8a8-int8", "fp8": "fp8", "awq": "awq", "gptq": "gptq"}
EXACT = ("w4a16", "awq", "gptq")       # weight-only: the reference computes what deepserve does


def reference_folder(ckpt: Path, reference: dict[str, torch.Tensor], dst: Path) -> Path:
    """A plain fp32 Hugging Face folder: `ckpt`'s unquantized tensors and, for every module
    `reference` holds a `<module>.weight` of, that weight instead of the module's quantized
    tensors (its bias stays)."""
    modules = {name.rpartition(".")[0] for name in reference}
    tensors = {n: t.float() for n, t in load_file(str(ckpt / "model.safetensors")).items()
               if n.rpartition(".")[0] not in modules or n.endswith(".bias")}
    tensors.update({n: t.float().contiguous() for n, t in reference.items()})
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config")
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _int8_tokens(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / s).round().clamp(-127, 127) * s


def _fp8_groups(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    tiles = torch.nn.functional.pad(x, (0, -k % 128)).unflatten(-1, (-1, 128))
    s = tiles.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    q = (tiles / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return q.flatten(-2)[..., :k]


def _experts_forward(experts, quant):
    """transformers' DeepseekV3Experts forward with `quant` on the input of each GEMM."""
    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j, e in enumerate(top_k_index[t].tolist()):
                gate, up = torch.nn.functional.linear(quant(hidden_states[t]), experts.gate_up_proj[e]).chunk(2, -1)
                h = quant(experts.act_fn(gate) * up)
                out[t] += torch.nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[t, j]
        return out
    return forward


def quantize_activations(model, quantized: set[str], kind: str | None) -> None:
    """Make the fp32 reference model quantize the inputs of the `quantized` modules as deepserve's
    torch path does: `kind` "int8" (per token) or "fp8" (per token and 128-wide group). MLA's
    kv_b_proj and a quantized LM head are dequantized at load (they run in the model dtype), and
    fp8 routed and shared experts run with their weights dequantized per call (ops/moe.py), so
    their inputs stay."""
    if kind is None:
        return
    quant = _int8_tokens if kind == "int8" else _fp8_groups
    for name, module in model.named_modules():
        if type(module).__name__ == "DeepseekV3Experts":
            if kind == "int8" and any(m.startswith(name + ".") for m in quantized):
                module.forward = _experts_forward(module, quant)
        elif name in quantized and not name.endswith(("kv_b_proj", "lm_head")) and not (
                kind == "fp8" and ".shared_experts." in name):
            module.register_forward_pre_hook(lambda mod, args: (quant(args[0]),))


def activation_kind(qc: dict) -> str | None:
    if qc["quant_method"] != "compressed-tensors":
        return None
    (group,) = qc["config_groups"].values()
    acts = group.get("input_activations")
    if not acts:
        return None
    return "int8" if acts["type"] == "int" else "fp8"


def prompts_for(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (6, 13, 25)]


def check_against_reference(ckpt: Path, reference: dict[str, torch.Tensor], tmp: Path, method: str,
                            rtol: float) -> None:
    """deepserve serving `ckpt` as `method` against transformers' fp32 model of `reference`."""
    cfg = json.loads((ckpt / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(reference_folder(ckpt, reference, tmp / "ref")),
                                                           dtype=torch.float32).eval()
    quantize_activations(hf, {n.rpartition(".")[0] for n in reference}, activation_kind(cfg["quantization_config"]))
    prompts = prompts_for(cfg["vocab_size"])
    llm = LLM(model=str(ckpt), dtype="float32", tokenizer=TOKENIZER)
    try:
        assert llm.engine.runner.model.quantization == method
        got = llm.prompt_logits(prompts)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        ours = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                              use_tqdm=False)]
    finally:
        llm.shutdown()
    agree = total = 0
    with torch.no_grad():
        for prompt, logits, tokens in zip(prompts, got, ours):
            want = hf(torch.tensor([prompt])).logits[0]
            err = (logits - want).abs().max().item()
            assert err <= rtol * want.abs().max().item(), f"max |diff| {err:.3e} vs max |logit| {want.abs().max():.3e}"
            assert (logits.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
            # the reference's greedy tokens along deepserve's own continuation (teacher forcing):
            # one near-tie cannot fail every later position
            seq = torch.tensor([prompt + list(tokens)])
            ref_next = hf(seq).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(tokens, ref_next))
            total += len(tokens)
    assert agree / total >= 0.95, f"greedy tokens agree at {agree}/{total} positions"


def _cases() -> list[str]:
    return sorted(p.parent.name for p in DATA.glob("*/config.json"))


def test_every_format_has_a_library_written_fixture():
    """One real checkpoint per format and scheme family, and each small enough to commit."""
    cases = _cases()
    assert {c.split("-")[1] for c in cases} >= set(METHODS), cases
    assert any(c.startswith("deepseek_v3-") for c in cases)
    for case in cases:
        size = sum(f.stat().st_size for f in (DATA / case).rglob("*") if f.is_file())
        assert size < 200_000, f"{case}: {size} bytes"
        qc = json.loads((DATA / case / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == {"awq": "awq", "gptq": "gptq"}.get(case.split("-")[1], "compressed-tensors"), case


@pytest.mark.parametrize("case", _cases())
def test_library_written_checkpoint_matches_the_library_decompression(case, tmp_path):
    ckpt = DATA / case
    reference = load_file(str(ckpt / "reference" / "weights.safetensors"))
    # weight-only schemes compute exactly what the reference does; with quantized activations a
    # value on a rounding boundary may round the other way after another summation order
    method = METHODS[case.split("-")[1]]
    check_against_reference(ckpt, reference, tmp_path, method, rtol=1e-4 if method in EXACT else 3e-2)


def test_library_written_configs_load_without_a_warning(caplog):
    """compressed-tensors 0.20 writes `moe_sparsity_config` (null unless experts were pruned) in
    every quantization_config: known, so it loads without an unknown-field warning; a set one
    (per-layer expert counts config.json does not give) is refused naming it."""
    from deepserve.models.loader import checkpoint_quantization
    for case in _cases():
        cfg = json.loads((DATA / case / "config.json").read_text())
        assert "moe_sparsity_config" in cfg["quantization_config"] or case.split("-")[1] in ("awq", "gptq")
        with caplog.at_level(logging.WARNING, logger="deepserve"):
            caplog.clear()
            assert checkpoint_quantization(cfg) == METHODS[case.split("-")[1]]
        assert caplog.text == "", case
    cfg = json.loads((DATA / "llama-w4a8-g32" / "config.json").read_text())
    cfg["quantization_config"]["moe_sparsity_config"] = {"method": "prune", "num_experts": [None, 3]}
    with pytest.raises(ValueError, match=r"^quantization_config \(compressed-tensors\): moe_sparsity_config .* not supported"):
        checkpoint_quantization(cfg)


def test_int_quantized_4bit_tensors_are_packed_as_pack_quantized_stores_them():
    """compressed-tensors' int-quantized 4-bit layout (one signed value a byte) streams as the
    pack-quantized one: value + 8 packed along K (weights) or N (zero points), padded with 8;
    a value outside -8..7 is refused naming its tensor."""
    from deepserve.ops.int4 import unpack_int4
    from deepserve.quant.int4 import int8_to_packed
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (5, 12), generator=gen, dtype=torch.int8)     # K = 12: padded to 16
    z = torch.randint(-8, 8, (5, 3), generator=gen, dtype=torch.int8)      # N = 5: padded to 8 rows
    out = dict(int8_to_packed([("m.weight", w), ("m.weight_scale", torch.ones(5, 3)), ("m.weight_zero_point", z),
                               ("norm.weight", torch.ones(4))]))
    assert list(out) == ["m.weight_packed", "m.weight_shape", "m.weight_scale", "m.weight_zero_point", "norm.weight"]
    assert out["m.weight_shape"].tolist() == [5, 12]
    u = unpack_int4(out["m.weight_packed"], 1)
    assert torch.equal(u[:, :12].to(torch.int16) - 8, w.to(torch.int16)) and bool((u[:, 12:] == 8).all())
    zu = unpack_int4(out["m.weight_zero_point"], 0)
    assert torch.equal(zu[:5].to(torch.int16) - 8, z.to(torch.int16)) and bool((zu[5:] == 8).all())
    with pytest.raises(ValueError, match=r"^tensor m.weight: int-quantized 4-bit values must lie in \[-8, 7\], got \[-9, 7\]$"):
        list(int8_to_packed([("m.weight", torch.tensor([[-9, 7] * 4], dtype=torch.int8))]))


def test_mixed_precision_configs_are_refused_naming_each_group():
    """compressed-tensors writes one config group per scheme (format "mixed-precision" when the
    compressors differ); deepserve serves one scheme a checkpoint, and the refusal says what each
    group holds (it said "one FP8 scheme" of a 4-bit + FP8 mix, naming neither)."""
    from deepserve.models.loader import checkpoint_quantization
    base = json.loads((DATA / "llama-w4a16-asym-g32" / "config.json").read_text())
    w4 = base["quantization_config"]["config_groups"]["group_0"]
    fp8 = json.loads((DATA / "qwen2-fp8-channel" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    mixes = {"mixed-precision": ({**w4, "targets": ["re:.*mlp.*"]}, {**fp8, "targets": ["re:.*self_attn.*"]},
                                 r"one FP8 scheme per checkpoint, not a mix \(group_0: weights 4-bit int group 32, "
                                 r"activations none; group_1: weights 8-bit float channel, activations 8-bit float token\)$"),
             "pack-quantized": ({**w4, "targets": ["re:.*mlp.*"]},
                                {**w4, "targets": ["re:.*self_attn.*"], "weights": {**w4["weights"], "group_size": 128}},
                                r"one 4-bit scheme per checkpoint, not a mix \(group_0: weights 4-bit int group 32, "
                                r"activations none; group_1: weights 4-bit int group 128, activations none\)$")}
    for fmt, (a, b, error) in mixes.items():
        qc = {**base["quantization_config"], "format": fmt, "config_groups": {"group_0": a, "group_1": b}}
        with pytest.raises(ValueError, match=r"^compressed-tensors config_groups \['group_0', 'group_1'\]: deepserve serves " + error):
            checkpoint_quantization({**base, "quantization_config": qc})


@pytest.mark.parametrize("folder, stored", [("llama-w8a8-channel", "w8a8-int8"), ("qwen2-fp8-channel", "fp8")])
def test_mixed_precision_8bit_groups_read_their_own_format(tmp_path, folder, stored):
    """Top-level format "mixed-precision" names no layout: each group's own format does (vLLM reads
    the group's). An 8-bit checkpoint whose one scheme sits in two groups (attention, MLP) under
    "mixed-precision" was refused (W8A8: "format 'mixed-precision' with 8-bit weights", FP8:
    "format 'mixed-precision' with FP8 weights"); it loads with the logits of the single-group
    config. A group format that does not fit the weights is still refused naming it."""
    import shutil
    from deepserve.models.loader import checkpoint_quantization
    src = DATA / folder
    dst = tmp_path / folder
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    group = qc["config_groups"]["group_0"]
    qc.update(format="mixed-precision", config_groups={"attn": {**group, "targets": ["re:.*self_attn.*"]},
                                                       "mlp": {**group, "targets": ["re:.*mlp.*"]}})
    (dst / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_quantization(cfg) == stored
    prompts = [[5, 17, 42, 8, 9, 3, 61], [50, 1, 37, 13]]
    got = torch.cat(LLM(model=str(dst), dtype="float32", tokenizer=TOKENIZER).prompt_logits(prompts))
    want = torch.cat(LLM(model=str(src), dtype="float32", tokenizer=TOKENIZER).prompt_logits(prompts))
    assert torch.equal(got, want)
    for g in qc["config_groups"].values():
        g["format"] = "pack-quantized"
    with pytest.raises(ValueError, match=r"format 'pack-quantized' with (8-bit|FP8) weights"):
        checkpoint_quantization(cfg)


@pytest.mark.parametrize("folder, stored", [("llama-w8a8-channel", "w8a8-int8"), ("qwen2-fp8-channel", "fp8"),
                                            ("llama-w4a16-asym-g32", "w4a16")])
def test_quantization_compressed_tensors_serves_every_compressed_tensors_scheme(folder, stored):
    """`--quantization compressed-tensors` names the checkpoint's quant_method, as in vLLM: it
    serves a compressed-tensors FP8 or W8A8 int8 folder as stored (it was refused as "loads
    compressed-tensors 4-bit checkpoints"), and is still refused on another format's folder."""
    from deepserve.models.loader import linear_method
    cfg = json.loads((DATA / folder / "config.json").read_text())
    assert linear_method(str(DATA / folder), cfg, "compressed-tensors") == (stored, stored)
    deepseek = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128]}}
    with pytest.raises(ValueError, match=r"^--quantization compressed-tensors loads compressed-tensors checkpoints and "
                                         r"this one is fp8 \(leave --quantization out"):
        linear_method(str(DATA / folder), deepseek, "compressed-tensors")


@pytest.mark.parametrize("flag", ["awq_marlin", "gptq_marlin", "moe_wna16"])
def test_vllm_kernel_names_of_awq_and_gptq_serve_the_checkpoint(flag):
    """vLLM's `--quantization awq_marlin` / `gptq_marlin` / `moe_wna16` (DeepSeek-R1-AWQ's model
    card) name an AutoAWQ or GPTQ checkpoint served with other kernels: each serves its folder as
    stored (they were refused as not among fp8, w8a8-int8, awq, gptq, ...); another format's
    folder is refused naming both."""
    from deepserve.config import EngineArgs
    from deepserve.models.loader import linear_method
    folders = {"awq": DATA / "llama-awq-g32", "gptq": DATA / "qwen2-gptq-g32-actorder"}
    for fmt, folder in folders.items():
        if flag.startswith(fmt) or flag == "moe_wna16":
            model = EngineArgs(model=str(folder), quantization=flag, tokenizer=TOKENIZER).create_engine_config().model
            assert linear_method(str(folder), model.hf_config, model.quantization) == (fmt, fmt)
            assert linear_method(str(folder), model.hf_config, flag) == (fmt, fmt)     # the automatic plan's path
    other = DATA / "llama-w4a16-asym-g32"
    model = EngineArgs(model=str(other), quantization=flag, tokenizer=TOKENIZER).create_engine_config().model
    with pytest.raises(ValueError, match=r"^--quantization \S+ (cannot serve|serves) .*compressed-tensors W4A16"):
        linear_method(str(other), model.hf_config, model.quantization)


# quantization_config as GPTQModel 7.7's QuantizeConfig.to_dict writes it (None-valued fields dropped)
GPTQMODEL_META = {"quantizer": ["gptqmodel:7.7.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                  "damp_percent": 0.05, "damp_auto_increment": 0.01, "static_groups": False, "true_sequential": True,
                  "mse": 0.0, "act_group_aware": True, "fallback": None, "offload_to_disk": True,
                  "pack_impl": "cpu", "gc_mode": "interval"}
GPTQMODEL = {
    "gptq": {"bits": 4, "group_size": 32, "desc_act": False, "lm_head": False, "method": "gptq", "quant_method": "gptq",
             "format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32", "meta": GPTQMODEL_META,
             "sym": True},
    "awq": {"bits": 4, "group_size": 32, "desc_act": False, "lm_head": False, "method": "awq", "quant_method": "awq",
            "format": "gemm", "checkpoint_format": "gemm", "pack_dtype": "int32", "meta": GPTQMODEL_META,
            "zero_point": True, "version": "gemm"},
}


def test_gptqmodel_configs_load_and_fields_that_change_the_run_are_refused(caplog):
    """GPTQModel 7.7 writes `method` (quant_method again) and, for activation quantization of
    selected modules, `activation`; its AWQ checkpoints carry its GPTQ fields (`dynamic`,
    `lm_head`, `format`, ...). They load without an unknown-field warning; an `activation`, a
    `method` other than quant_method, a quantized lm_head are refused naming the field; AWQ's
    `dynamic` "-:" entries leave modules 16-bit as GPTQ's do (were not read: quantized as the rest)."""
    from deepserve.models.loader import checkpoint_quantization
    from deepserve.quant.ignore import checkpoint_ignore
    for method, qc in GPTQMODEL.items():
        cfg = {"quantization_config": qc, "torch_dtype": "float16"}
        with caplog.at_level(logging.WARNING, logger="deepserve"):
            caplog.clear()
            assert checkpoint_quantization(cfg) == method
        assert caplog.text == "", method
        for field, value in (("activation", {"modules": ["re:.*mlp.*"], "bits": 8}), ("method", "qqq"),
                             ("lm_head", True)):
            with pytest.raises(ValueError, match=rf"^quantization_config \({method}\): {field} .* is not supported"):
                checkpoint_quantization({**cfg, "quantization_config": {**qc, field: value}})
        skipped = checkpoint_ignore({"quantization_config": {**qc, "dynamic": {"-:.*down_proj": {}}}})
        assert skipped("model.layers.0.mlp.down_proj") and not skipped("model.layers.0.mlp.up_proj")
        with pytest.raises(ValueError, match=r"dynamic '\+:.*down_proj'.*quantizes those modules with other settings"):
            checkpoint_ignore({"quantization_config": {**qc, "dynamic": {"+:.*down_proj": {"bits": 8}}}})
