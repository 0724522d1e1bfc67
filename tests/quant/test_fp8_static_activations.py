"""FP8 checkpoints with static activation scales: compressed-tensors `float-quantized` with
input_activations dynamic=false (strategy "tensor") and `quant_method` "fp8" with
`activation_scheme` "static" (AutoFP8), each quantized Linear storing one `input_scale`.

The oracle is the format's rule run in transformers: the model holding the dequantized weights
(w = fp32(q) * s_w) whose every quantized Linear first fake-quantizes its input,
x -> fp32(e4m3(clamp(x / s, -448, 448))) * s, with s the layer's input_scale, and for the
fused q/k/v and gate/up the largest of the parts' (vLLM's merge: one input, one quantization).
Scales are calibrated below the activations' range on purpose, so saturation is exercised.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from deepserve import LLM
from tests.quant.test_ct_fp8 import _ct_config, _quantize
from tests.quant.test_ct_fp8 import tiny as ct_tiny  # noqa: F401, F811  (a fixture)
from tests.quant.test_int4_loading import PROMPTS, TOKENIZER, write_variant

FP8 = torch.float8_e4m3fn
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
# calibrated scale x this: below 1 the largest activations saturate; parts of a fused layer differ
FACTOR = {"q_proj": 0.5, "k_proj": 0.8, "v_proj": 0.6, "o_proj": 0.7, "gate_proj": 0.9, "up_proj": 0.4,
          "down_proj": 0.5}


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


@torch.no_grad()
def _calibrate(model, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    """module -> input_scale: the largest |input| over `prompts` / 448, times FACTOR (0.6 for
    modules FACTOR does not name)."""
    amax: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: amax.__setitem__(
        n, max(amax.get(n, 0.0), args[0].abs().max().item()))) for n, m in _linears(model).items()]
    for p in prompts:
        model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return {n: torch.tensor([a / 448 * FACTOR.get(n.rsplit(".", 1)[1], 0.6)]) for n, a in amax.items()}


def _merged(scales: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The scale a (possibly fused) layer runs with: the largest of its parts'."""
    prefix, leaf = name.rsplit(".", 1)
    parts = [p for p, f in FUSED.items() if f == FUSED.get(leaf)] or [leaf]
    return torch.stack([scales[f"{prefix}.{p}"] for p in parts]).max()


@torch.no_grad()
def _oracle_logits(ref, tensors: dict, scales: dict, prompts=PROMPTS) -> torch.Tensor:
    """MLA's kv_b_proj runs unquantized (dequantized at load: layers/quantization.py), so its
    input is not rounded."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ref, torch_dtype=torch.float32).eval()
    model.load_state_dict(tensors, strict=False)

    def fake_quant(mod, args, s):
        return ((args[0] / s).clamp(-448, 448).to(FP8).float() * s,)
    for n, m in _linears(model).items():
        if not n.endswith("kv_b_proj"):
            m.register_forward_pre_hook(lambda mod, args, s=_merged(scales, n): fake_quant(mod, args, s))
    return torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])


@pytest.fixture(scope="module")
def tiny(ct_tiny):  # noqa: F811
    """test_ct_fp8's tiny Llama and its input scales."""
    return ct_tiny, _calibrate(transformers.LlamaForCausalLM.from_pretrained(ct_tiny, torch_dtype=torch.float32).eval())


