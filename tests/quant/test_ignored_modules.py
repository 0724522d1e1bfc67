"""Modules a quantized checkpoint leaves unquantized stay in its 16-bit dtype at load, in every
format's own field and syntax (quant/ignore.py): DeepSeek / vLLM fp8 `ignored_layers`,
compressed-tensors `ignore` (names and `re:` regexes; W8A8 int8 and FP8), GPTQModel `dynamic`
`-:` entries, and the `--quantization fp8` path over a bf16 checkpoint whose config names them.
Each ignored layer holds the checkpoint's bf16 weight and gives what a plain bf16 Linear gives;
every other layer is quantized (its bytes checked). Fused layers whose parts disagree, and MoE
layers whose experts disagree, are refused naming them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from deepserve.config import EngineArgs
from deepserve.models.loader import load_model
from deepserve.quant.fp8 import quant_fp8_block
from deepserve.quant.ignore import Ignore, checkpoint_ignore
from deepserve.quant.int8 import quant_int8_per_channel
from tests.models.hf_reference import save_tiny, save_tiny_mla_moe
from tests.quant.int4_formats import awq_tensors, gptq_tensors, quantization_config, quantize
from tests.quant.test_int4_loading import write_variant

FP8 = torch.float8_e4m3fn
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# checkpoint modules each test leaves unquantized, and the model layers they load into
IGNORED = {"model.layers.0.mlp.down_proj": ["model.layers.0.mlp.down_proj"],
           "model.layers.1.self_attn.qkv_proj": [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]}
QUANTIZED = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj",
             "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> dict:
    """A tiny Llama's tensors in bf16, and its folder."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("ign") / "ref"
    save_tiny(transformers.LlamaForCausalLM, cfg, folder)
    tensors = {n: t.to(torch.bfloat16) for n, t in load_file(str(folder / "model.safetensors")).items()}
    return {"folder": folder, "tensors": tensors}


def _ignored(module: str) -> bool:
    return any(module in parts for parts in IGNORED.values())


def _write(ref, root: Path, quantize_one, qc: dict) -> Path:
    """The checkpoint with every projection but the IGNORED ones written by `quantize_one(name,
    w) -> {name: tensor}`; the ignored ones stay bf16."""
    out = {}
    for name, w in ref["tensors"].items():
        module = name[: -len(".weight")]
        if name.endswith("proj.weight") and not _ignored(module):
            out.update(quantize_one(name, w))
        else:
            out[name] = w
    return write_variant(ref["folder"], root, out, qc, torch_dtype="bfloat16")


def _load(folder: Path, **kw):
    mc = EngineArgs(model=str(folder), dtype="bfloat16", **kw).create_engine_config().model
    return load_model(mc, torch.device("cpu"))


def _check_ignored(model, ref):
    """IGNORED layers: bf16, the checkpoint's weight, the plain Linear's output."""
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for name, parts in IGNORED.items():
        layer = model.get_submodule(name)
        assert {n: p.dtype for n, p in layer.named_parameters()} == {"weight": torch.bfloat16}, name
        w = torch.cat([ref["tensors"][p + ".weight"] for p in parts])
        assert torch.equal(layer.weight, w), name
        assert torch.equal(layer(x[:, : w.shape[1]]), F.linear(x[:, : w.shape[1]], w)), name


def _check(model, ref, weight_dtype, scale_cols):
    """`_check_ignored`; QUANTIZED layers: `weight_dtype` weight + fp32 scale of `scale_cols(K)`
    columns, nothing else."""
    _check_ignored(model, ref)
    for name in QUANTIZED:
        layer = model.get_submodule(name)
        n, k = layer.weight.shape
        assert layer.weight.dtype == weight_dtype, name
        held = sum(p.numel() * p.element_size() for p in layer.parameters())
        assert held == n * k + 4 * n * scale_cols(k), name


def _fp8(name, w):
    q, s = quant_fp8_block(w.float(), (128, 128))
    return {name: q, name + "_scale_inv": s}


FP8_QC = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
          "ignored_layers": sorted(m for parts in IGNORED.values() for m in parts)}


