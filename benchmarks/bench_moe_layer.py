"""Time one DeepSeek-R1 MoE layer (gate + routing + routed experts + shared expert) vs its roofline.

    python benchmarks/bench_moe_layer.py [--dtypes bf16,fp8] [--batches 1,32,128] [--out-dir DIR]
    python benchmarks/bench_moe_layer.py --device cpu --tiny        # smoke check, no GPU

On an 80 GB H100 both dtypes in one process ran out of memory building the fp8 layers
(2026-11-23, before a gc.collect() was added between them, which has not been tried since):
there, run `--dtypes bf16` and `--dtypes fp8` as two processes.

The model is the deepseek-r1 preset cut to 3 dense + 2 MoE layers (hf_overrides
num_hidden_layers=5, first_k_dense_replace=3); its two MoE layers are built directly as
`DeepseekMoE` modules with random ("dummy") weights, and a step runs both, one after the
other, so no layer's weights are still in L2 when it runs: the time per layer is half a step.
fp8 quantizes the routed experts to e4m3 with 128x128 block scales (deepserve.quant.fp8,
DeepSeek's recipe) passed as w13_scale/w2_scale to the table's fused_moe; the gate (fp32) and the
shared expert stay as they are in the checkpoint's layout here (bf16).

Roofline: the bytes a step must read (gate weight, the weights and scales of every expert
the batch's routing touches, the shared expert) over the copy bandwidth measured in the same
run (a device-to-device copy, bytes read + written). At batch 1 fp8 that is 8 routed experts
x 44 MB + 88 MB bf16 shared + 7 MB gate ~ 450 MB per layer. Each (dtype, batch) writes one
JSON file: value = ms per layer, roofline_value = roofline ms, ratio = value / roofline_value
(1.0 = at the bandwidth limit), plus fraction_of_roofline = its inverse and the byte count.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepserve.ops import OpTable, bind  # noqa: E402
from deepserve.config import load_hf_config  # noqa: E402
from deepserve.distributed.parallel_state import single_process  # noqa: E402
from deepserve.models.deepseek_v3 import DeepseekMoE, is_moe_layer  # noqa: E402
from deepserve.quant.fp8 import quant_fp8_block  # noqa: E402

CUT = {"num_hidden_layers": 5, "first_k_dense_replace": 3}
# --tiny: the same structure (sigmoid + noaux_tc grouped routing, 1 shared expert) at toy size
TINY = {"hidden_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 16,
        "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def graph_or_eager_ms(fn: Callable[[], object], device: torch.device, iters: int) -> tuple[float, str]:
    """Time as one CUDA-graph replay where fn can be captured (as the engine's decode runs),
    else eagerly (the torch ops' fused_moe reads expert counts on the host: not capturable)."""
    if device.type != "cuda":
        return time_ms(fn, device, iters), "eager"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        print(f"  (not capturable, timing eagerly: {str(err).splitlines()[0]})")
        return time_ms(fn, device, iters), "eager"
    return time_ms(graph.replay, device, iters), "cuda_graph"


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a copy of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, iters=10)  # noqa: F821 (deleted after the lambda runs)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def build_layers(cfg, dtype_tag: str, device: torch.device, seed: int, table: OpTable) -> list[dict]:
    """The cut model's MoE layers with random weights, running `table`'s ops; fp8 adds e4m3
    experts + block scales."""
    torch.manual_seed(seed)
    d, inter = cfg.hidden_size, cfg.moe_intermediate_size
    layers = []
    for idx in range(cfg.num_hidden_layers):
        if not is_moe_layer(cfg, idx):
            continue
        with torch.device(device):
            moe = DeepseekMoE(cfg, torch.bfloat16, single_process())
        bind(moe, table)
        moe.gate.weight.data.normal_(0, d ** -0.5)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.data.normal_(0, 0.01)
        for p in moe.shared_experts.parameters():
            p.data.normal_(0, d ** -0.5)
        layer = {"moe": moe, "w13": moe.experts.w13_weight.data, "w2": moe.experts.w2_weight.data,
                 "scales": {}}
        layer["w13"].normal_(0, d ** -0.5)
        layer["w2"].normal_(0, inter ** -0.5)
        if dtype_tag == "fp8":
            q13, s13 = zip(*(quant_fp8_block(w) for w in layer["w13"]))
            q2, s2 = zip(*(quant_fp8_block(w) for w in layer["w2"]))
            # drop the bf16 experts: only the fp8 copies may take device memory and bandwidth
            moe.experts.w13_weight = None
            moe.experts.w2_weight = None
            layer["w13"], layer["w2"] = torch.stack(q13), torch.stack(q2)
            layer["scales"] = {"w13_scale": torch.stack(s13), "w2_scale": torch.stack(s2)}
        layers.append(layer)
    return layers


def moe_forward(layer: dict, x: torch.Tensor) -> torch.Tensor:
    """DeepseekMoE.forward with the experts' scales passed through to the table's fused_moe."""
    moe = layer["moe"]
    weights, ids = moe.ops.moe_route(moe.gate(x), moe.gate.e_score_correction_bias, **moe.route)
    out = moe.ops.fused_moe(x, layer["w13"], layer["w2"], weights, ids, **layer["scales"])
    return out + moe.shared_experts(x)


def step_bytes(layer: dict, x: torch.Tensor) -> int:
    """Weight bytes one forward of `layer` over x must read: gate, touched experts, shared."""
    moe = layer["moe"]
    _, ids = moe.ops.moe_route(moe.gate(x), moe.gate.e_score_correction_bias, **moe.route)
    hit = torch.unique(ids).tolist()
    per_expert = sum(t[0].numel() * t.element_size() for t in
                     [layer["w13"], layer["w2"], *layer["scales"].values()])
    gate = sum(p.numel() * p.element_size() for p in moe.gate.parameters())
    shared = sum(p.numel() * p.element_size() for p in moe.shared_experts.parameters())
    return gate + len(hit) * per_expert + shared


def run_case(cfg, dtype_tag: str, batches: list[int], device: torch.device, bandwidth: float,
             args: argparse.Namespace, device_name: str, command: str) -> list[dict]:
    layers = build_layers(cfg, dtype_tag, device, args.seed, args.table)
    results = []
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(args.seed + batch)
        x = torch.randn(batch, cfg.hidden_size, generator=g, device=device).to(torch.bfloat16)
        with torch.inference_mode():
            step_ms, mode = graph_or_eager_ms(lambda: [moe_forward(layer, x) for layer in layers],  # noqa: F821
                                              device, args.iters)
            nbytes = sum(step_bytes(layer, x) for layer in layers) / len(layers)
        layer_ms = step_ms / len(layers)
        roofline_ms = nbytes / bandwidth * 1e3
        res = {"name": f"moe_layer_r1{'_tiny' if args.tiny else ''}_{dtype_tag}_b{batch}",
               "device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": command, "value": round(layer_ms, 5), "unit": "ms/layer",
               "roofline_value": round(roofline_ms, 5), "ratio": round(layer_ms / roofline_ms, 4),
               "fraction_of_roofline": round(roofline_ms / layer_ms, 4),
               "active_weight_bytes": int(nbytes), "copy_bandwidth_gbs": round(bandwidth / 1e9, 2),
               "ops_backend": args.table.name, "timing": mode, "moe_layers_per_step": len(layers)}
        print(f"{res['name']:<28} {layer_ms:9.4f} ms/layer  roofline {roofline_ms:9.4f} ms "
              f"({nbytes / 1e6:8.1f} MB)  {res['fraction_of_roofline']:.1%} of roofline  [{mode}]")
        results.append(res)
    del layers
    gc.collect()              # the timed closures and CUDA graphs hold the layers in cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="toy hidden/expert sizes (a CPU smoke check)")
    p.add_argument("--dtypes", default="bf16,fp8", help="comma list of bf16, fp8")
    p.add_argument("--batches", default="1,32,128", help="comma list of token counts")
    p.add_argument("--ops", default=None, help="ops backend (default: triton on cuda, torch on cpu)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    for tag in args.dtypes.split(","):
        if tag not in ("bf16", "fp8"):
            raise ValueError(f"--dtypes entries must be bf16 or fp8, got {tag!r}")
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if any(b < 1 for b in args.batch_list):
        raise ValueError(f"--batches must all be >= 1, got {args.batches!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available (use --device cpu --tiny)")
    args.table = OpTable(args.ops or ("triton" if device.type == "cuda" else "torch"))
    cfg = load_hf_config("deepseek-r1", {**CUT, **(TINY if args.tiny else {})})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = "python benchmarks/bench_moe_layer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bandwidth = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20))
    print(f"{device_name}: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"ops backend {args.table.name}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for tag in args.dtypes.split(","):
        for res in run_case(cfg, tag, args.batch_list, device, bandwidth, args, device_name, command):
            (out_dir / f"{res['name']}.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
