"""A random bf16 checkpoint in the Hugging Face layout, so that two servers (deepserve and a peer)
serve the same weights: dummy weights are drawn differently by each engine, which changes a
MoE model's routing and so its speed.

    python benchmarks/random_checkpoint.py FOLDER [--device cuda] [--shard-gb 5]

FOLDER holds the config.json (Llama, Qwen2, DeepSeek V2/V3 architectures); the weights are
written beside it as model-0000N-of-0000M.safetensors plus model.safetensors.index.json, with
the tensor names and shapes the Hub checkpoints use (Llama's `attention_bias` and `mlp_bias`
biases included). Matrices are N(0, 0.02^2), norm weights 1, biases and DeepSeek-V3's routing
correction bias 0. MTP layers are not written. The index records a hash of the config.json it
was written for (`matches`), so a folder whose config changed since is written again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for the config's architecture."""
    d, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    arch = cfg.get("architectures", [""])[0]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)

    mlp_bias = bool(cfg.get("mlp_bias", False))

    def mlp(prefix: str, inter: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inter, d)
        shapes[f"{prefix}.up_proj.weight"] = (inter, d)
        shapes[f"{prefix}.down_proj.weight"] = (d, inter)
        if mlp_bias:
            shapes.update({f"{prefix}.gate_proj.bias": (inter,), f"{prefix}.up_proj.bias": (inter,),
                           f"{prefix}.down_proj.bias": (d,)})

    if arch.startswith("Deepseek") and (cfg.get("attention_bias") or mlp_bias):
        raise ValueError(f"{arch}: attention_bias / mlp_bias checkpoints are not written here")

    for i in range(n_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
        a = f"{p}.self_attn"
        if arch.startswith("Deepseek"):
            h, nope, rope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
            vd, kv_lora, q_lora = cfg["v_head_dim"], cfg["kv_lora_rank"], cfg.get("q_lora_rank")
            if q_lora:
                shapes[f"{a}.q_a_proj.weight"] = (q_lora, d)
                shapes[f"{a}.q_a_layernorm.weight"] = (q_lora,)
                shapes[f"{a}.q_b_proj.weight"] = (h * (nope + rope), q_lora)
            else:
                shapes[f"{a}.q_proj.weight"] = (h * (nope + rope), d)
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, d)
            shapes[f"{a}.kv_a_layernorm.weight"] = (kv_lora,)
            shapes[f"{a}.kv_b_proj.weight"] = (h * (nope + vd), kv_lora)
            shapes[f"{a}.o_proj.weight"] = (d, h * vd)
            moe = (cfg.get("n_routed_experts") and i >= cfg.get("first_k_dense_replace", 0)
                   and i % cfg.get("moe_layer_freq", 1) == 0)
            if not moe:
                mlp(f"{p}.mlp", cfg["intermediate_size"])
                continue
            e, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            shapes[f"{p}.mlp.gate.weight"] = (e, d)
            if cfg.get("topk_method") == "noaux_tc":
                shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (e,)
            for j in range(e):
                mlp(f"{p}.mlp.experts.{j}", inter)
            if cfg.get("n_shared_experts"):
                mlp(f"{p}.mlp.shared_experts", inter * cfg["n_shared_experts"])
        else:  # Llama / Qwen2
            h = cfg["num_attention_heads"]
            kvh = cfg.get("num_key_value_heads", h)
            hd = cfg.get("head_dim") or d // h
            shapes[f"{a}.q_proj.weight"] = (h * hd, d)
            shapes[f"{a}.k_proj.weight"] = (kvh * hd, d)
            shapes[f"{a}.v_proj.weight"] = (kvh * hd, d)
            shapes[f"{a}.o_proj.weight"] = (d, h * hd)
            # Qwen2: q / k / v biases always; Llama's attention_bias: q / k / v and o
            biased = (("q", h * hd), ("k", kvh * hd), ("v", kvh * hd)) if arch.startswith("Qwen2") else (
                (("q", h * hd), ("k", kvh * hd), ("v", kvh * hd), ("o", d)) if cfg.get("attention_bias") else ())
            for n, rows in biased:
                shapes[f"{a}.{n}_proj.bias"] = (rows,)
            mlp(f"{p}.mlp", cfg["intermediate_size"])
    return shapes


def fill(name: str, shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()


def config_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def matches(folder: Path) -> bool:
    """Whether the folder holds a random checkpoint written for its current config.json."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return False
    meta = json.loads(index.read_text()).get("metadata", {})
    return meta.get("random_config_sha256") == config_hash(folder)


def write(folder: Path, device: str = "cpu", shard_bytes: float = 5e9, seed: int = 0) -> int:
    """Write the shards and the index; returns the number of bytes written."""
    cfg = json.loads((folder / "config.json").read_text())
    shapes = tensor_shapes(cfg)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: fill(n, shapes[n], gen, device) for n in names}
        tmp = folder / (fname + ".partial")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.rename(folder / fname)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total, "random_config_sha256": config_hash(folder)},
             "weight_map": weight_map}
    tmp = folder / "model.safetensors.index.json.partial"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.rename(folder / "model.safetensors.index.json")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a folder holding config.json")
    ap.add_argument("--device", default="cpu", help="where the random values are drawn (cuda is faster)")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = write(args.folder, args.device, args.shard_gb * 1e9, args.seed)
    print(f"wrote {n / 1e9:.2f} GB of random bf16 weights to {args.folder}")


if __name__ == "__main__":
    main()