def test_deepseek_fp8_ignored_layers_stay_bf16(ref, tmp_path):
    model = _load(_write(ref, tmp_path / "fp8", _fp8, FP8_QC))
    _check(model, ref, FP8, lambda k: math.ceil(k / 128))


def test_fp8_at_load_over_a_bf16_checkpoint_keeps_its_ignored_layers(ref, tmp_path):
    """`--quantization fp8` over bf16 weights whose config.json names ignored_layers: the others
    are quantized at load, the named ones are not."""
    folder = _write(ref, tmp_path / "bf16", lambda name, w: {name: w}, FP8_QC)
    _check(_load(folder, quantization="fp8"), ref, FP8, lambda k: math.ceil(k / 128))


def _int8(name, w):
    q, s = quant_int8_per_channel(w.float())
    return {name: q, name + "_scale": s}


def _ct(bits_type: str, ignore: list[str], targets=("Linear",)) -> dict:
    w = {"num_bits": 8, "type": bits_type, "symmetric": True, "strategy": "channel", "dynamic": False}
    a = {"num_bits": 8, "type": bits_type, "symmetric": True, "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": "int-quantized" if bits_type == "int" else "float-quantized",
            "config_groups": {"group_0": {"targets": list(targets), "weights": w, "input_activations": a}},
            "ignore": ["lm_head", *ignore]}


CT_IGNORE = ["model.layers.0.mlp.down_proj", "re:.*layers\\.1\\.self_attn\\.[qkv]_proj$"]


def test_compressed_tensors_w8a8_ignore_names_and_regexes_stay_bf16(ref, tmp_path):
    model = _load(_write(ref, tmp_path / "int8", _int8, _ct("int", CT_IGNORE)))
    _check(model, ref, torch.int8, lambda k: 1)


TARGETS = ["re:.*layers\\.0\\.self_attn\\.", "re:.*layers\\.0\\.mlp\\.(gate|up)_proj$",
           "re:.*layers\\.1\\.self_attn\\.o_proj$", "re:.*layers\\.1\\.mlp\\."]


def test_compressed_tensors_targets_leave_the_modules_they_miss_bf16(ref, tmp_path):
    """A compressed-tensors scheme quantizes only the modules its `targets` name (here regexes
    that miss IGNORED); the others were quantized at load."""
    model = _load(_write(ref, tmp_path / "int8", _int8, _ct("int", [], TARGETS)))
    _check(model, ref, torch.int8, lambda k: 1)


def test_compressed_tensors_fp8_ignore_stays_bf16(ref, tmp_path):
    def channel(name, w):
        s = w.float().abs().amax(1, keepdim=True) / 448
        return {name: (w.float() / s).to(FP8), name + "_scale": s}
    model = _load(_write(ref, tmp_path / "ctfp8", channel, _ct("float", CT_IGNORE)))
    _check(model, ref, FP8, lambda k: math.ceil(k / 128))


def test_gptq_dynamic_negative_entries_stay_bf16_and_overrides_are_refused(ref, tmp_path):
    """GPTQModel's `dynamic`: a `-:regex` key leaves the modules it matches unquantized; a key
    with overrides (other bits or group size for some modules) is refused naming it."""
    def gptq(name, w):
        u, z, s, g_idx = quantize(w.float(), 64, True)
        return {f"{name[:-len('.weight')]}.{k}": v for k, v in gptq_tensors(u, z, s.half(), g_idx).items()}
    qc = {**quantization_config("gptq", 64, True, False),
          "dynamic": {"-:model\\.layers\\.0\\.mlp\\.down_proj": {}, "-:.*layers\\.1\\.self_attn\\.[qkv]_proj": {}}}
    model = _load(_write(ref, tmp_path / "gptq", gptq, qc))
    for name, parts in IGNORED.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight, torch.cat([ref["tensors"][p + ".weight"] for p in parts])), name
    assert all(model.get_submodule(n).qweight.dtype == torch.int32 for n in QUANTIZED)
    with pytest.raises(ValueError, match=r"^quantization_config \(gptq\): dynamic '\+:.*down_proj': \{'bits': 8\}"):
        checkpoint_ignore({"quantization_config": {**qc, "dynamic": {"+:.*down_proj": {"bits": 8}}}})
    same = {"+:.*down_proj": {"bits": 4, "group_size": 64}, ".*up_proj": {}}     # the config's own values
    assert not checkpoint_ignore({"quantization_config": {**qc, "dynamic": same}})


