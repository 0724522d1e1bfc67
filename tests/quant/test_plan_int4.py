"""`deepserve plan` of 4-bit model folders as `deepserve convert quantize` writes them: the
per-GPU weight bytes equal the parameters of the model the engine builds from the folder (on
the meta device, this rank's slices), whatever the group size, zero points or format; a folder
that keeps Linear layers in high precision is counted with them in the model dtype."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from deepserve.cli.main import main
from deepserve.cli.plan import plan_quantization
from deepserve.config import EngineArgs, load_hf_config
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.distributed.plan_bytes import Layout, weight_bytes_per_gpu
from deepserve.models.loader import build_model, checkpoint_quantization
from deepserve.quant import Int4Options, quantize_checkpoint
from deepserve.quant.ignore import checkpoint_ignore
from tests.models.hf_reference import save_tiny_mla_moe

CASES = [("compressed-tensors", 16, True), ("compressed-tensors", 32, False), ("compressed-tensors", -1, True),
         ("awq", 16, False)]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    # every quantized input dimension, whole or halved by TP 2, holds whole groups of 32
    return save_tiny_mla_moe(tmp_path_factory.mktemp("ds") / "ref", intermediate_size=128,
                             moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)


def _built_bytes(folder: Path, layout: Layout, dtype: str = "float32") -> int:
    mc = EngineArgs(model=str(folder), dtype=dtype).create_engine_config().model
    method = checkpoint_quantization(mc.hf_config)
    pctx = ParallelContext(tp_size=layout.tp, dp_size=layout.dp, ep_size=layout.ep_size)
    model = build_model(mc, torch.device("meta"), pctx, method)
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=[f"{f}-g{g}-{'sym' if s else 'asym'}" for f, g, s in CASES])
def test_plan_of_a_converted_4bit_folder_is_what_the_engine_allocates(deepseek, tmp_path, fmt, group, sym):
    out = tmp_path / "q"
    quantize_checkpoint(deepseek, out, "w4a16", progress=False, int4=Int4Options(
        method="w4a16", fmt=fmt, algorithm="rtn", group_size=group, symmetric=sym))
    cfg = load_hf_config(str(out))
    quantization = plan_quantization(str(out), cfg)
    for layout in (Layout(1, 1, 1), Layout(2, 1, 1), Layout(2, 1, 1, True), Layout(1, 1, 2, True)):
        planned = weight_bytes_per_gpu(cfg, layout, "float32", quantization)
        assert planned == _built_bytes(out, layout), layout
    # served in bf16, the layers still hold the scales in the checkpoint's float32 (they were
    # planned at 2 bytes)
    assert weight_bytes_per_gpu(cfg, Layout(2, 1, 1), "bfloat16", quantization) == \
        _built_bytes(out, Layout(2, 1, 1), "bfloat16")
    rc_out = io.StringIO()
    with contextlib.redirect_stdout(rc_out):
        assert main(["plan", str(out), "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    groups = "one scale per row" if group == -1 else f"groups of {group}"
    assert f"4-bit ({groups}) Linear weights" in rc_out.getvalue()
    assert "leaves unquantized" not in rc_out.getvalue()      # its ignore list names lm_head alone


@pytest.mark.parametrize("fmt", ["compressed-tensors", "awq"])
def test_a_folder_with_linears_left_in_high_precision_counts_them_in_its_dtype(deepseek, tmp_path, capsys, fmt):
    """`convert quantize --ignore` leaves modules unquantized (compressed-tensors `ignore`, AWQ
    `modules_to_not_convert`): the plan counts them in the model dtype, exactly as the engine
    allocates them (it refused such folders)."""
    out = tmp_path / "q"
    quantize_checkpoint(deepseek, out, "w4a16", progress=False, int4=Int4Options(
        method="w4a16", fmt=fmt, algorithm="rtn", group_size=16, ignore=("re:.*shared_experts.*",)))
    cfg = load_hf_config(str(out))
    quantization = plan_quantization(str(out), cfg)
    for layout in (Layout(1, 1, 1), Layout(2, 1, 1), Layout(1, 1, 2, True)):
        planned = weight_bytes_per_gpu(cfg, layout, "float32", quantization, ignored=checkpoint_ignore(cfg))
        assert planned == _built_bytes(out, layout), layout
    assert main(["plan", str(out), "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    assert "with the modules its quantization_config leaves unquantized" in capsys.readouterr().out


def test_a_gpu_smaller_than_the_activation_reserve_is_one_line(deepseek, capsys):
    """1 GiB x 0.9 less the 2 GiB reserve of a small model: said so (it printed '2 x -1.1 = -2
    GiB usable' and judged every layout against it)."""
    assert main(["plan", str(deepseek), "--gpus", "2", "--gpu-memory", "1GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaves nothing past the 2.0 GiB activation reserve" in err, err
    assert main(["plan", str(deepseek), "--gpus", "2", "--gpu-memory", "1GiB", "--activation-reserve", "100MiB"]) == 0


def test_a_quantization_without_plan_arithmetic_is_not_counted_as_16_bit(deepseek):
    """The serve start-up log prints the plan's bytes for the engine's linear method: an
    msModelSlim folder's ('msmodelslim-w8a8') has no arithmetic and is said to have none (its
    weights were counted in the model dtype, 3x the allocation); W4A8 counts as W4A16."""
    from deepserve.distributed.plan_bytes import weight_breakdown
    cfg = load_hf_config(str(deepseek))
    with pytest.raises(ValueError, match="'msmodelslim-w8a8' has no plan arithmetic"):
        weight_breakdown(cfg, Layout(1, 1, 1), "float32", "msmodelslim-w8a8")
    assert weight_breakdown(cfg, Layout(1, 1, 1), "float32", "w4a8-int8") == weight_breakdown(
        cfg, Layout(1, 1, 1), "float32", "w4a16")


def test_w4a8_is_planned_as_its_w4a16_weights(capsys):
    """`convert quantize --method w4a8` writes the weights W4A16 does: `plan --quantization
    w4a8` (a name the user has from convert) prints the same figures under its own name."""
    args = ["plan", "r1-distill-qwen-7b", "--gpus", "1", "--gpu-memory", "24GiB", "--quantization"]
    assert main(args + ["w4a8"]) == 0
    w4a8 = capsys.readouterr().out.splitlines()
    assert main(args + ["w4a16"]) == 0
    w4a16 = capsys.readouterr().out.splitlines()
    assert w4a8[2].startswith("weights    w4a8 4-bit (groups of 128)") and w4a16[2].startswith("weights    w4a16 4-bit")
    assert w4a8[:2] + w4a8[3:] == w4a16[:2] + w4a16[3:]


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 256,
         "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
         "tie_word_embeddings": False}
MLA_MOE = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 256,
           "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 192, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 128, "kv_lora_rank": 64,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 8,
           "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
           "first_k_dense_replace": 1, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
SPLITS = [(LLAMA, "compressed-tensors", 64, False), (LLAMA, "gptq", 128, True), (LLAMA, "awq", 128, False),
          (LLAMA, "awq", 512, False), (MLA_MOE, "compressed-tensors", 64, False),
          (MLA_MOE, "compressed-tensors", 32, False),
          # fp8: o_proj slices of 64 at TP 4 (Llama) / TP 2 (MLA, 4 heads) cut the 128-wide blocks
          (dict(LLAMA, intermediate_size=512), "fp8", 128, False),
          (dict(MLA_MOE, moe_intermediate_size=256, num_attention_heads=4), "fp8", 128, False)]


@pytest.mark.parametrize("config,fmt,group,act", SPLITS,
                         ids=[f"{c['model_type']}-{f}-g{g}{'-act' if a else ''}" for c, f, g, a in SPLITS])
def test_the_plan_refuses_the_quantized_layouts_the_engine_cannot_build(tmp_path, config, fmt, group, act):
    """A layout whose TP slices cut 4-bit groups (or a group wider than a layer's input) or fp8
    blocks was planned, and the engine refused it at load (`plan r1-distill-qwen-14b
    --quantization awq --gpus 8` listed TP=8, whose down_proj slices are 13.5 groups; fp8 was
    checked on the MLP's and experts' intermediate sizes only, not on o_proj's heads)."""
    from deepserve.distributed.plan_bytes import structural_problem
    from tests.quant.int4_formats import quantization_config
    qc = FP8 if fmt == "fp8" else quantization_config(fmt, group, fmt != "awq", act)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, quantization_config=qc)))
    cfg = load_hf_config(str(tmp_path))
    quantization = plan_quantization(str(tmp_path), cfg)
    seen = set()
    for tp, dp, ep in [(1, 1, False), (2, 1, False), (4, 1, False), (8, 1, False), (2, 2, True), (4, 2, True)]:
        layout = Layout(tp, 1, dp, ep)
        if ep and not config.get("n_routed_experts"):
            continue
        problem = structural_problem(cfg, layout, quantization)
        try:
            built = _built_bytes(tmp_path, layout, "bfloat16")
        except ValueError as exc:
            assert problem, f"{layout}: the plan takes a layout the engine refuses: {exc}"
            seen.add("refused")
            continue
        assert problem is None, f"{layout}: the plan refuses a layout the engine builds: {problem}"
        assert weight_bytes_per_gpu(cfg, layout, "bfloat16", quantization) == built
        seen.add("built")
    assert seen == ({"refused"} if group > 384 else {"built"} if act else {"refused", "built"}), seen
