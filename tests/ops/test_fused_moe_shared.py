"""DeepSeek's shared experts folded into fused_moe (`shared_w13` / `shared_w2`).

The torch reference must equal, bit for bit, the routed experts plus the dense LlamaMLP it
replaces. The small Triton path computes the shared expert in its own two launches (extra
gate_up programs, an extra act column block, one more term in the down kernel's sum); it is
compared with the reference at I != Is, D not a multiple of the block, and slots routed
outside [0, E). In fp32 the single rounding of the fused sum is invisible (1e-5); in bf16
the interpreter truncates instead of rounding, so CPU bf16 checks are relative, and the GPU
test checks the ~1 ulp claim itself. The model check: a tiny bf16 DeepSeek gives the same
logits and greedy tokens with the shared experts fused as with the dense MLP beside them.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import transformers

from deepserve.ops import REFERENCE_OPS
from deepserve.config import EngineArgs, HFConfig
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.moe import FusedMoE
from deepserve.layers.quantization import make_method
from deepserve.models.deepseek_v3 import DeepseekMoE, DeepseekV3ForCausalLM
from deepserve.models.llama import LlamaMLP
from deepserve.models.loader import load_model
from deepserve.ops.registry import resolve
from tests.models.hf_reference import save_tiny
from tests.models.paged_harness import greedy_generate, prefill_logits
from tests.models.test_deepseek import v2_lite_style
from tests.ops.test_triton_fused_moe_small import moe_case, rel_err, w8a16_reference, with_remote_slots


def shared_case(t, d, inter, s_inter, e, k, dtype, seed=0, device="cpu"):
    """(x, w13, w2, topk_weights, topk_ids) with remote slots, and the shared kwargs."""
    args = with_remote_slots(moe_case(t, d, inter, e, k, dtype, seed=seed, device=device)[0], e)
    g = torch.Generator(device=device).manual_seed(seed + 100)
    shared = dict(shared_w13=(torch.randn(2 * s_inter, d, generator=g, device=device) * d ** -0.5).to(dtype),
                  shared_w2=(torch.randn(d, s_inter, generator=g, device=device) * s_inter ** -0.5).to(dtype))
    return args, shared


def reference(*args, **kwargs):
    return resolve("fused_moe", "torch")[1](*args, **kwargs)


def llama_mlp(x, shared):
    """The dense shared-expert MLP the model ran before the fusion, holding `shared`'s weights."""
    s_inter, d = shared["shared_w2"].shape[1], x.shape[1]
    mlp = LlamaMLP(d, s_inter, x.dtype, ParallelContext()).to(x.device)
    with torch.no_grad():
        mlp.gate_up_proj.weight.copy_(shared["shared_w13"])
        mlp.down_proj.weight.copy_(shared["shared_w2"])
        return mlp(x)


@pytest.fixture
def small(triton_ops):
    return importlib.import_module("deepserve.ops.triton.fused_moe_small")


# ---- torch reference ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_routed_plus_llama_mlp(dtype):
    args, shared = shared_case(3, 48, 24, 40, 8, 2, dtype)
    want = reference(*args) + llama_mlp(args[0], shared)
    got = reference(*args, **shared)
    assert got.dtype == dtype and torch.equal(got, want)
    assert rel_err(got, reference(*args)) > 0.1           # the shared MLP really adds something


# ---- Triton small path, interpreted --------------------------------------------------------

# Is > I, < I, = 2I, = I (the last two: the shared expert as slots of the down kernel's
# all-slots step); 64: I a whole number of interpreted K steps. The kernels' code is the same
# for both 16/32-bit dtypes: every shape in fp32, one in bf16.
SHARED_SHAPES = [(40, 88), (40, 24), (40, 80), (40, 40), (64, 128)]


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("dtype,inter,s_inter", [(torch.float32, *shape) for shape in SHARED_SHAPES]
                         + [(torch.bfloat16, 40, 88)])