def test_gptq_modules_in_block_to_quantize_leaves_the_others_bf16(ref, tmp_path):
    """transformers' GPTQConfig `modules_in_block_to_quantize`: only the listed projections of
    each block are quantized (here attention and gate/up; down_proj stays bf16, as planned)."""
    from deepserve.distributed.plan_bytes import Layout, weight_bytes_per_gpu
    from deepserve.engine.model_runner import held_weight_bytes
    blocks = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"]]
    qc = {**quantization_config("gptq", 64, True, False), "modules_in_block_to_quantize": blocks}
    out = {}
    for name, w in ref["tensors"].items():
        if name.endswith("proj.weight") and "down_proj" not in name:
            u, z, s, g_idx = quantize(w.float(), 64, True)
            out.update({f"{name[:-len('.weight')]}.{k}": v for k, v in gptq_tensors(u, z, s.half(), g_idx).items()})
        else:
            out[name] = w
    folder = write_variant(ref["folder"], tmp_path / "gptq", out, qc, torch_dtype="bfloat16")
    model = _load(folder)
    for i in (0, 1):
        down = model.get_submodule(f"model.layers.{i}.mlp.down_proj")
        assert torch.equal(down.weight, ref["tensors"][f"model.layers.{i}.mlp.down_proj.weight"])
        assert model.get_submodule(f"model.layers.{i}.mlp.gate_up_proj").qweight.dtype == torch.int32
    cfg = EngineArgs(model=str(folder), dtype="bfloat16").create_engine_config().model.hf_config
    assert weight_bytes_per_gpu(cfg, Layout(1, 1, 1), "bfloat16", "gptq", ignored=checkpoint_ignore(cfg)) == \
        held_weight_bytes(model)


def test_awq_modules_to_not_convert_stay_bf16(ref, tmp_path):
    """AutoAWQ `modules_to_not_convert` (substrings of module names): those stay bf16; the others
    hold the packed weight, bf16 scales and uint8 zero points of their groups of 64."""
    def awq(name, w):
        u, z, s, _ = quantize(w.float(), 64, False)
        return {f"{name[:-len('.weight')]}.{k}": v for k, v in awq_tensors(u, z, s.to(torch.bfloat16)).items()}
    qc = {**quantization_config("awq", 64, False, False),
          "modules_to_not_convert": ["layers.0.mlp.down_proj", "layers.1.self_attn.q_", "layers.1.self_attn.k_",
                                     "layers.1.self_attn.v_"]}
    model = _load(_write(ref, tmp_path / "awq", awq, qc))
    _check_ignored(model, ref)
    for name in QUANTIZED:
        layer = model.get_submodule(name)
        n, k = layer.qweight.shape[0], layer.qweight.shape[1] * 8
        held = sum(p.numel() * p.element_size() for p in layer.parameters())
        assert layer.qweight.dtype == torch.int32 and held == n * k // 2 + n * (k // 64) * (2 + 1), name


