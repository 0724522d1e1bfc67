"""A tiny random DeepSeek-V3-shaped checkpoint (MLA, group-limited MoE, an MTP layer) with the
real DeepSeek-R1 tokenizer and chat template, for running the deployment guides' commands on a
CPU with their sizes scaled down; and the guides' own text from ../shared/reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
R1_TOKENIZER = SHARED / "tokenizers" / "deepseek-r1"
NUM_LAYERS = 3  # dense layer 0, MoE layers 1-2; the MTP layer is model.layers.3


def build_tiny_r1(folder: Path) -> Path:
    """bf16 weights (as R1's BF16 releases), real R1 tokenizer; layers 0..2 plus MTP layer 3."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    from safetensors.torch import load_file

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    # save_pretrained writes the Hub's tensor names (one tensor per expert)
    transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tensors = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    last = f"model.layers.{NUM_LAYERS - 1}."
    for name, t in list(tensors.items()):   # the MTP block: a copy of a MoE layer's shapes
        if name.startswith(last):
            tensors[name.replace(last, f"model.layers.{NUM_LAYERS}.")] = \
                (torch.randn(t.shape, generator=gen) * 0.1).to(torch.bfloat16)
    h = cfg.hidden_size
    for part, shape in {"embed_tokens.weight": (cfg.vocab_size, h), "enorm.weight": (h,), "hnorm.weight": (h,),
                        "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
                        "shared_head.head.weight": (cfg.vocab_size, h)}.items():
        tensors[f"model.layers.{NUM_LAYERS}.{part}"] = (torch.randn(shape, generator=gen) * 0.1).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    config = cfg.to_dict()
    config.update(architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=1, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(R1_TOKENIZER / name, folder / name)
    return folder


def write_r1_config(folder: Path) -> Path:
    """DeepSeek-R1's own config.json (61 layers, 163840 positions, FP8 blocks) and an empty
    weights file (what `serve` checks for before it starts; nothing here loads it): the guides'
    commands parse and plan with their sizes as written."""
    from deepserve.config import PRESET_DIR

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(PRESET_DIR / "deepseek-r1.json", folder / "config.json")
    (folder / "model.safetensors").touch()
    return folder


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory) -> Path:
    if not R1_TOKENIZER.is_dir():
        pytest.skip(f"{R1_TOKENIZER} not found (CI clones the repo beside shared/)")
    return build_tiny_r1(tmp_path_factory.mktemp("guides") / "DeepSeek-R1")


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} not found (CI clones the repo beside shared/)")
    return REFERENCE


@pytest.fixture
def no_engine(monkeypatch):
    """`serve` and the offline commands fail the test if they get as far as starting an engine
    (binding the server's socket, or running `bench latency`): for checks made before any rank
    starts."""
    def started(*args, **kwargs):
        raise AssertionError("the engine was started")

    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    monkeypatch.setattr("deepserve.cli.serve.bind_listen", started)
    monkeypatch.setattr("deepserve.bench.offline.run_latency", started)