def test_small_path_with_shared_matches_reference(small, cpu_only, dtype, t, inter, s_inter):
    e = 8
    args, shared = shared_case(t, 72, inter, s_inter, e, 3, dtype, seed=t)   # D 72: partial K blocks
    want = reference(*args, **shared)
    got = small.fused_moe_small(*args, **shared)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # the interpreter truncates to bf16 instead of rounding: a biased, larger error
        assert rel_err(got, want) < 3e-2
    # the remote slots still add zero beside the shared expert
    x, w13, w2, weights, ids = args
    remote = (ids < 0) | (ids >= e)
    local_only = (x, w13, w2, weights.masked_fill(remote, 0.0), ids.masked_fill(remote, 0))
    torch.testing.assert_close(small.fused_moe_small(*local_only, **shared), got, rtol=0, atol=0)


@pytest.mark.parametrize("all_slots", [True, False])
def test_down_kernel_forms_agree(small, cpu_only, all_slots):
    """The down kernel's all-slots step and its slot-by-slot loop (fp8's form, and the timing
    baseline) give the reference's result on the same 16-bit case."""
    from deepserve.ops.triton.launch_config import trying
    args, shared = shared_case(2, 72, 40, 80, 8, 3, torch.float32, seed=5)
    with trying("fused_moe_small", [{"if": {"kernel": "down_slots"}, "set": {"ALL_SLOTS": all_slots}}]):
        torch.testing.assert_close(small.fused_moe_small(*args, **shared), reference(*args, **shared),
                                   rtol=1e-5, atol=1e-5)


def test_small_path_shared_only_when_all_slots_remote(small, cpu_only):
    args, shared = shared_case(2, 64, 32, 48, 4, 2, torch.float32)
    x, w13, w2, weights, _ = args
    ids = torch.tensor([[-1, 4], [7, -1]], dtype=torch.int64)
    got = small.fused_moe_small(x, w13, w2, weights, ids, **shared)
    torch.testing.assert_close(got, llama_mlp(x, shared), rtol=1e-5, atol=1e-5)


def test_triton_fused_moe_adds_shared_on_both_paths(triton_ops, small, cpu_only, monkeypatch):
    calls = []
    small_fn = small.fused_moe_small
    monkeypatch.setattr(triton_ops.fused_moe, "fused_moe_small",
                        lambda *a, **kw: calls.append(kw.get("shared_w13") is not None) or small_fn(*a, **kw))
    fused = resolve("fused_moe", "triton")[1]
    for t, uses_small in ((2, True), (6, False)):    # E=8, k=4: small while T*k <= 8
        calls.clear()
        args, shared = shared_case(t, 64, 32, 48, 8, 4, torch.float32, seed=t)
        torch.testing.assert_close(fused(*args, **shared), reference(*args, **shared), rtol=1e-5, atol=1e-5)
        assert calls == ([True] if uses_small else [])


def test_sorted_path_adds_shared_rows_in_the_slot_sum_as_torch_adds(triton_ops, cpu_only):
    """The sorted path's slot sum adds the shared MLP's rows after rounding its own sum, so the
    op is, bit for bit (fp32: the interpreter's conversions are exact there), the routed experts
    alone plus the shared MLP's ops (cuBLAS GEMMs around the Triton SiLU-and-mul) added by torch."""
    fused = resolve("fused_moe", "triton")[1]
    silu_and_mul = resolve("silu_and_mul", "triton")[1]
    args, shared = shared_case(6, 64, 32, 48, 8, 4, torch.float32, seed=11)   # E=8, k=4: sorted at T=6
    x = args[0]
    mlp = torch.nn.functional.linear(silu_and_mul(torch.nn.functional.linear(x, shared["shared_w13"])),
                                     shared["shared_w2"])
    routed = fused(*args)
    assert torch.equal(fused(*args, **shared), routed + mlp)
    assert not torch.equal(routed + mlp, routed)


# ---- fp8 experts with fp8 shared weights ---------------------------------------------------

