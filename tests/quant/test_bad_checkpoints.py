"""Malformed quantized checkpoints as users meet them: a NaN / inf int8 scale, a
quantization_config whose fields have the wrong JSON type, a broken safetensors index. Each is
refused with one ValueError naming the tensor, field or file (the CLI prints it as one line),
never loaded into NaN outputs and never a traceback of another exception type."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve.models.loader import checkpoint_quantization, linear_method
from deepserve.models.weights import checkpoint_files
from deepserve.quant import quantize_checkpoint
from tests.models.hf_reference import load_ours, save_tiny
from tests.quant.int4_formats import quantization_config
from tests.quant.test_modelslim import to_modelslim

CFG = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def int8_folders(tmp_path_factory):
    """(compressed-tensors W8A8 int8 folder, the same weights as msModelSlim W8A8_DYNAMIC)."""
    root = tmp_path_factory.mktemp("int8")
    save_tiny(transformers.LlamaForCausalLM, CFG, root / "ref")
    quantize_checkpoint(root / "ref", root / "ct", "w8a8-int8", progress=False)
    return root / "ct", to_modelslim(root / "ct", root / "slim")


def _poisoned(src, dst, tensor, value):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[1] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("fmt,tensor,value,why", [
    ("ct", "model.layers.0.mlp.down_proj.weight_scale", float("nan"), "weight_scale has non-finite values"),
    ("ct", "model.layers.1.self_attn.k_proj.weight_scale", float("inf"), "weight_scale has non-finite values"),
    ("slim", "model.layers.0.mlp.up_proj.weight_scale", float("nan"), "weight_scale has non-finite values"),
    ("slim", "model.layers.1.self_attn.o_proj.weight_offset", float("inf"), "weight_offset has non-finite values"),
])
def test_non_finite_int8_scales_are_refused_naming_the_tensor(int8_folders, tmp_path, fmt, tensor, value, why):
    """An int8 Linear multiplies by its stored per-row scale: a NaN or inf one made the whole
    model's logits NaN and the generated text empty, without a word (4-bit and fp8 scales were
    already checked)."""
    folder = _poisoned(int8_folders[fmt == "slim"], tmp_path / "bad", tensor, value)
    with pytest.raises(ValueError, match=rf"^tensor {tensor}: {why} \({value} at \[1, 0\]\)$"):
        load_ours(folder)


@pytest.mark.parametrize("fmt", ["fp8-block", "w8a8-int8", "msmodelslim"])
def test_a_16bit_weight_beside_a_scale_is_refused(int8_folders, tmp_path, fmt):
    """A half-converted checkpoint (a weight cast back to 16 bits, its scale left behind): the
    layer quantized the 16-bit weight at load, then the stale scale replaced the one it had
    made, and the layer ran with wrong weights. Refused naming both tensors."""
    from deepserve.quant.fp8 import dequant_fp8_block
    weight = "model.layers.1.mlp.down_proj.weight"
    if fmt == "fp8-block":
        src = tmp_path / "fp8"
        quantize_checkpoint(int8_folders[0].parent / "ref", src, "fp8-block", progress=False)
        suffix = "_scale_inv"
    else:
        src, suffix = int8_folders[fmt == "msmodelslim"], "_scale"
    folder = tmp_path / "bad"
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    scale = tensors[weight + suffix]
    tensors[weight] = (dequant_fp8_block(tensors[weight], scale) if fmt == "fp8-block"
                       else (tensors[weight].float() * scale.reshape(-1, 1)).bfloat16())
    tensors[weight + suffix] = scale * 2
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    error = (rf"^tensor {weight} is torch.bfloat16, but quant_model_description says W8A8_DYNAMIC" if fmt == "msmodelslim"
             else rf"^tensor {weight}{suffix}: a {fmt.split('-')[0]}\S* scale beside {weight}, which is torch.bfloat16")
    with pytest.raises(ValueError, match=error):
        load_ours(folder)


def test_modelslim_static_input_scale_must_be_positive_and_finite():
    from deepserve.quant.modelslim import modelslim_stream
    for value, why in ((0.0, "input_scale must be > 0, got 0.0"), (float("nan"), "input_scale has non-finite")):
        stream = modelslim_stream([("m.input_scale", torch.tensor([value]))], {"m.weight": "W8A8"},
                                  lambda module: True, torch.float32)
        with pytest.raises(ValueError, match=rf"^tensor m.input_scale: {why}"):
            list(stream)


def test_modelslim_module_dequantized_at_load_checks_its_parts():
    """A quantized module the model runs in float (kv_b_proj, or one whose layer is not int8) is
    dequantized at load, (int8 - offset) * scale a row: an offset with the wrong row count (it was
    a bare broadcasting RuntimeError), an integer scale (it zeroed the layer) and a float weight
    are refused naming the tensor; good parts give the format's formula."""
    from deepserve.quant.modelslim import modelslim_stream
    q = torch.randint(-127, 128, (4, 8), dtype=torch.int8)
    scale, offset = torch.rand(4, 1) + 0.5, torch.zeros(4, 1)
    desc = {"m.weight": "W8A8_DYNAMIC"}

    def stream(**parts):
        tensors = {"m.weight": q, "m.weight_scale": scale, "m.weight_offset": offset}
        tensors.update({f"m.{k}": v for k, v in parts.items()})
        return list(modelslim_stream(tensors.items(), desc, lambda module: False, torch.float32))

    assert torch.equal(stream()[0][1], q.float() * scale)
    for parts, why in ((dict(weight_offset=torch.zeros(3, 1)), r"m.weight_offset: torch.float32 \(3, 1\) does not match "
                        r"the 4 output rows of m.weight"),
                       (dict(weight_scale=torch.ones(4, 1, dtype=torch.int32)), r"m.weight_scale: torch.int32 \(4, 1\)"),
                       (dict(weight=q.float()), r"m.weight is torch.float32 \(4, 8\), but quant_model_description")):
        with pytest.raises(ValueError, match=rf"^tensor {why}"):
            stream(**parts)