def test_matching_rules():
    """vLLM's: a name covers the module and its children (not a longer sibling), `re:` matches
    from the start, AWQ / GPTQ / Hugging Face fp8 modules_to_not_convert are substrings."""
    fp8 = checkpoint_ignore({"quantization_config": {"quant_method": "fp8", "ignored_layers": ["model.layers.1"],
                                                     "modules_to_not_convert": ["down_proj"]}})
    assert fp8("model.layers.1.mlp.up_proj") and fp8("model.layers.1") and fp8("model.layers.3.mlp.down_proj")
    assert not fp8("model.layers.10.mlp.up_proj")
    ct = checkpoint_ignore({"quantization_config": {"quant_method": "compressed-tensors", "ignore": ["re:.*o_proj"]}})
    assert ct("model.layers.0.self_attn.o_proj") and not ct("model.layers.0.self_attn.q_proj")
    awq = checkpoint_ignore({"quantization_config": {"quant_method": "awq", "modules_to_not_convert": ["visual"]}})
    assert awq("model.visual.proj") and not awq("model.layers.0.mlp.up_proj")
    assert not checkpoint_ignore({}) and checkpoint_ignore({}) == Ignore()
    with pytest.raises(ValueError, match=r"^quantization_config \(fp8\): ignored_layers must be a list of module"):
        checkpoint_ignore({"quantization_config": {"quant_method": "fp8", "ignored_layers": [3]}})
    # a bad regex is one line naming it (it was a re.error traceback at load)
    with pytest.raises(ValueError, match=r"^quantization_config \(compressed-tensors\): 're:\(' is not a valid "
                                         r"regular expression \(missing \), unterminated subpattern"):
        checkpoint_ignore({"quantization_config": {"quant_method": "compressed-tensors", "ignore": ["re:("]}})



def test_matching_a_models_names_compiles_no_pattern_per_name(monkeypatch):
    """A model's build asks about every expert matrix of every layer (R1: 45,000 names): the
    entries are made ready once, no regex is looked up or compiled per name; the answers are
    the rules' (a name and its children, not a longer sibling; `re:` from the start; targets)."""
    import re
    ignore = Ignore(("model.layers.1", "re:.*experts\\.(3|4)\\.", "re:.*o_proj"), ("visual",))
    targets = Ignore(targets=("re:.*mlp\\.experts\\..*", "model.layers.0.self_attn"))
    looked_up = []
    for name in ("match", "compile", "search", "fullmatch"):
        real = getattr(re, name)
        monkeypatch.setattr(re, name, lambda *a, real=real, **k: looked_up.append(a) or real(*a, **k))
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(12) for e in range(8) for p in ("w1", "w2", "w3")]
    assert [n for n in names if ignore(n)] == [n for n in names if n.startswith("model.layers.1.")
                                               or ".experts.3." in n or ".experts.4." in n]
    assert ignore("model.layers.1") and ignore("model.visual.proj") and ignore("model.layers.2.self_attn.o_proj")
    assert ignore("model.layers.2.self_attn.o_proj_x") and not ignore("model.layers.10.self_attn.q_proj")  # re.match
    assert not any(targets(n) for n in names)
    assert not targets("model.layers.0.self_attn.q_proj") and targets("model.layers.1.self_attn.q_proj")
    assert not looked_up, looked_up[:3]

def test_fused_parts_that_disagree_are_refused_naming_them(ref, tmp_path):
    qc = {**FP8_QC, "ignored_layers": ["model.layers.1.self_attn.q_proj"]}
    folder = _write(ref, tmp_path / "fp8", _fp8, qc)
    with pytest.raises(ValueError) as exc:
        _load(folder)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, "
                                              "model.layers.1.self_attn.v_proj are fused into "
                                              "model.layers.1.self_attn.qkv_proj: model.layers.1.self_attn.q_proj "
                                              "is left unquantized"), msg


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return save_tiny_mla_moe(tmp_path_factory.mktemp("ignmoe") / "ref", moe_intermediate_size=128,
                             hidden_size=128, torch_dtype="bfloat16")


def _moe_fp8(moe: Path, root: Path, ignored: list[str]) -> Path:
    ignore = Ignore(tuple(ignored))
    out = {}
    for name, w in load_file(str(moe / "model.safetensors")).items():
        module = name[: -len(".weight")]
        linear = (name.endswith("proj.weight") and "kv_b_proj" not in name) or ".experts." in name
        if linear and not ignore(module):
            out.update(_fp8(name, w.to(torch.bfloat16)))
        else:
            out[name] = w.to(torch.bfloat16)
    qc = {**FP8_QC, "ignored_layers": ignored}
    return write_variant(moe, root, out, qc, torch_dtype="bfloat16")