def fp8_shared_case(t, d, inter, s_inter, e, k, seed=0, device="cpu"):
    """fp8 routed experts (moe_case) and e4m3 shared weights with their block scales, whose
    magnitudes differ by 128x128 block (a scale of the wrong block is far off)."""
    from deepserve.quant.fp8 import quant_fp8_block
    from tests.ops.test_triton_fused_moe_small import block_gain
    args, scales = moe_case(t, d, inter, e, k, torch.float32, fp8=True, seed=seed)
    args = tuple(a.to(device) for a in with_remote_slots(args, e))
    scales = {n: s.to(device) for n, s in scales.items()}
    g = torch.Generator().manual_seed(seed + 7)
    shared = {}
    for name, shape in (("shared_w13", (2 * s_inter, d)), ("shared_w2", (d, s_inter))):
        w = torch.randn(*shape, generator=g) * shape[1] ** -0.5 * block_gain((1, *shape), g)[0]
        q, s = quant_fp8_block(w)
        # Fp8BlockLinear's layout: the block scales repeated per row
        shared[name], shared[name + "_scale"] = q.to(device), s.repeat_interleave(128, 0)[:shape[0]].to(device)
    return args, scales, shared


@pytest.mark.parametrize("t", [1, 3])
def test_small_path_with_fp8_shared_matches_reference(small, cpu_only, t):
    """The shared expert in fp8 rides in the fp8 small path's two launches: its W8A16 oracle
    (every weight dequantized, then the torch op, LlamaMLP's ops for the shared) to fp32 rounding; D 320 and Is 256 span
    several scale blocks, I 128 != Is."""
    args, scales, shared = fp8_shared_case(t, 320, 128, 256, 8, 3, seed=t)
    want = w8a16_reference(*args, **scales, **shared)
    got = small.fused_moe_small(*args, **scales, **shared)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert rel_err(got, w8a16_reference(*args, **scales)) > 0.1            # the shared expert adds something
    # the shared scales are read per block: one block's scale changed moves the output
    wrong = dict(shared, shared_w2_scale=shared["shared_w2_scale"].roll(1, dims=0))
    assert rel_err(small.fused_moe_small(*args, **scales, **wrong), want) > 1e-2
    from deepserve.quant.fp8 import dequant_fp8_block
    plain = {n: dequant_fp8_block(shared[n], shared[n + "_scale"][::128], out_dtype=torch.float32)
             for n in ("shared_w13", "shared_w2")}
    torch.testing.assert_close(want, w8a16_reference(*args, **scales) + llama_mlp(args[0], plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_inter", [0, 256])
def test_fp8_down_kernel_all_slots_step_matches_reference(small, cpu_only, s_inter):
    """fp8 weights in the down kernel's all-slots step (the launch table's ALL_SLOTS): each
    128-wide slice of every slot scaled by its own block, the shared expert's (Is = 2 I: two
    pieces) by its row scales; the same result as the reference and as the slot-by-slot loop,
    and a wrong block's scale moves it. D 320 spans several row blocks; a K step of two
    scale blocks."""
    from deepserve.ops.triton.launch_config import trying
    args, scales, shared = fp8_shared_case(2, 320, 128, 256, 8, 3, seed=4)
    shared = shared if s_inter else {}
    want = w8a16_reference(*args, **scales, **shared)
    steps = [{"if": {"kernel": "down_slots"}, "set": {"ALL_SLOTS": True, "BLOCK_K": 256}}]
    with trying("fused_moe_small", steps):
        got = small.fused_moe_small(*args, **scales, **shared)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        wrong = dict(scales, w2_scale=scales["w2_scale"].roll(1, dims=1))
        assert rel_err(small.fused_moe_small(*args, **wrong, **shared), want) > 1e-2
        if s_inter:
            wrong = dict(shared, shared_w2_scale=shared["shared_w2_scale"].roll(1, dims=1))
            assert rel_err(small.fused_moe_small(*args, **scales, **wrong), want) > 1e-2
    with trying("fused_moe_small", [{"if": {"kernel": "down_slots"}, "set": {"ALL_SLOTS": False}}]):
        torch.testing.assert_close(small.fused_moe_small(*args, **scales, **shared), got, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_small_path_with_fp8_shared(small, t):
    """R1's hidden size (7168) with Is 2048 (R1's shared expert) over 16 fp8 experts of I 256, bf16
    activations: the fused shared expert against the CUDA-core kernels' W8A16 oracle, to bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    args, scales, shared = fp8_shared_case(t, 7168, 256, 2048, 16, 8, seed=t, device="cuda")
    args = (args[0].bfloat16(),) + args[1:]
    want = w8a16_reference(*args, **scales, **shared)
    got = small.fused_moe_small(*args, **scales, **shared)
    assert rel_err(got, want) < 1e-2 and rel_err(got, w8a16_reference(*args, **scales)) > 0.1


def test_triton_fused_moe_fp8_shared_on_both_paths(triton_ops, cpu_only, monkeypatch):
    """The small path (T*k <= E) and the sorted path (W8A8 GEMMs, activations quantized per
    128-group, as the dense fp8 layer) both add the fp8 shared expert, each equal to its oracle:
    W8A16 for the small path's CUDA-core kernels, the torch op (W8A8) for the sorted one, whose
    rows are quantised before the GEMMs by torch's rule (the interpreter's e4m3 cast is not
    the GPU's, tests/ops/test_moe_small_mma.py)."""
    from deepserve.ops.quant import quant_fp8_per_token_group
    from deepserve.ops.triton import fused_moe as fm, quant_gemm
    from deepserve.ops.triton.launch_config import trying
    monkeypatch.setattr(fm, "_quant_rows", quant_fp8_per_token_group)
    monkeypatch.setattr(quant_gemm, "act_quant_fp8", quant_fp8_per_token_group)
    fused = resolve("fused_moe", "triton")[1]
    # E 8, k 4: small at T 2; sorted at 6
    for t, oracle in ((2, w8a16_reference), (6, reference)):
        args, scales, shared = fp8_shared_case(t, 128, 128, 128, 8, 4, seed=t)
        want = oracle(*args, **scales, **shared)
        with trying("fused_moe", [{"set": {"PREQUANT": True}}]):
            got = fused(*args, **scales, **shared)
        assert rel_err(got, want) < 1e-5 and rel_err(got, oracle(*args, **scales)) > 0.1, rel_err(got, want)


# ---- argument checks ------------------------------------------------------------------------

def fp8_case():
    args, scales = moe_case(1, 128, 128, 4, 2, torch.float32, fp8=True)
    _, shared = shared_case(1, 128, 128, 64, 4, 2, torch.float32)
    return args, scales, shared


@pytest.mark.parametrize("backend", ["torch", "triton", "small"])
def test_bad_shared_arguments_raise(triton_ops, small, backend):
    fn = small.fused_moe_small if backend == "small" else resolve("fused_moe", backend)[1]
    args, shared = shared_case(1, 64, 32, 48, 8, 2, torch.float32)
    w13, w2 = shared["shared_w13"], shared["shared_w2"]
    with pytest.raises(ValueError, match="got only shared_w13"):
        fn(*args, shared_w13=w13)
    with pytest.raises(ValueError, match="got only shared_w2"):
        fn(*args, shared_w2=w2)
    with pytest.raises(ValueError, match=r"shared_w2 \(64, 40\) do not fit"):
        fn(*args, shared_w13=w13, shared_w2=w2[:, :40])
    with pytest.raises(ValueError, match="shared_w13 must have the activations' dtype torch.float32, "
                                         "got torch.bfloat16"):
        fn(*args, shared_w13=w13.bfloat16(), shared_w2=w2)
    fp8_args, scales, plain_shared = fp8_case()
    with pytest.raises(ValueError, match="fp8 routed experts, 16-bit shared weights"):
        fn(*fp8_args, **scales, **plain_shared)
    _, _, fp8_shared = fp8_shared_case(1, 128, 128, 128, 4, 2)
    with pytest.raises(ValueError, match="16-bit routed experts, fp8 shared weights"):
        fn(*args, **fp8_shared)
    with pytest.raises(ValueError, match="need both shared_w13_scale and shared_w2_scale"):
        fn(*fp8_args, **scales, **dict(fp8_shared, shared_w2_scale=None))
    with pytest.raises(ValueError, match=r"shared_w2_scale \(1, 2\) does not fit \(128, 128\) \(want \(128, 1\)"):
        fn(*fp8_args, **scales, **dict(fp8_shared, shared_w2_scale=torch.ones(1, 2)))


# ---- layers ---------------------------------------------------------------------------------

def tiny_moe_config(**overrides):
    raw = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
               n_shared_experts=2, model_type="deepseek_v2", mlp_bias=False)
    return HFConfig(dict(raw, **overrides))


def shared_in_experts(moe: DeepseekMoE) -> bool:
    moe.process_weights_after_loading()
    return moe.shared_in_experts


def test_deepseek_moe_fuses_only_unquantized_16_bit_single_process():
    assert shared_in_experts(DeepseekMoE(tiny_moe_config(), torch.bfloat16, ParallelContext()))
    assert shared_in_experts(DeepseekMoE(tiny_moe_config(), torch.float16, ParallelContext()))
    assert not shared_in_experts(DeepseekMoE(tiny_moe_config(), torch.float32, ParallelContext()))
    assert not shared_in_experts(DeepseekMoE(tiny_moe_config(mlp_bias=True), torch.bfloat16, ParallelContext()))
    assert not shared_in_experts(DeepseekMoE(tiny_moe_config(n_shared_experts=0), torch.bfloat16,
                                             ParallelContext()))
    for pctx in (ParallelContext(tp_size=2), ParallelContext(ep_size=2)):
        assert not shared_in_experts(DeepseekMoE(tiny_moe_config(), torch.bfloat16, pctx))
    for method in ("fp8", "w8a8-int8"):
        quantized = DeepseekMoE(tiny_moe_config(), torch.bfloat16, ParallelContext())
        quantized.shared_experts.down_proj.set_quant_method(make_method(method, (128, 128)))
        assert not shared_in_experts(quantized)
    fp8_experts = DeepseekMoE(tiny_moe_config(moe_intermediate_size=128), torch.bfloat16, ParallelContext())
    fp8_experts.experts.use_fp8()
    assert not shared_in_experts(fp8_experts)     # 16-bit shared weights beside fp8 experts


def fp8_moe(pctx=None, block=(128, 128)):
    """A DeepseekMoE with fp8 routed experts and block-fp8 shared experts, random weights."""
    from deepserve.models.weights import init_dummy_weights
    from deepserve.layers.quantization import init_dummy_quantized
    moe = DeepseekMoE(tiny_moe_config(hidden_size=256, moe_intermediate_size=128), torch.bfloat16,
                      pctx or ParallelContext())
    moe.experts.use_fp8()
    for lin in (moe.shared_experts.gate_up_proj, moe.shared_experts.down_proj):
        lin.set_quant_method(make_method("fp8", block))
    init_dummy_weights(moe, seed=3)
    init_dummy_quantized(moe, seed=3)
    return moe


def test_deepseek_moe_folds_fp8_shared_experts_beside_fp8_experts():
    """fp8 routed experts and block-fp8 shared experts (one process) run as one fused_moe call,
    whose shared term dequantizes the weights (W8A16) where the dense fp8 layer quantizes the
    activations too (W8A8): the two forwards agree to that quantization."""
    moe = fp8_moe()
    assert shared_in_experts(moe) and moe.shared_kwargs["shared_w13"].dtype == torch.float8_e4m3fn
    assert moe.shared_kwargs["shared_w2_scale"] is moe.shared_experts.down_proj.weight_scale_inv
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    fused = moe(x)
    moe.shared_in_experts = False
    dense = moe(x)
    routed_only = moe.experts(x, *REFERENCE_OPS.moe_route(moe.gate(x), moe.gate.e_score_correction_bias, **moe.route))
    assert rel_err(fused, dense) < 0.05 < rel_err(fused, routed_only), (rel_err(fused, dense),
                                                                         rel_err(fused, routed_only))
    assert not shared_in_experts(fp8_moe(ParallelContext(ep_size=2)))


def test_fused_moe_layer_refuses_shared_weights_across_ranks():
    moe = FusedMoE(4, 32, 16, torch.bfloat16, ParallelContext(ep_size=2))
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="tp_size 1, ep_size 2"):
        moe(x, torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.int32),
            shared_w13=torch.zeros(64, 32, dtype=torch.bfloat16), shared_w2=torch.zeros(32, 32, dtype=torch.bfloat16))


