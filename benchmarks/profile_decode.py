"""Where does one decode step's time go? (issue 4: v2-lite batch-1 decode at 28% of its
active-weight roofline while a dense 8B model reaches 80%.)

With the engine built as bench_engine.py builds it (CUDA graphs on, random weights), after
`--batch` requests with a 128-token prompt have prefilled, the script measures:

  1. steps    wall time per engine.step() over --steps decode steps, three ways:
                bare    no instrumentation, no syncs: the number that matters;
                host    timing wrappers, no syncs: where the host spends (or waits for) time;
                synced  wrappers with a device sync around each part, CUDA events around the
                        forward: schedule / host_inputs / to_device / forward / sample /
                        postprocess (output + detokenize) / other.
  2. graph    GPU time of the captured decode graph alone (CUDA events over 100 replays) vs
              the roofline: active weight bytes of one step / copy bandwidth of this run.
  3. kernels  torch.profiler over the forward run eagerly on the same decode inputs, and over
              graph replays: top kernels by total time (count, µs, %), kernel launches per
              step, kernel time summed, grouped into Triton / cuBLAS / torch / memcpy.
  4. timeline (GPU only) GPU busy vs idle over bare engine steps, with the largest idle gaps
              and the kernels around them: how much of the host work the GPU still waits for.
  5. summary  a short table; all numbers also go to --out as JSON.

With --async-scheduling the engine overlaps step n+1's host work with step n's GPU work; the
instrumented modes (host, synced) and the kernel tables would break that overlap or need the
synchronous path's inputs, so only the bare timing, the graph and the timeline run.

Each part runs in its own try block: a failure prints one line and the others go on.
On CPU (`--device cpu --tiny`, a smoke check) the CUDA-event and graph parts are skipped
and the breakdown is of CPU ops.

GPU:  python benchmarks/profile_decode.py --model deepseek-v2-lite --batch 1
      python benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1
      python benchmarks/profile_decode.py --model r1-distill-llama-8b --batch 1 --quantization compressed-tensors
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# bench_engine sits beside this file; the repo root makes deepserve importable uninstalled
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_engine import copy_bandwidth, random_prompts, release, weight_bytes
from kernel_table import aggregate, gpu_timeline, print_kernels, print_timeline, profile_records, triton_kernel_names

from deepserve import LLM, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 128
WARMUP_STEPS = 10
# engine arguments of bench_engine.py's cases (others get the llama8b ones)
ENGINE_ARGS = {
    "deepseek-v2-lite": {"max_model_len": 9000, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                         "gpu_memory_utilization": 0.85},
    "r1-distill-llama-8b": {"max_model_len": 2048, "max_num_seqs": 256, "gpu_memory_utilization": 0.85},
}
# --tiny: a couple of small layers of the preset's architecture (keys the models read)
TINY_MLA = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
            "n_routed_experts": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64,
            "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
            "vocab_size": 1000}
TINY_DENSE = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000}


def say(msg: str) -> None:
    print(msg, flush=True)


def build(args) -> LLM:
    kw = {"load_format": "dummy", "device": args.device, "seed": 0}
    if args.tiny:
        tiny = TINY_MLA if args.model.startswith("deepseek") else TINY_DENSE
        kw.update(hf_overrides=dict(tiny), dtype="float32" if args.device == "cpu" else "bfloat16",
                  max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=2048,
                  kv_cache_memory_bytes=64 << 20)
    else:
        kw.update(ENGINE_ARGS.get(args.model, ENGINE_ARGS["r1-distill-llama-8b"]), dtype="bfloat16")
    if args.quantization:
        kw["quantization"] = args.quantization
    return LLM(args.model, async_scheduling=args.async_scheduling, **kw)


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def stats_ms(values_s: list[float]) -> dict:
    ms = sorted(v * 1e3 for v in values_s)
    return {"mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))], "min_ms": ms[0], "n": len(ms)}


# ---------------------------------------------------------------------------- 1. step timing
class StepProbe:
    """Timing wrappers set as instance attributes over the engine's step parts (the engine
    calls them through self, so the wrappers are picked up); `remove` restores the originals."""

    PARTS = ("schedule", "host_inputs", "to_device", "forward", "sample", "postprocess")

    def __init__(self, engine, synced: bool, cuda: bool):
        self.engine, self.runner = engine, engine.runner
        self.synced, self.cuda = synced, cuda
        self.cur: dict[str, float] = defaultdict(float)
        self.events: list = []
        self.last_host = None
        self.decodes: list[int] = []
        r = self.runner
        self._orig_sampler = r.sampler
        engine.scheduler.schedule = self._wrap("schedule", engine.scheduler.schedule, after=self._note_batch)
        r.host_inputs = self._wrap("host_inputs", r.host_inputs, after=self._note_host)
        r.to_device = self._wrap("to_device", r.to_device)
        r.forward_logits = self._wrap("forward", r.forward_logits, gpu=True)
        r.sampler = self._wrap("sample", r.sampler)
        engine._postprocess = self._wrap("postprocess", engine._postprocess)

    def _note_batch(self, batch) -> None:
        if batch:
            self.decodes.append(getattr(batch, "num_decodes", -1))

    def _note_host(self, host) -> None:
        self.last_host = host

    def _wrap(self, key, fn, gpu: bool = False, after=None):
        def timed(*a, **k):
            if self.synced:
                sync(self.cuda)
            ev = None
            if gpu and self.synced and self.cuda:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if ev is not None:
                ev[1].record()
                self.events.append(ev)
            if self.synced:
                sync(self.cuda)
            self.cur[key] += time.perf_counter() - t0
            if after is not None:
                after(out)
            return out
        return timed

    def remove(self) -> None:
        del self.engine.scheduler.schedule, self.runner.host_inputs, self.runner.to_device
        del self.runner.forward_logits, self.engine._postprocess
        self.runner.sampler = self._orig_sampler


def time_steps(engine, steps: int, cuda: bool, mode: str) -> dict:
    """mode: bare | host | synced (see the module docstring)."""
    probe = StepProbe(engine, synced=mode == "synced", cuda=cuda) if mode != "bare" else None
    totals, parts = [], defaultdict(list)
    tokens = 0
    try:
        sync(cuda)
        t_start = time.perf_counter()
        for _ in range(steps):
            if probe:
                probe.cur.clear()
                if probe.synced:
                    sync(cuda)
            t0 = time.perf_counter()
            outs = engine.step()
            if probe and probe.synced:
                sync(cuda)
            dt = time.perf_counter() - t0
            totals.append(dt)
            tokens += len(outs)
            if probe:
                for k in StepProbe.PARTS:
                    parts[k].append(probe.cur.get(k, 0.0))
                parts["other"].append(dt - sum(probe.cur.values()))
        sync(cuda)
        elapsed = time.perf_counter() - t_start
    finally:
        if probe:
            probe.remove()
    res = {"mode": mode, "steps": steps, "outputs": tokens, "step": stats_ms(totals),
           "tok_per_s": tokens / elapsed, "elapsed_s": elapsed}
    if probe:
        res["parts_mean_ms"] = {k: 1e3 * statistics.fmean(v) for k, v in parts.items()}
        res["decode_steps_seen"] = sum(1 for d in probe.decodes if d > 0)
        if probe.events:
            res["forward_gpu_mean_ms"] = statistics.fmean(a.elapsed_time(b) for a, b in probe.events)
        res["last_host"] = probe.last_host
    return res


def print_steps(res: dict) -> None:
    s = res["step"]
    say(f"  [{res['mode']:6s}] step mean {s['mean_ms']:.3f} ms  median {s['median_ms']:.3f}  "
        f"p90 {s['p90_ms']:.3f}  -> {res['tok_per_s']:.1f} tok/s")
    if "parts_mean_ms" in res:
        p = res["parts_mean_ms"]
        say("           " + "  ".join(f"{k} {v:.3f}" for k, v in p.items())
            + (f"  | forward GPU (events) {res['forward_gpu_mean_ms']:.3f} ms" if "forward_gpu_mean_ms" in res else ""))


# ---------------------------------------------------------------------------- 2. graph replay
def graph_time(runner, batch: int, reps: int = 100) -> dict:
    g = runner.graphs
    if g is None or not g.enabled:
        raise RuntimeError("the runner has no CUDA graphs (enforce_eager, DP, or capture failed)")
    bs = next(s for s in g.sizes if s >= batch)
    graph = g.graphs[bs]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return {"graph_size": bs, "replays": reps, "replay_ms": a.elapsed_time(b) / reps}


# ---------------------------------------------------------------------------- 3. kernels
def eager_forward(runner, host: dict):
    """The forward forward_logits runs, without the graph: same decode inputs."""
    ids, pos, meta = runner.to_device(host)

    def run():
        with torch.inference_mode():
            hidden = runner.model(ids, pos, meta)
            return runner.model.compute_logits(hidden[meta.logits_indices])
    return run


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-v2-lite", help="preset name (default deepseek-v2-lite)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed per mode")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps under torch.profiler")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny config of the preset (smoke check)")
    ap.add_argument("--async-scheduling", action="store_true", help="engine with async scheduling (parts 1, 2, 4)")
    ap.add_argument("--quantization", default=None,
                    help="as the engine's flag, with dummy weights: e.g. compressed-tensors (W4A16, groups of 128), fp8")
    ap.add_argument("--out", default=None, help="JSON path (default results/profile_<model>_b<batch>.json)")
    args = ap.parse_args()
    if args.batch < 1 or args.steps < 1:
        raise ValueError(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; use --device cpu --tiny for a smoke check")
    stem = (f"profile_{args.model}{'_tiny' if args.tiny else ''}{'_' + args.quantization if args.quantization else ''}"
            f"_b{args.batch}{'_async' if args.async_scheduling else ''}")
    out_path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    report: dict = {"model": args.model, "batch": args.batch, "tiny": args.tiny, "date": datetime.date.today().isoformat(),
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "command": "python " + " ".join(sys.argv), "errors": {}}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2, default=str))

    def attempt(part: str, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report the part's failure and go on with the others
            report["errors"][part] = f"{type(exc).__name__}: {exc}"
            say(f"[{part}] failed: {type(exc).__name__}: {exc}")
            return None
        finally:
            save()  # after every part: a crash later (e.g. in the profiler) keeps what was measured

    bw = attempt("bandwidth", copy_bandwidth) if cuda else None  # before the engine takes the memory
    if cuda:
        torch.cuda.empty_cache()  # the copy's 4 GiB must not stay reserved while the KV pool is sized
    if bw:
        report["copy_bandwidth_Bps"] = bw
        say(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    llm = build(args)
    engine, runner = llm.engine, llm.engine.runner
    engine.block_manager.enable_prefix_caching = False
    report["engine"] = {"graphs": bool(runner.graphs is not None and runner.graphs.enabled),
                        "graph_sizes": getattr(runner.graphs, "sizes", None), "ops": str(runner.config.ops),
                        "startup": runner.timings}
    say(f"engine: {args.model} on {report['device']}, CUDA graphs {report['engine']['graphs']}, "
        f"startup {', '.join(f'{k} {v:.1f}s' for k, v in runner.timings.items())}")

    # prefill, then warm-up decode steps; enough tokens left for every timed pass
    vocab = runner.vocab_size
    need = WARMUP_STEPS + 3 * args.steps + 16
    params = SamplingParams(temperature=0, max_tokens=need, ignore_eos=True)
    rids = [engine.add_request(None, p, params) for p in random_prompts(args.batch, PROMPT_LEN, vocab)]
    while any(not engine.requests[r].seqs[0].output_token_ids for r in rids):
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()
    sync(cuda)

    say(f"\n== 1. decode step time, batch {args.batch}, {args.steps} steps per mode")
    host = None
    for mode in ("bare",) if args.async_scheduling else ("bare", "host", "synced"):
        res = attempt(f"steps_{mode}", lambda m=mode: time_steps(engine, args.steps, cuda, m))
        if res:
            host = res.pop("last_host", None) or host
            report[f"steps_{mode}"] = res
            print_steps(res)

    say("\n== 2. decode graph alone vs roofline")
    model = runner.model
    wb = attempt("weight_bytes", lambda: weight_bytes(model, active=True, batch=args.batch))
    report["active_weight_bytes"] = wb
    if wb and host:
        seq_len = max(host.seq_lens)
        kv = runner.bytes_per_block() / runner.block_size * seq_len * args.batch
        report["kv_bytes_read"] = kv
        say(f"  active weight bytes/step {wb / 1e9:.3f} GB (+ KV read ~{kv / 1e6:.1f} MB at {seq_len} tokens)")
    if not cuda:
        say("  (CPU: no CUDA graph or CUDA events, skipped)")
    else:
        g = attempt("graph", lambda: graph_time(runner, args.batch))
        if g:
            report["graph"] = g
            say(f"  graph (size {g['graph_size']}) replay {g['replay_ms']:.3f} ms GPU -> {args.batch / g['replay_ms'] * 1e3:.1f} tok/s")
            if wb and bw:
                g["roofline_ms"] = wb / bw * 1e3
                g["achieved_Bps"] = wb / (g["replay_ms"] / 1e3)
                say(f"  roofline {g['roofline_ms']:.3f} ms ({args.batch / g['roofline_ms'] * 1e3:.1f} tok/s); graph at "
                    f"{g['roofline_ms'] / g['replay_ms']:.1%} of it, {g['achieved_Bps'] / 1e12:.3f} TB/s effective")

    if cuda:
        say(f"\n== 4. GPU timeline over {args.profile_steps} bare steps")
        tl = attempt("timeline", lambda: gpu_timeline(engine.step, args.profile_steps))
        if tl:
            report["timeline"] = tl
            print_timeline(tl)

    say(f"\n== 3. kernel breakdown ({args.profile_steps} steps{'' if cuda else ', CPU ops by self time'})")
    names = triton_kernel_names()
    report["triton_kernel_names"] = sorted(names)
    if args.async_scheduling:
        say("  (async scheduling: run without --async-scheduling for the kernel tables)")
    elif host is None:
        say("  no decode inputs were captured (step timing failed): skipped")
    else:
        def eager_part():
            run = eager_forward(runner, host)
            for _ in range(3):
                run()
            sync(cuda)
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                run()
            sync(cuda)
            wall = (time.perf_counter() - t0) / args.profile_steps
            agg = aggregate(profile_records(run, args.profile_steps, cuda), args.profile_steps, names, args.top)
            agg["eager_forward_wall_ms"] = wall * 1e3
            say(f"  eager forward wall {wall * 1e3:.3f} ms (synced)")
            print_kernels("eager forward", agg)
            return agg
        report["kernels_eager"] = attempt("kernels_eager", eager_part)
        if cuda and report["engine"]["graphs"]:
            def graph_part():
                bs = next(s for s in runner.graphs.sizes if s >= args.batch)
                graph = runner.graphs.graphs[bs]
                agg = aggregate(profile_records(graph.replay, args.profile_steps, cuda), args.profile_steps,
                                names, args.top)
                if agg["launches_per_step"] == 0:
                    say("  (the profiler saw no kernels inside graph replays)")
                print_kernels("graph replay", agg)
                return agg
            report["kernels_graph"] = attempt("kernels_graph", graph_part)

    for r in rids:
        engine.abort_request(r)
    summary(report, args.batch)
    save()
    say(f"\nwrote {out_path}")
    if cuda:
        release(llm)
    return 0


def summary(report: dict, batch: int) -> None:
    rows = []
    bare, synced = report.get("steps_bare"), report.get("steps_synced")
    if bare:
        rows.append(("step wall, unsynced (what matters)", bare["step"]["mean_ms"], bare["tok_per_s"]))
    if synced:
        p = synced["parts_mean_ms"]
        rows.append(("synced step wall", synced["step"]["mean_ms"], None))
        for k in ("schedule", "host_inputs", "to_device"):
            rows.append((f"  host: {k}", p.get(k, 0.0), None))
        rows.append(("  forward (wall, synced)", p.get("forward", 0.0), None))
        if "forward_gpu_mean_ms" in synced:
            rows.append(("  forward GPU (CUDA events)", synced["forward_gpu_mean_ms"], None))
        rows.append(("  sample", p.get("sample", 0.0), None))
        rows.append(("  postprocess + detokenize", p.get("postprocess", 0.0), None))
        rows.append(("  other (engine.step rest)", p.get("other", 0.0), None))
    g = report.get("graph")
    if g:
        rows.append(("graph replay GPU alone", g["replay_ms"], batch / g["replay_ms"] * 1e3))
        if "roofline_ms" in g:
            rows.append(("roofline (active bytes / copy bw)", g["roofline_ms"], batch / g["roofline_ms"] * 1e3))
    tl = report.get("timeline")
    if tl and tl.get("records"):
        rows.append(("bare step: GPU busy (profiled)", tl["busy_us_per_step"] / 1e3, None))
        rows.append(("bare step: GPU idle (profiled)", tl["idle_us_per_step"] / 1e3, None))
    kg = report.get("kernels_graph")
    if kg:
        rows.append((f"graph kernels summed ({kg['launches_per_step']:.0f} launches)", kg["kernel_us_per_step"] / 1e3, None))
        if g:
            rows.append(("graph gaps (replay - kernel sum)", g["replay_ms"] - kg["kernel_us_per_step"] / 1e3, None))
    ke = report.get("kernels_eager")
    if ke:
        rows.append((f"eager forward wall ({ke['launches_per_step']:.0f} launches)", ke["eager_forward_wall_ms"], None))
        rows.append(("eager kernels summed", ke["kernel_us_per_step"] / 1e3, None))
    say(f"\n== summary: {report['model']}{' (tiny)' if report['tiny'] else ''} batch {batch} on {report['device']}")
    say(f"| {'what':<44} | {'ms':>9} | {'tok/s':>9} |\n|{'-' * 46}|{'-' * 11}|{'-' * 11}|")
    for name, ms, tps in rows:
        say(f"| {name:<44} | {ms:>9.3f} | {'' if tps is None else f'{tps:.1f}':>9} |")
    if report["errors"]:
        say("failed parts: " + ", ".join(report["errors"]))
    report["summary"] = [{"what": n, "ms": ms, "tok_per_s": t} for n, ms, t in rows]


if __name__ == "__main__":
    sys.exit(main())
