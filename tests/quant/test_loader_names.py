"""A bad tensor in a quantized checkpoint is named as the checkpoint stores it. The layers fuse
q/k/v, gate/up and the routed experts into one parameter each (`qkv_proj`, `experts.w13_*`), names
no checkpoint holds: an error that named them sent the user looking for a tensor that is not in
their files."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM
from deepserve.models.calibration import LayerRunner
from deepserve.quant import Int4Options, quantize_checkpoint
from tests.conftest import DEMO_MODEL
from tests.models.test_deepseek import r1_style, save_deepseek

NO_DOWN = (r"re:model\.layers\.\d+\.mlp\.down_proj$",)


def _edited(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _load_error(folder, tokenizer=DEMO_MODEL) -> str:
    with pytest.raises(ValueError) as info:
        LLM(model=str(folder), tokenizer=str(tokenizer), dtype="float32")
    return str(info.value)


def _nan(name):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    return edit


def _shape(name, shape):
    def edit(t):
        t[name] = torch.zeros(shape, dtype=t[name].dtype)
    return edit


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    root = tmp_path_factory.mktemp("stories")
    quantize_checkpoint(DEMO_MODEL, root / "fp8", "fp8-block", progress=False)
    quantize_checkpoint(DEMO_MODEL, root / "w4", "w4a16", progress=False, runner=LayerRunner,
                        int4=Int4Options(algorithm="rtn", group_size=32, ignore=NO_DOWN))
    return root


@pytest.mark.parametrize("folder, tensor, edit, why", [
    ("fp8", "model.layers.1.self_attn.k_proj.weight_scale_inv", "nan", "scale_inv has non-finite"),
    ("fp8", "model.layers.1.self_attn.v_proj.weight", (64, 32), "checkpoint shape (64, 32) does not match"),
    ("fp8", "model.layers.2.mlp.up_proj.weight_scale_inv", (2, 2), "scale shape (2, 2) does not match"),
    ("w4", "model.layers.1.self_attn.k_proj.weight_packed", (32, 4), "packed 4-bit weight"),
    ("w4", "model.layers.0.mlp.up_proj.weight_scale", "nan", "scales have non-finite values"),
])
def test_a_fused_layers_bad_part_is_named_as_stored(stories, tmp_path, folder, tensor, edit, why):
    change = _nan(tensor) if edit == "nan" else _shape(tensor, edit)
    err = _load_error(_edited(stories / folder, tmp_path / "bad", change))
    assert err.startswith(f"tensor {tensor}: ") and why in err, err
    assert not re.search(r"qkv_proj|gate_up_proj|\[\d\]", err), err


def test_a_routed_experts_bad_scale_is_named_as_stored(tmp_path):
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    quantize_checkpoint(tmp_path / "ref", tmp_path / "fp8", "fp8-block", progress=False)
    name = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    err = _load_error(_edited(tmp_path / "fp8", tmp_path / "bad", _nan(name)))
    assert err == f"tensor {name}: scale_inv has non-finite or non-positive values (nan at [0, 0])", err
