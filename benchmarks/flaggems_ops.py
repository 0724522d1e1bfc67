"""Which aten ops FlagGems takes in deepserve's steps (issue 24 item 3).

`--ops flaggems` runs deepserve's Triton kernels for its ops with FlagGems registered under the
aten ops beneath them (flag_gems.enable()). This script builds the engine with random weights, runs --batch prompts
of --prompt-len tokens for --steps tokens eagerly (so every step dispatches its aten ops)
under torch.profiler (CPU and CUDA activity), and reports:

  registered  FlagGems' own registration list (flag_gems.all_registered_ops());
  run         every aten op the steps called that launched kernels, with its calls and its
              kernels' time by kind as deepserve/ops/profile.py attributes it (a kernel counts
              for the innermost aten op it was launched from); an op FlagGems took launches
              Triton kernels;
  summary     ops run that FlagGems took, ops registered but run on other kernels, ops it does
              not register (they stay on cuBLAS / torch's CUDA kernels), and the kernel time
              by kind.

A JSON with every number goes to --out.

GPU:  python3 benchmarks/flaggems_ops.py --model r1-distill-llama-8b --hf-overrides '{"num_hidden_layers": 2}'
CPU check (no FlagGems, no kernels: the aten ops the torch path calls):
      python benchmarks/flaggems_ops.py --ops torch --device cpu --hf-overrides '{"num_hidden_layers": 1,
          "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 1000}'
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # deepserve importable uninstalled
from deepserve import LLM, SamplingParams  # noqa: E402
from deepserve.ops.profile import KINDS, kernel_kind, live_triton_kernel_names, triton_kernel_names  # noqa: E402


def registered_ops(backend: str) -> list[str]:
    if backend != "flaggems":
        return []
    import flag_gems
    return sorted(str(op) for op in flag_gems.all_registered_ops())


def aten_parent(e):
    """The innermost aten op at or above a profiler event (None outside any)."""
    while e is not None and not e.name.startswith("aten::"):
        e = e.cpu_parent
    return e


def op_table(events, triton_names: set[str]) -> dict[str, dict]:
    """aten op -> calls and its launched kernels' µs by kind (and by kernel name). Kernels the
    profiler links to no CPU event (Triton's launches from Python: deepserve's own kernels go
    through the driver API beneath no aten op) are counted under "(outside aten)" from the GPU's
    own kernel events, so the kinds' totals hold every kernel that ran."""
    ops: dict[str, dict] = defaultdict(lambda: {"calls": 0, "us": dict.fromkeys(KINDS, 0.0), "kernels": {}})
    on_gpu: dict[str, float] = defaultdict(float)      # kernel name -> µs, every kernel event
    linked: dict[str, float] = defaultdict(float)      # the part reached through a CPU event
    for e in events:
        if str(e.device_type).endswith("CUDA"):
            on_gpu[e.name] += e.duration
            continue
        if e.name.startswith("aten::"):
            ops[e.name[6:]]["calls"] += 1
        owner = aten_parent(e)
        for k in e.kernels:
            linked[k.name] += k.duration
            add_kernel(ops[owner.name[6:] if owner is not None else "(outside aten)"], k.name, k.duration, triton_names)
    for name, us in on_gpu.items():
        if us - linked[name] > 1e-3:
            add_kernel(ops["(outside aten)"], name, us - linked[name], triton_names)
    return dict(ops)


def add_kernel(entry: dict, name: str, us: float, triton_names: set[str]) -> None:
    entry["us"][kernel_kind(name, triton_names)] += us
    entry["kernels"][name] = entry["kernels"].get(name, 0.0) + us


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-llama-8b")
    ap.add_argument("--ops", default="flaggems", choices=["flaggems", "torch", "triton", "triton-all"])
    ap.add_argument("--hf-overrides", default='{"num_hidden_layers": 2}')
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="tokens generated per prompt (a prefill, then decodes)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/flaggems_ops_<model>_<ops>.json)")
    args = ap.parse_args()
    overrides = json.loads(args.hf_overrides or "{}")
    # a token budget of one step's prompts: few step sizes at start, each of which has FlagGems
    # autotune its GEMM cold
    max_len = args.prompt_len + args.steps + 8
    llm = LLM(args.model, ops=args.ops, device=args.device, load_format="dummy", enforce_eager=True, seed=0,
              hf_overrides=overrides, max_model_len=max_len, max_num_seqs=args.batch,
              max_num_batched_tokens=max(max_len, args.batch * args.prompt_len))
    engine = llm.engine
    cuda = engine.platform.device().type == "cuda"
    registered = registered_ops(args.ops)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    for _ in range(args.batch):
        ids = torch.randint(0, engine.runner.vocab_size, (args.prompt_len,), generator=g).tolist()
        engine.add_request(None, {"prompt_token_ids": ids}, params)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        while engine.has_unfinished_requests():
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    names = triton_kernel_names() | live_triton_kernel_names()
    ops = op_table(prof.events(), names)
    engine.shutdown()

    base = {r.split(".")[0] for r in registered}
    launched = {op: v for op, v in ops.items() if sum(v["us"].values()) > 0}
    taken = sorted(op for op, v in launched.items() if v["us"]["triton"] > 0)
    registered_not_triton = sorted(op for op in launched if op in base and op not in taken)
    not_registered = sorted(op for op in launched if op not in base and op not in taken)
    total = dict.fromkeys(KINDS, 0.0)
    for v in launched.values():
        for k, us in v["us"].items():
            total[k] += us
    all_us = sum(total.values())
    print(f"{args.model} --ops {args.ops} on {'cuda' if cuda else 'cpu'}: FlagGems registers {len(registered)} aten "
          f"overloads ({len(base)} ops); the steps called {len(ops)} aten ops, {len(launched)} of them launching kernels")
    print(f"  taken by FlagGems (Triton kernels): {', '.join(taken) or '-'}")
    print(f"  registered, but ran other kernels:  {', '.join(registered_not_triton) or '-'}")
    print(f"  not registered by FlagGems:         {', '.join(not_registered) or '-'}")
    if all_us:
        print("  kernel time by kind: " + ", ".join(f"{k} {100 * us / all_us:.1f}%" for k, us in total.items()))
    print(f"  {'aten op':<34} {'calls':>6} " + " ".join(f"{k + ' µs':>11}" for k in KINDS))
    rows = sorted(ops.items(), key=lambda kv: (-sum(kv[1]["us"].values()), -kv[1]["calls"]))
    for op, v in rows[:40]:
        print(f"  {op[:34]:<34} {v['calls']:>6} " + " ".join(f"{v['us'][k]:>11.1f}" for k in KINDS))
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"flaggems_ops_{args.model.replace('/', '_')}_{args.ops}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "hf_overrides": overrides, "ops": args.ops,
                               "device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch,
                               "prompt_len": args.prompt_len, "steps": args.steps, "registered": registered,
                               "taken": taken, "registered_not_triton": registered_not_triton,
                               "not_registered": not_registered, "kernel_us_by_kind": total, "ops": ops}, indent=1))
    print(f"  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
