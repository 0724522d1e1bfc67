"""FP8 block scales stored as F8_E8M0 (DeepSeek-V3.1's `scale_fmt: "ue8m0"` written in its own
dtype: one exponent byte e, the value 2^(e-127)): `deepserve convert fp8-to-bf16` dequantizes
them exactly, and the engine serves such a folder as the same powers of two stored in fp32."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepserve import LLM
from deepserve.quant import convert_fp8_to_bf16, quantize_checkpoint
from tests.models.hf_reference import save_tiny_mla_moe
from tests.quant.test_int4_loading import TOKENIZER

PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 100, 11, 54, 9], [120, 1, 77, 77, 13, 40, 6, 93]]

E8M0 = torch.float8_e8m0fnu


def _e8m0_value(bits: torch.Tensor) -> torch.Tensor:
    """The format's rule, from the raw byte: 2^(e-127) (fp64 holds every one exactly)."""
    return torch.pow(2.0, bits.view(torch.uint8).to(torch.float64) - 127)


def _with_scales(src, dst, as_e8m0: bool):
    """`src` (fp8, fp32 scales) with every scale rounded up to a power of two, stored as fp32 or E8M0."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            dst.joinpath(f.name).write_bytes(f.read_bytes())
    for shard in src.glob("*.safetensors"):
        ts = load_file(str(shard))
        for name, t in ts.items():
            if name.endswith("_scale_inv"):
                p2 = torch.exp2(torch.ceil(torch.log2(t)))
                ts[name] = p2.to(E8M0) if as_e8m0 else p2
        save_file(ts, str(dst / shard.name), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("e8m0")
    save_tiny_mla_moe(root / "ref")
    quantize_checkpoint(root / "ref", root / "fp8", "fp8-block", progress=False)
    return _with_scales(root / "fp8", root / "f32", False), _with_scales(root / "fp8", root / "e8m0", True)


def test_convert_dequantizes_e8m0_scales_exactly(folders, tmp_path):
    _, e8 = folders
    convert_fp8_to_bf16(e8, tmp_path / "bf16", progress=False)
    src = {n: t for f in e8.glob("*.safetensors") for n, t in load_file(str(f)).items()}
    out = {n: t for f in (tmp_path / "bf16").glob("*.safetensors") for n, t in load_file(str(f)).items()}
    assert not any(n.endswith("_scale_inv") for n in out)
    checked = 0
    for name, q in src.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        s = _e8m0_value(src[name + "_scale_inv"])                                    # [ceil(N/128), ceil(K/128)]
        full = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
        want = (q.to(torch.float64) * full).to(torch.bfloat16)     # exact product, one rounding
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], want), name
        checked += 1
    assert checked >= 8


def test_engine_serves_e8m0_scales_as_their_fp32_values(folders):
    f32, e8 = folders
    llm = LLM(model=str(e8), dtype="float32", tokenizer=TOKENIZER)
    model = llm.engine.runner.model.model
    assert model.layers[1].mlp.experts.w13_weight.dtype == torch.float8_e4m3fn
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(f32), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()


def test_e8m0_nan_scale_is_refused_naming_the_tensor(folders, tmp_path):
    _, e8 = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in e8.iterdir():
        bad.joinpath(f.name).write_bytes(f.read_bytes())
    shard = next(bad.glob("*.safetensors"))
    ts = load_file(str(shard))
    name = next(n for n in sorted(ts) if n.endswith("_scale_inv"))
    ts[name] = torch.full(ts[name].shape, 255, dtype=torch.uint8).view(E8M0)         # 0xFF: E8M0's NaN
    save_file(ts, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^tensor {name}: scale_inv has non-finite or non-positive values \(nan at \[0, 0\]\)$"):
        convert_fp8_to_bf16(bad, tmp_path / "out", progress=False)