# ---- model: tiny bf16 DeepSeek, fused vs dense shared experts --------------------------------

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 7, 123]]


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2_lite_bf16")
    save_tiny(transformers.DeepseekV2ForCausalLM, v2_lite_style(), path)
    model = load_model(EngineArgs(model=str(path), dtype="bfloat16").create_engine_config().model,
                       torch.device("cpu"))
    assert isinstance(model, DeepseekV3ForCausalLM) and next(model.parameters()).dtype == torch.bfloat16
    return model


def run_model(model, unfused: bool, monkeypatch):
    with monkeypatch.context() as m:
        if unfused:
            for layer in model.model.layers:
                if isinstance(layer.mlp, DeepseekMoE):
                    m.setattr(layer.mlp, "shared_in_experts", False)
        # the two-token prompt routes T*k = 6 <= 8 assignments: the small path, as decode does
        logits = torch.cat([prefill_logits(model, PROMPTS), prefill_logits(model, [PROMPTS[0][:2]])])
        return logits, greedy_generate(model, PROMPTS, max_new=2)      # a prefill and a decode step


def test_model_torch_backend_unchanged(tiny_bf16, monkeypatch):
    fused_calls = []
    shared_mlp = importlib.import_module("deepserve.ops.moe").shared_mlp
    monkeypatch.setattr("deepserve.ops.moe.shared_mlp", lambda *a: fused_calls.append(1) or shared_mlp(*a))
    logits, tokens = run_model(tiny_bf16, False, monkeypatch)
    assert fused_calls, "the shared experts did not go through fused_moe"
    want_logits, want_tokens = run_model(tiny_bf16, True, monkeypatch)
    assert torch.equal(logits, want_logits)      # the reference adds exactly as the dense path did
    assert tokens == want_tokens