def test_fp8_experts_of_an_ignored_moe_layer_stay_bf16_and_a_split_layer_is_refused(moe, tmp_path):
    model = _load(_moe_fp8(moe, tmp_path / "all", ["model.layers.1.mlp.experts"]))
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == torch.bfloat16
    want = load_file(str(moe / "model.safetensors"))["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert torch.equal(experts.w2_weight[2], want.to(torch.bfloat16))
    assert model.get_submodule("model.layers.1.mlp.shared_experts.down_proj").weight.dtype == FP8
    with pytest.raises(ValueError, match=r"^routed experts of model\.layers\.1\.mlp\.experts: "
                                         r"model\.layers\.1\.mlp\.experts\.1\.gate_proj is left unquantized"):
        _load(_moe_fp8(moe, tmp_path / "one", ["model.layers.1.mlp.experts.1.gate_proj"]))


@pytest.mark.parametrize("fmt", ["fp8", "w8a8-int8", "targets"])
def test_the_start_up_log_plans_the_bytes_allocated(ref, tmp_path, fmt):
    """The engine's start-up line `weights on this rank: X allocated, Y planned`: X == Y, the
    ignored modules allocated and planned in bf16."""
    from deepserve.distributed.parallel_state import single_process
    from deepserve.engine.model_runner import _bytes, held_weight_bytes, planned_weight_text
    folder = (_write(ref, tmp_path / "fp8", _fp8, FP8_QC) if fmt == "fp8"
              else _write(ref, tmp_path / "int8", _int8, _ct("int", CT_IGNORE) if fmt == "w8a8-int8"
                          else _ct("int", [], TARGETS)))
    config = EngineArgs(model=str(folder), dtype="bfloat16").create_engine_config()
    model = load_model(config.model, torch.device("cpu"))
    assert model.get_submodule("model.layers.0.mlp.down_proj").weight.dtype == torch.bfloat16
    planned = planned_weight_text(config, single_process(), model.quantization, torch.bfloat16)
    assert planned == f"{_bytes(held_weight_bytes(model))} planned"


@pytest.mark.parametrize("method", ["fp8-block", "w8a8-int8"])
def test_convert_quantize_ignore_keeps_modules_for_the_8_bit_methods_too(ref, tmp_path, method):
    """`convert quantize --method fp8-block|w8a8-int8 --ignore ...` (it was refused: 4-bit only)
    writes the named modules in 16-bit and lists them (fp8 `ignored_layers`, compressed-tensors
    `ignore`), and the engine loads them so."""
    from deepserve.cli.main import main
    src = _write(ref, tmp_path / "bf16", lambda name, w: {name: w}, None)
    out = tmp_path / "q"
    assert main(["convert", "quantize", str(src), str(out), "--method", method, "--no-progress", "--ignore",
                 "model.layers.0.mlp.down_proj", "re:.*layers\\.1\\.self_attn\\.[qkv]_proj$"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    listed = sorted(m for parts in IGNORED.values() for m in parts)
    assert (qc["ignored_layers"] if method == "fp8-block" else qc["ignore"]) == (
        listed if method == "fp8-block" else ["lm_head", *listed])
    stored = load_file(str(out / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    _check(_load(out), ref, FP8 if method == "fp8-block" else torch.int8,
           (lambda k: math.ceil(k / 128)) if method == "fp8-block" else (lambda k: 1))


def test_convert_ignore_refuses_splitting_fused_layers_or_one_layers_experts(moe, tmp_path, capsys):
    from deepserve.cli.main import main
    for method, extra in (("fp8-block", []), ("w4a16", ["--algorithm", "rtn", "--group-size", "16"])):
        for ignore, want in (("model.layers.1.mlp.experts.1.gate_proj", "the routed experts of "
                              "model.layers.1.mlp.experts are one stacked tensor at load"),
                             ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj "
                              "run as one fused layer")):
            dst = tmp_path / f"{method}-{ignore}"
            assert main(["convert", "quantize", str(moe), str(dst), "--method", method, *extra, "--no-progress",
                         "--ignore", ignore]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and want in err, err