def _method(qc):
    return linear_method("no-folder", {"quantization_config": qc, "torch_dtype": "float16"}, None)


@pytest.mark.parametrize("qc,error", [
    ("gptq", r"^config.json quantization_config must be an object with a quant_method, got str 'gptq'$"),
    (["awq"], r"^config.json quantization_config must be an object with a quant_method, got list"),
    ({**quantization_config("awq", 32, False, False), "modules_to_not_convert": 5},
     r"^quantization_config \(awq\): modules_to_not_convert must be a list of module names, got 5$"),
    ({**quantization_config("gptq", 32, True, False), "modules_in_block_to_quantize": 3},
     r"^quantization_config \(gptq\): modules_in_block_to_quantize must list module names, got 3$"),
    ({**quantization_config("gptq", 32, True, False), "group_size": "abc"},
     r"^quantization_config \(gptq\): group_size 'abc' must be -1 or a positive multiple of 8$"),
    ({**quantization_config("gptq", 32, True, False), "bits": None},
     r"^quantization_config \(gptq\): bits None is not supported; deepserve serves 4-bit "),
    ({**quantization_config("gptq", 32, True, False), "bits": "4"},
     r"^quantization_config \(gptq\): bits '4' is not supported"),
    ({**quantization_config("compressed-tensors", 32, True, False), "config_groups": ["group_0"]},
     r"^quantization_config \(compressed-tensors\): config_groups must be an object, got \"\['group_0'\]\"$"),
    ({**quantization_config("compressed-tensors", 32, True, False),
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": "w4a16"}}},
     r"^compressed-tensors group group_0: weights must be an object, got 'w4a16'$"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": 128},
     r"^quantization_config \(fp8\): weight_block_size must be two positive integers \[rows, columns\], got 128$"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]},
     r"^quantization_config \(fp8\): weight_block_size must be two positive integers"),
    ({"quant_method": ["gptq"], "bits": 4}, r"^config.json quantization_config.quant_method must be a string, got \['gptq'\]$"),
    ({**quantization_config("compressed-tensors", 32, True, False), "config_groups": {"group_0": None}},
     r"^quantization_config \(compressed-tensors\): config_groups group_0 must be an object, got 'None'$"),
    # GPTQModel also packs into int8 / int16 / int64 words: another qweight layout
    ({**quantization_config("gptq", 32, True, False), "pack_dtype": "int16"},
     r"^quantization_config \(gptq\): pack_dtype 'int16' is not supported$"),
])
def test_malformed_quantization_config_is_one_error_naming_the_field(qc, error):
    """Fields of the wrong JSON type raised AttributeError / TypeError tracebacks (a string
    quantization_config, an int modules_to_not_convert) or errors naming no field ("invalid
    literal for int()", "4-bit weights are not supported" for bits "4"); a GPTQModel pack_dtype
    other than int32 was refused only at the first packed weight's dtype."""
    with pytest.raises(ValueError, match=error):
        _method(qc)