def test_model_triton_fused_moe_unchanged(tiny_bf16, triton_ops, cpu_only, monkeypatch):
    """The Triton fused_moe in the model, other ops on torch (interpreting all of them costs
    ~30 s): prefill runs the sorted path plus the torch shared MLP, decode the small kernels."""
    calls = []
    small_fn = importlib.import_module("deepserve.ops.triton.fused_moe_small").fused_moe_small
    monkeypatch.setattr(triton_ops.fused_moe, "fused_moe_small",
                        lambda *a, **kw: calls.append(kw.get("shared_w13") is not None) or small_fn(*a, **kw))
    monkeypatch.setattr(REFERENCE_OPS, "fused_moe", resolve("fused_moe", "triton")[1])   # the model's table
    logits, tokens = run_model(tiny_bf16, False, monkeypatch)
    assert calls and all(calls), "decode steps did not run the shared experts in the small kernels"
    want_logits, want_tokens = run_model(tiny_bf16, True, monkeypatch)
    # one rounding of routed + shared instead of two (and interpreted bf16 truncation)
    assert rel_err(logits, want_logits) < 2e-2, rel_err(logits, want_logits)
    assert tokens == want_tokens


# ---- GPU, DeepSeek-V2-Lite sizes -----------------------------------------------------------

def bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |v| (8 significant bits), for v in fp32."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0 ** -126))) - 7)