def _static_folder(ref, scales, root, strategy: str, autofp8: bool = False):
    """(the static checkpoint folder, the dequantized weights)."""
    tensors = load_file(str(ref / "model.safetensors"))
    out, deq = {}, {}
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        if module not in scales:
            out[name] = w
            continue
        q, s, full = _quantize(w, strategy)
        out[name], out[module + ".weight_scale"], out[module + ".input_scale"] = q, s, scales[module]
        if autofp8:     # AutoFP8 writes 0-d scalars
            out[module + ".weight_scale"], out[module + ".input_scale"] = s.reshape(()), scales[module].reshape(())
        deq[name] = q.float() * full
    if autofp8:
        qc = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    else:
        qc = _ct_config(strategy)
        qc["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    return write_variant(ref, root, out, qc), deq


@pytest.mark.parametrize("strategy, autofp8", [("tensor", False), ("channel", False), ("tensor", True)])
def test_static_fp8_activations_follow_the_format_rule(tiny, tmp_path, strategy, autofp8):
    ref, scales = tiny
    folder, deq = _static_folder(ref, scales, tmp_path / "static", strategy, autofp8)
    llm = LLM(model=str(folder), dtype="float32", tokenizer=TOKENIZER)
    layer = llm.engine.runner.model.model.layers[1]
    assert layer.mlp.down_proj.weight.dtype == FP8
    assert layer.self_attn.qkv_proj.input_scale.item() == _merged(scales, "model.layers.1.self_attn.q_proj").item()
    assert layer.mlp.gate_up_proj.input_scale.item() == scales["model.layers.1.mlp.gate_proj"].item()
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = _oracle_logits(ref, deq, scales)
    err = (got - want).abs().max().item()
    # the same weights with dynamic activations: what ignoring the static scales would give
    cfg = json.loads((folder / "config.json").read_text())
    if autofp8:
        cfg["quantization_config"]["activation_scheme"] = "dynamic"
    else:
        cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(dynamic=True,
                                                                                            strategy="token")
    dyn_folder = write_variant(ref, tmp_path / "dynamic", {n: t for n, t in load_file(
        str(folder / "model.safetensors")).items() if not n.endswith("input_scale")}, cfg["quantization_config"])
    dyn = torch.cat(LLM(model=str(dyn_folder), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    err_dyn = (dyn - want).abs().max().item()
    assert err < 1e-4 and err_dyn > 1e-2, (err, err_dyn)


def test_bad_static_fp8_checkpoints_fail_in_one_line(tiny, tmp_path):
    ref, scales = tiny
    folder, _ = _static_folder(ref, scales, tmp_path / "static", "tensor")
    tensors = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    name = "model.layers.0.self_attn.k_proj.input_scale"

    def fails(ts, match, qc=None):
        bad = write_variant(ref, tmp_path / f"bad{len(list(tmp_path.iterdir()))}", ts, qc or cfg["quantization_config"])
        with pytest.raises(ValueError, match=match):
            LLM(model=str(bad), dtype="float32", tokenizer=TOKENIZER)

    fails({k: v for k, v in tensors.items() if k != name}, rf"^checkpoint lacks tensor {name} \(the other parts")
    fails({**tensors, name: torch.tensor([float("nan")])}, rf"^tensor {name}: input_scale must be finite and > 0")
    fails({**tensors, name: torch.tensor([0.0])}, rf"^tensor {name}: input_scale must be finite and > 0, got 0.0$")
    fails({**tensors, name: torch.ones(2)}, rf"^tensor {name}: a static input_scale holds one floating-point value")
    down = "model.layers.1.mlp.down_proj.input_scale"
    fails({k: v for k, v in tensors.items() if k != down}, rf"lacks tensor\(s\) for: {down}$")
    block = _ct_config("block")
    block["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    fails(tensors, r"^compressed-tensors group group_0: 'block' weights with static activations", block)
    asym = json.loads(json.dumps(cfg["quantization_config"]))
    asym["config_groups"]["group_0"]["input_activations"]["symmetric"] = False
    fails(tensors, r"activations 8-bit float tensor \(dynamic=False, symmetric=False\) are not supported", asym)


def test_static_scales_of_a_requantized_or_ignored_module_are_dropped(tiny, tmp_path):
    """--quantization w8a8-int8 of a static FP8 checkpoint requantizes its weights with dynamic
    int8 activations (the scales are not read); a module the config ignores keeps its 16-bit
    weight and unquantized activations, so its input_scale (if written) is dropped, as in vLLM."""
    ref, scales = tiny
    folder, deq = _static_folder(ref, scales, tmp_path / "static", "channel")
    llm = LLM(model=str(folder), dtype="float32", tokenizer=TOKENIZER, quantization="w8a8-int8")
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    tensors[name + ".weight"] = deq[name + ".weight"]
    del tensors[name + ".weight_scale"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    qc["ignore"] = ["lm_head", name]
    ignored = write_variant(ref, tmp_path / "ignored", tensors, qc)
    layer = LLM(model=str(ignored), dtype="float32", tokenizer=TOKENIZER).engine.runner.model.model.layers[1].mlp
    assert layer.down_proj.weight.dtype == torch.float32 and not hasattr(layer.down_proj, "input_scale")
    assert layer.gate_up_proj.weight.dtype == FP8


def _experts_forward(self, hidden_states, top_k_index, top_k_weights, quant_in, quant_mid):
    """transformers' DeepseekV3Experts.forward with each expert's input row and SwiGLU output
    passed through quant_in / quant_mid (the format's fake quantization, or a recorder)."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tok, pos = torch.where(top_k_index == e)
        if tok.numel():
            gate, up = torch.nn.functional.linear(quant_in(e, hidden_states[tok]), self.gate_up_proj[e]).chunk(2, -1)
            y = torch.nn.functional.linear(quant_mid(e, self.act_fn(gate) * up), self.down_proj[e])
            out.index_add_(0, tok, y * top_k_weights[tok, pos, None])
    return out


@torch.no_grad()
def _expert_scales(model, prompts) -> dict[str, torch.Tensor]:
    """Each routed expert matrix's input_scale: the largest |input| it saw over `prompts` / 448
    (or the layer's, for an expert no token reached), times a factor that differs by expert."""
    amax: dict[tuple, float] = {}

    def record(key):
        def f(e, x):
            amax[(*key, e)] = max(amax.get((*key, e), 0.0), x.abs().max().item())
            return x
        return f
    moes = {n: m for n, m in model.named_modules() if type(m).__name__ == "DeepseekV3Experts"}
    for n, m in moes.items():
        m.forward = functools.partial(_experts_forward, m, quant_in=record((n, "in")), quant_mid=record((n, "mid")))
    for p in prompts:
        model(torch.tensor([p]))
    scales = {}
    for n, m in moes.items():
        for e in range(m.num_experts):
            for proj, kind in (("gate_proj", "in"), ("up_proj", "in"), ("down_proj", "mid")):
                a = amax.get((n, kind, e)) or max(v for k, v in amax.items() if k[:2] == (n, kind))
                factor = 0.5 + 0.1 * e + (0.05 if proj == "up_proj" else 0.0)
                scales[f"{n}.{e}.{proj}"] = torch.tensor([a / 448 * factor])
        del m.forward
    return scales


def test_static_fp8_routed_experts_follow_the_format_rule(tmp_path):
    """A tiny DeepSeek-V3 whose every Linear and routed expert is FP8 with static per-tensor
    input scales (compressed-tensors, dynamic=false): served, as vLLM serves it, with the fused
    MoE quantizing each GEMM's input with one scale, the largest of the layer's experts' (vLLM's
    a1 / a2 scales). Oracle: transformers over the dequantized weights, every quantized input
    fake-quantized by the format's rule with the scale deepserve runs. The checkpoint was refused."""
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    ref = tmp_path / "ref"
    prompts = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 200, 11, 54, 9], [250, 1, 77, 77, 13, 140, 6, 93]]
    model = transformers.AutoModelForCausalLM.from_pretrained(ref, torch_dtype=torch.float32).eval()
    scales = {**_calibrate(model, prompts), **_expert_scales(model, prompts)}
    folder, deq = _static_folder(ref, scales, tmp_path / "static", "tensor")
    llm = LLM(model=str(folder), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[2].mlp.experts
    assert experts.w13_weight.dtype == FP8
    layer_max = {kind: max(v.item() for k, v in scales.items() if k.startswith("model.layers.2.mlp.experts.")
                           and k.endswith(projs)) for kind, projs in (("in", ("gate_proj", "up_proj")),
                                                                      ("mid", ("down_proj",)))}
    assert (experts.a13_scale.item(), experts.a2_scale.item()) == (layer_max["in"], layer_max["mid"])
    got = torch.cat(llm.prompt_logits(prompts))

    full = {**load_file(str(ref / "model.safetensors")), **deq}
    # kv_b_proj is dequantized through bf16 at load, as `convert fp8-to-bf16` writes it
    full = {n: w.bfloat16().float() if n.endswith("kv_b_proj.weight") else w for n, w in full.items()}
    oracle = transformers.AutoModelForCausalLM.from_pretrained(write_variant(ref, tmp_path / "deq", full, None),
                                                               torch_dtype=torch.float32).eval()

    def fake_quant(x, s):
        return (x / s).clamp(-448, 448).to(FP8).float() * s
    for n, m in _linears(oracle).items():
        if not n.endswith("kv_b_proj"):
            m.register_forward_pre_hook(lambda mod, args, s=_merged(scales, n): (fake_quant(args[0], s),))

    @torch.no_grad()
    def oracle_logits(layer_max: bool):
        for n, m in oracle.named_modules():
            if type(m).__name__ != "DeepseekV3Experts":
                continue
            s13 = {e: torch.maximum(scales[f"{n}.{e}.gate_proj"], scales[f"{n}.{e}.up_proj"]) for e in range(8)}
            s2 = {e: scales[f"{n}.{e}.down_proj"] for e in range(8)}
            if layer_max:
                s13 = dict.fromkeys(s13, max(s13.values()))
                s2 = dict.fromkeys(s2, max(s2.values()))
            m.forward = functools.partial(_experts_forward, m, quant_in=lambda e, x, s=s13: fake_quant(x, s[e]),
                                          quant_mid=lambda e, x, s=s2: fake_quant(x, s[e]))
        return torch.cat([oracle(torch.tensor([p])).logits[0] for p in prompts])
    err = (got - oracle_logits(layer_max=True)).abs().max().item()
    # each expert quantizing with its own scales instead: what one scale a GEMM does not give
    err_own = (got - oracle_logits(layer_max=False)).abs().max().item()
    assert err < 1e-4 and err_own > 1e-3, (err, err_own)


def test_static_fp8_mla_projections_keep_their_own_scales(tmp_path):
    """A dense MLA model (q_a_proj, kv_a_proj_with_mqa, q_b_proj, o_proj, MLPs) with static FP8
    activations follows the format's rule. deepserve joins q_a_proj and kv_a_proj_with_mqa into
    one fp8 GEMM; that GEMM quantized their input per token, dropping both static scales."""
    from tests.models.hf_reference import save_tiny_mla_moe
    ref = save_tiny_mla_moe(tmp_path / "ref", first_k_dense_replace=2, hidden_size=128, q_lora_rank=64)
    prompts = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 100, 11, 54, 9], [120, 1, 77, 77, 13, 40, 6, 93]]
    scales = _calibrate(transformers.AutoModelForCausalLM.from_pretrained(ref, torch_dtype=torch.float32).eval(),
                        prompts)
    folder, deq = _static_folder(ref, scales, tmp_path / "static", "channel")
    llm = LLM(model=str(folder), dtype="float32", tokenizer=TOKENIZER)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    assert attn.q_a_proj.weight.dtype == FP8 and attn.kv_b_proj.weight.dtype == torch.float32
    got = torch.cat(llm.prompt_logits(prompts))
    # kv_b_proj is dequantized through bf16 at load, as `convert fp8-to-bf16` writes it
    want = _oracle_logits(ref, {n: w.bfloat16().float() if n.endswith("kv_b_proj.weight") else w
                                for n, w in deq.items()}, scales, prompts)
    err = (got - want).abs().max().item()
    assert err < 1e-4, err


def test_the_start_up_log_plans_the_static_scales(tiny, tmp_path):
    """The engine's `weights on this rank: X allocated, Y planned`: X == Y with the input scales."""
    from deepserve.config import EngineArgs
    from deepserve.distributed.parallel_state import single_process
    from deepserve.engine.model_runner import _bytes, held_weight_bytes, planned_weight_text
    from deepserve.models.loader import load_model
    ref, scales = tiny
    folder, _ = _static_folder(ref, scales, tmp_path / "static", "tensor", autofp8=True)
    config = EngineArgs(model=str(folder), dtype="bfloat16").create_engine_config()
    model = load_model(config.model, torch.device("cpu"))
    assert model.model.layers[0].mlp.gate_up_proj.input_scale.numel() == 1
    planned = planned_weight_text(config, single_process(), model.quantization, torch.bfloat16)
    assert planned == f"{_bytes(held_weight_bytes(model))} planned"


@pytest.mark.parametrize("case", ["autofp8-tensor-static", "ct-channel-static", "ct-block"])
def test_convert_fp8_to_bf16_dequantizes_every_fp8_format_exactly(tiny, tmp_path, case):
    """`deepserve convert fp8-to-bf16` of a per-tensor (AutoFP8), per-row or per-block
    (compressed-tensors) FP8 folder: each e4m3 weight becomes bf16(fp32(q) * s) with s its
    tensor's, row's or block's scale (they were refused as not DeepSeek's format); the weight
    and static input scales are dropped, the other tensors copied, the config unquantized."""
    from deepserve.quant import convert_fp8_to_bf16
    from tests.quant.test_ct_fp8 import _folders
    ref, scales = tiny
    if case == "ct-block":
        folder, deq = _folders(ref, tmp_path, "block")["ct"], None
    else:
        folder, deq = _static_folder(ref, scales, tmp_path / "static", case.split("-")[1], case.startswith("autofp8"))
    src = load_file(str(folder / "model.safetensors"))
    convert_fp8_to_bf16(folder, tmp_path / "bf16", progress=False)
    out = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert set(out) == {n for n in src if not n.endswith(("_scale", ".input_scale"))}
    for name, q in src.items():
        if q.dtype == FP8:
            s = src[name + "_scale"].float()
            n, k = q.shape
            full = (s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k] if case == "ct-block"
                    else s.reshape(-1, 1).expand(n, k))            # one value, or one a row
            want = (q.float() * full).bfloat16()
            assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name
            if deq is not None:
                assert torch.equal(out[name], deq[name].bfloat16()), name
        elif not name.endswith(("_scale", ".input_scale")):
            assert torch.equal(out[name], q), name


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_per_tensor_and_channel_fp8_split_anywhere_under_tp(tiny, tmp_path, strategy):
    """One scale a row or tensor is the same in every 128-column block, so a row-parallel split
    need not fall on a block (vLLM splits such layers freely): the tiny Llama's down_proj (384
    inputs, 192 a rank at TP 2) was refused. With static activations TP 2 gives TP 1's logits
    (the same quantized values; sums split over ranks); with dynamic ones (per 128-group of a
    rank's slice) it follows the dequantized model as TP 1 does."""
    from tests.quant.test_ct_fp8 import _folders
    ref, scales = tiny
    static, _ = _static_folder(ref, scales, tmp_path / "static", strategy)
    kw = dict(dtype="float32", tokenizer=TOKENIZER, kv_cache_memory_bytes=1 << 22)
    one = torch.cat(LLM(model=str(static), **kw).prompt_logits(PROMPTS))
    two = LLM(model=str(static), tensor_parallel_size=2, **kw)
    try:
        got = torch.cat(two.prompt_logits(PROMPTS))
    finally:
        two.shutdown()
    assert (got - one).abs().max().item() < 1e-4
    folders = _folders(ref, tmp_path / "dynamic", strategy)
    two = LLM(model=str(folders["ct"]), tensor_parallel_size=2, **kw)
    try:
        got = torch.cat(two.prompt_logits(PROMPTS))
    finally:
        two.shutdown()
    want = torch.cat(LLM(model=str(folders["deq"]), **kw).prompt_logits(PROMPTS))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert kl < 1e-3, kl