def test_a_group_strategy_without_a_group_size_is_named():
    """compressed-tensors strategy "group" with group_size null loaded as one group per row and
    failed later on the first scale's shape."""
    qc = quantization_config("compressed-tensors", 32, True, False)
    qc["config_groups"]["group_0"]["weights"]["group_size"] = None
    with pytest.raises(ValueError, match=r"^compressed-tensors group group_0: weight strategy 'group' with "
                                         r"group_size None; a group strategy needs a positive group_size$"):
        _method(qc)


@pytest.mark.parametrize("index,why", [('{"metadata": {}}', "KeyError('weight_map')"),
                                        ("{not json", "JSONDecodeError"),
                                        ('{"weight_map": {"a": 3}}', "weight_map must map tensor names")])
def test_a_broken_safetensors_index_names_the_file(tmp_path, index, why):
    """An index without weight_map failed with the bare message "'weight_map'", one that is not
    JSON with the decoder's message and no file name."""
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json.*{re.escape(why)}"):
        checkpoint_files(tmp_path)


def test_a_tensor_in_two_shards_is_refused_naming_both(int8_folders, tmp_path):
    """A folder without an index loads every *.safetensors file: a stale consolidated copy beside
    the shards loaded each tensor twice, the later file silently winning."""
    folder = tmp_path / "m"
    shutil.copytree(int8_folders[0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = tensors["model.layers.0.mlp.down_proj.weight_scale"] * 2
    save_file(tensors, str(folder / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^tensor \S+ appears in both model-00001-of-00001.safetensors and "
                                         r"model.safetensors in .*: remove the stale shard$"):
        load_ours(folder)


_CONFIGS = {
    "awq": quantization_config("awq", 32, False, False), "gptq": quantization_config("gptq", 32, True, True),
    "compressed-tensors": quantization_config("compressed-tensors", 32, True, True, activations=True),
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
            "ignored_layers": ["lm_head"]},
    "ct-fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
               "config_groups": {"g": {"targets": ["Linear"],
                                       "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                       "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}}},
}


def _field_paths(node: dict, prefix=()):
    for key, value in node.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _field_paths(value, prefix + (key,))


@pytest.mark.parametrize("fmt", sorted(_CONFIGS))
def test_every_config_field_of_any_json_type_is_read_or_refused_by_name(fmt):
    """Each field of a quantization_config (nested ones too) set to a value of every JSON type:
    the config is read or refused with a ValueError, never another exception (a traceback)."""
    import copy
    from deepserve.models.loader import fp8_block_size
    from deepserve.quant.ct_fp8 import fp8_scale_scheme
    from deepserve.quant.ignore import checkpoint_ignore
    from deepserve.quant.int4 import int4_spec
    for path in _field_paths(_CONFIGS[fmt]):
        for value in (0, -1, 2.5, "x", [], ["x"], [1], {}, {"x": 1}, None, True):
            qc = copy.deepcopy(_CONFIGS[fmt])
            node = qc
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            cfg = {"quantization_config": qc, "torch_dtype": "float16"}
            try:
                _method(qc)
                fp8_block_size(cfg), int4_spec(cfg), checkpoint_ignore(cfg), fp8_scale_scheme(qc)
            except ValueError:
                pass
            except Exception as exc:   # noqa: BLE001 - the point of the test
                pytest.fail(f"{'.'.join(path)} = {value!r}: {type(exc).__name__}: {exc}")


def test_malformed_4bit_side_tensors_are_named():
    """A compressed-tensors weight_shape that is not two values (a TypeError from int(list)) and a
    g_idx of booleans or floats (bools loaded as groups 0 / 1) are refused naming the tensor."""
    from deepserve.quant.int4 import int4_spec, int4_stream
    spec = int4_spec({"quantization_config": quantization_config("compressed-tensors", 32, True, True),
                      "torch_dtype": "float16"})
    for name, tensor, error in (("m.weight_shape", torch.tensor([[4, 64, 1]]), r"weight_shape holds \[rows, columns\]"),
                                ("m.weight_g_idx", torch.ones(64, dtype=torch.bool), "g_idx must hold integer group indices")):
        for keep in (True, False):
            with pytest.raises(ValueError, match=rf"^tensor {name}: {error}"):
                list(int4_stream([(name, tensor)], spec, lambda module: keep, torch.float32))


def test_bad_parts_of_a_4bit_module_dequantized_at_load_are_named():
    """Modules that no 4-bit layer takes (kv_b_proj, the router, act-order experts) are
    dequantized at load: a 1-D qweight (an IndexError) or a g_idx of the wrong length (a
    broadcasting RuntimeError) there are refused naming the tensor, as in a 4-bit layer. An
    int8 / fp8 scale of an integer dtype (a zero scale once cast) likewise."""
    from deepserve.models.weights import dequantize_stream
    from deepserve.quant.int4 import int4_spec, int4_stream
    from tests.quant.int4_formats import format_tensors, quantize
    spec = int4_spec({"quantization_config": quantization_config("gptq", 16, True, True), "torch_dtype": "float16"})
    u, z, s, g_idx = quantize(torch.randn(32, 64) * 0.05, 16, True, torch.randperm(64))
    good = {f"m.{k}": v for k, v in format_tensors("gptq", u, z, s, g_idx, True, True).items()}
    for name, tensor, error in (("m.qweight", good["m.qweight"].reshape(-1), r"a packed 4-bit weight is 2-D, got shape \(256,\)"),
                                ("m.g_idx", good["m.g_idx"][:32], r"g_idx of shape \(32,\) does not map the 64 input"),
                                ("m.g_idx", good["m.g_idx"] + 4, r"g_idx of values in \[4, 7\] does not map")):
        with pytest.raises(ValueError, match=rf"^tensor {name}: {error}"):
            list(int4_stream({**good, name: tensor}.items(), spec, lambda module: False, torch.float32))
    assert list(int4_stream(good.items(), spec, lambda module: False, torch.float32))[0][0] == "m.weight"
    for fmt, suffix, weight in (("w8a8-int8", "_scale", torch.zeros(4, 8, dtype=torch.int8)),
                                ("fp8", "_scale_inv", torch.zeros(4, 8, dtype=torch.float8_e4m3fn))):
        stream = dequantize_stream([("m.weight", weight), ("m.weight" + suffix, torch.ones(4, 1, dtype=torch.int8))],
                                   fmt, (128, 128), torch.float32)
        with pytest.raises(ValueError, match=rf"^tensor m.weight{suffix}: a {fmt} scale must be floating point"):
            list(stream)


@pytest.mark.parametrize("scheme, ok", [
    ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}, True),
    ({"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False, "symmetric": True}, False),
    ({"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True}, False),
    ({"num_bits": 4, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}, False),
    ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": False}, False)])
def test_kv_cache_scheme_is_fp8_per_tensor(scheme, ok):
    """compressed-tensors' kv_cache_scheme: its k_scale / v_scale are read as per-tensor fp8 scales,
    so another scheme (int8, per channel, 4-bit, asymmetric with k / v zero points) is refused by
    name instead of misread (vLLM refuses them too)."""
    from deepserve.quant.qconfig_fields import check_fields
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {},
          "kv_cache_scheme": scheme}
    if ok:
        check_fields(qc)
    else:
        with pytest.raises(ValueError, match="kv_cache_scheme .* is not supported"):
            check_fields(qc)


def test_int8_weights_without_activation_quantization_are_refused_saying_so():
    """compressed-tensors int-quantized int8 weights with no input_activations (W8A16, weight only)
    are refused saying the activations are unquantized (it read "activations None-bit None None
    (dynamic=None)"); a scheme with activations still names their bits, type, strategy and dynamic."""
    from deepserve.models.loader import checkpoint_quantization
    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    a = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    qc = {"quant_method": "compressed-tensors", "format": "int-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None}}}
    with pytest.raises(ValueError, match=r"^compressed-tensors group group_0: weights 8-bit int channel \(symmetric=True\), "
                                         r"activations none \(weight only\): deepserve serves only int8 symmetric"):
        checkpoint_quantization({"quantization_config": qc})
    qc["config_groups"]["group_0"]["input_activations"] = a
    with pytest.raises(ValueError, match=r"group_0: weights 8-bit int channel \(symmetric=True\), activations 8-bit int "
                                         r"tensor \(dynamic=False\): deepserve serves only"):
        checkpoint_quantization({"quantization_config": qc})


def test_deepseek_ue8m0_scale_fmt_loads_without_a_warning(caplog):
    """DeepSeek-V3.1's fp8 config adds `scale_fmt: "ue8m0"`: its weight_scale_inv are fp32 powers of
    two, read as any fp32 block scale (vLLM only switches DeepGEMM's activation scales to
    powers of two), so it loads without the unknown-field warning; another scale_fmt is refused by name."""
    import logging
    from deepserve.quant.qconfig_fields import check_fields
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
          "weight_block_size": [128, 128]}
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        check_fields(qc)
    assert "scale_fmt" not in caplog.text
    with pytest.raises(ValueError, match=r"^quantization_config \(fp8\): scale_fmt 'e8m0' is not supported$"):
        check_fields({**qc, "scale_fmt": "e8m0"})


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": "false"}, "sym"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": "true"}, "desc_act"),
])
def test_true_false_fields_given_as_strings_are_refused(qc, field):
    """GPTQ's sym / desc_act written as strings ("false" would read as true) are refused by name."""
    from deepserve.quant.int4 import int4_spec
    with pytest.raises(ValueError, match=f"{field} '.*' must be true or false"):
        int4_spec({"quantization_config": qc, "torch_dtype": "float16"})
    good = dict(qc, **{field: field == "sym"})
    assert int4_spec({"quantization_config": good, "torch_dtype": "float16"}) is not None


def test_an_unknown_quant_method_names_every_format_served():
    """The refusal of an unknown quant_method lists what deepserve loads, the per-tensor fp8 and
    compressed-tensors FP8 folders included."""
    with pytest.raises(ValueError, match=r"^quantization_config.quant_method 'bitsandbytes' is not supported; deepserve "
                                         r"loads fp8 \(DeepSeek block, per-tensor\), compressed-tensors \(FP8, W8A8"):
        checkpoint_quantization({"quantization_config": {"quant_method": "bitsandbytes"}})