@pytest.mark.gpu
def test_small_path_shared_gpu_v2_lite(small):
    e, k, d, inter, s_inter = 64, 6, 2048, 1408, 2816
    fused = resolve("fused_moe", "triton")[1]
    for t in (1, 4):
        args, shared = shared_case(t, d, inter, s_inter, e, k, torch.bfloat16, seed=t, device="cuda")
        want = reference(*args, **shared)
        got = small.fused_moe_small(*args, **shared)
        assert rel_err(got, want) < 5e-3, (t, rel_err(got, want))
        assert rel_err(fused(*args, **shared), want) < 5e-3
        # against the kernel's own routed output plus the reference shared MLP: the only
        # differences are the single rounding (<= 1 ulp of the result, 1/2 of the routed
        # part) and the shared GEMVs' fp32 sum order flipping a bf16 rounding (1 ulp of shared)
        routed = small.fused_moe_small(*args).float()
        shared_out = llama_mlp(args[0], shared).float()
        two_step = (routed + shared_out).bfloat16().float()
        diff = (got.float() - two_step).abs()
        bound = 1.01 * (bf16_ulp(two_step) + bf16_ulp(routed) / 2 + 2 * bf16_ulp(shared_out))
        assert (diff <= bound).float().mean() > 0.999, (t, (diff / bound).max().item())
