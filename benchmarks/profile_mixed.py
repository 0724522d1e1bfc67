"""Where the served throughput goes (issue 25): the three kinds of engine step a server runs
under load, timed one by one on the same engine, and the kernels of the mixed one.

    prefill   a step of prompt chunks only (--prefill-prompts prompts of --prompt-len tokens
              waiting, nothing running): tokens/s and MFU against the bf16 matmul peak
              measured in the same run (2 FLOPs per parameter per token)
    decode    a decode-only step of --batch running sequences (the CUDA graph path)
    mixed     the same --batch decodes plus one new prompt's prefill chunk in one step (what a
              server runs each time a request arrives while others decode)
    piecewise mixed steps of --batch decodes plus a prompt of each of --mixed-lens tokens, with
              and without piecewise CUDA graphs (engine/piecewise_graphs.py): the engine runs
              cudagraph_mode FULL_AND_PIECEWISE up to --piecewise-max-tokens; its pieces (which
              copy what they hand on into static buffers), a second capture whose pieces hand
              on their own outputs (copy_outputs=False) and none, alternating step by step

Each is the median of --repeats steps, wall time of engine.step() with a device sync. Then
torch.profiler over --profile mixed steps: the top kernels by GPU time, grouped (GEMM, attention,
MoE, other Triton, torch elementwise), GPU-busy time against the steps' wall time, and the
host events that wait for the device (nonzero, .item(), stream syncs; SYNC_EVENTS).

GPU:  python benchmarks/profile_mixed.py --model r1-distill-llama-8b --batch 64
CPU:  python benchmarks/profile_mixed.py --model ../shared/models/stories260k --load-format auto \
          --device cpu --batch 4 --prompt-len 64 --prefill-prompts 4 --repeats 2 --profile 1 \
          --mixed-lens 8,28 --piecewise-max-tokens 32
(the CPU captures no graphs: there the "piecewise" steps run the pieces as plain calls, which
checks the script, not the speed)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from bench_engine import device_name, matmul_peak, random_prompts, synchronize

from deepserve import LLM, SamplingParams


def timed_step(llm: LLM) -> float:
    """Seconds of one engine step."""
    synchronize()
    t0 = time.perf_counter()
    llm.engine.step()
    synchronize()
    return time.perf_counter() - t0


def drain(llm: LLM) -> None:
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def group(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "gemv", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul")):
        return "GEMM"
    if any(k in n for k in ("attn", "attention", "mla", "flash", "paged", "decode_kernel", "prefill")):
        return "attention"
    if "moe" in n or "expert" in n:
        return "MoE"
    if "triton" in n or n.startswith("_"):
        return "other Triton"
    if "memcpy" in n or "memset" in n:
        return "memcpy"
    return "torch elementwise / other"


def piecewise_vs_eager(llm: LLM, batch: int, prompt_lens: list[int], repeats: int, vocab: int) -> dict:
    """Mixed steps (the running decodes + one new prompt of each length) eagerly, with the
    runner's piecewise graphs (outputs copied into static buffers) and with a second capture
    whose pieces hand on their own outputs (copy_outputs=False), alternating step by step;
    each the median of `repeats`."""
    from deepserve.engine.piecewise_graphs import PiecewiseGraphs, capture_for
    eng = llm.engine
    runner = eng.runner
    limit = eng.config.piecewise_max_tokens
    copied = runner.piecewise
    if copied is None and torch.cuda.is_available():
        raise SystemExit("no piecewise graphs were captured (see the log): nothing to compare")
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        aliased = capture_for(runner.model, runner.ops, limit, runner.device, copy_outputs=False)
        if aliased is None:
            raise SystemExit("the copy_outputs=False capture failed (see the log)")
        kind = "captured"
    else:
        copied = PiecewiseGraphs(runner.model, limit, runner.device)
        aliased = PiecewiseGraphs(runner.model, limit, runner.device, copy_outputs=False)
        kind = "uncaptured, CPU"
    alias_capture_s = time.perf_counter() - t0
    variants = {"eager": None, "piecewise": copied, "piecewise_alias": aliased}
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows = []
    for length in prompt_lens:
        times: dict = {mode: [] for mode in variants}
        decodes = []   # running sequences beside each timed prompt (the batch must not shrink)
        for r in range(repeats):
            for mode, pieces in variants.items():
                runner.piecewise = pieces
                decodes.append(len(eng.scheduler.running))
                eng.add_request(None, random_prompts(1, length, vocab, seed=300 + r)[0], one)
                times[mode].append(timed_step(llm))
                eng.step()
        tokens = batch + length
        if tokens > limit:
            print(f"(a step of {tokens} tokens is over the piecewise limit {limit}: every run eager)")
        if min(decodes) < batch:
            print(f"(warning: only {min(decodes)} of {batch} sequences were still decoding)")
        rows.append({"prompt_len": length, "tokens": tokens, "runs": times, "decodes": decodes,
                     **{f"{mode}_s": statistics.median(t) for mode, t in times.items()}})
    runner.piecewise = copied if kind == "captured" else None
    return {"kind": kind, "max_tokens": limit, "sizes": len(aliased.sizes),
            "capture_s": runner.timings.get("cuda_graph_s", 0.0), "alias_capture_s": alias_capture_s,
            "rows": rows}


# host-side events that wait for the device (or come with such a wait): counted in the profile
SYNC_EVENTS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::masked_select", "aten::_unique2",
               "aten::unique_consecutive", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "cudaMemcpy")


def profile_steps(llm: LLM, count: int, length: int, vocab: int, top: int) -> dict:
    """torch.profiler over `count` mixed steps (the running decodes + one prompt of `length`
    tokens) and the step after each: kernel time by kernel and by group, against the mixed
    steps' wall time (GPU-busy far below wall: the host bounds the step)."""
    from torch.profiler import ProfilerActivity, profile
    eng = llm.engine
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        wall = 0.0
        for r in range(count):
            eng.add_request(None, random_prompts(1, length, vocab, seed=200 + r)[0], one)
            wall += timed_step(llm)
            eng.step()
    per_kernel: dict = defaultdict(lambda: [0, 0.0])
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if torch.cuda.is_available() and dev_us <= 0:
            continue
        us = dev_us if torch.cuda.is_available() else ev.self_cpu_time_total
        per_kernel[ev.key][0] += ev.count
        per_kernel[ev.key][1] += us
    groups: dict = defaultdict(float)
    for k, (_, us) in per_kernel.items():
        groups[group(k)] += us
    syncs = {ev.key: ev.count for ev in prof.key_averages() if ev.key in SYNC_EVENTS}
    return {"profiled_wall_s_mixed_plus_next": wall, "sync_events": syncs, "profiled_busy_us": sum(v[1] for v in per_kernel.values()),
            "groups_us": dict(groups),
            "top_kernels": [(k, c, us) for k, (c, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]]}


def host_profile(llm: LLM, count: int, length: int, vocab: int, top: int) -> dict:
    """cProfile over `count` mixed steps (as profile_steps runs them): the host's Python time
    by function, to find what bounds an eager step whose GPU-busy time is far below its wall."""
    import cProfile
    import pstats
    eng = llm.engine
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prof = cProfile.Profile()
    wall = 0.0
    for r in range(count):
        eng.add_request(None, random_prompts(1, length, vocab, seed=400 + r)[0], one)
        prof.enable()
        wall += timed_step(llm)
        prof.disable()
        eng.step()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append((f"{file.split('site-packages/')[-1].split('/work/')[-1]}:{line}:{func}", calls, tottime, cumtime))
    return {"wall_s": wall, "steps": count,
            "by_tottime": sorted(rows, key=lambda r: -r[2])[:top],
            "by_cumtime": sorted(rows, key=lambda r: -r[3])[:top]}


def print_host_profile(title: str, prof: dict) -> None:
    print(f"\n{title}: {prof['wall_s'] / prof['steps'] * 1e3:.1f} ms a step (under cProfile)")
    for key in ("by_tottime", "by_cumtime"):
        print(f"  {key}: ms a step, calls a step")
        for name, calls, tot, cum in prof[key]:
            ms = (tot if key == "by_tottime" else cum) / prof["steps"] * 1e3
            print(f"  {ms:8.2f} {calls // prof['steps']:6d}  {name[-100:]}")


def print_profile(title: str, prof: dict) -> None:
    print(f"\n{title}: busy {prof['profiled_busy_us'] / 1e3:.1f} ms of "
          f"{prof['profiled_wall_s_mixed_plus_next'] * 1e3:.1f} ms wall")
    for g, us in sorted(prof["groups_us"].items(), key=lambda kv: -kv[1]):
        print(f"  {g:28s} {us / 1e3:8.2f} ms")
    for k, c, us in prof["top_kernels"]:
        print(f"  {us / 1e3:8.2f} ms {c:5d}x  {k[:110]}")
    syncs = ", ".join(f"{k} {c}x" for k, c in sorted(prof.get("sync_events", {}).items())) or "none"
    print(f"  host events that wait for the device: {syncs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-llama-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--prefill-prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    ap.add_argument("--mixed-lens", default="64,192,448",
                    help="prompt lengths of the piecewise / eager mixed steps ('' skips them)")
    ap.add_argument("--piecewise-max-tokens", type=int, default=512)
    ap.add_argument("--profile-len", type=int, default=0,
                    help="prompt length of the profiled mixed steps (default --prompt-len)")
    ap.add_argument("--profile-eager", action="store_true",
                    help="profile the same mixed steps again with the piecewise graphs off")
    ap.add_argument("--host-profile", type=int, default=0,
                    help="cProfile the host over this many mixed steps, eager and (if captured) piecewise")
    args = ap.parse_args()
    mixed_lens = [int(n) for n in args.mixed_lens.split(",") if n]
    # decode steps the running sequences last: the timed, profiled and piecewise/eager steps
    # (the decode and mixed rows take 3 * repeats + 2, the profile 2 a step, the piecewise rows 6
    # a repeat; sequences prefilled first also decode during the later prefill steps: the margin)
    steps = 3 * args.repeats + 2 * args.profile * (1 + args.profile_eager) + 4 * args.host_profile + 6 * args.repeats * len(mixed_lens) + 64
    longest = max([args.prompt_len, args.profile_len] + mixed_lens)
    kw = dict(load_format=args.load_format, max_model_len=longest + steps + 16,
              device=args.device,
              max_num_seqs=max(args.batch + 8, args.prefill_prompts),
              cudagraph_mode="FULL_AND_PIECEWISE" if mixed_lens else "FULL_DECODE_ONLY",
              piecewise_max_tokens=args.piecewise_max_tokens,
              async_scheduling=False)   # each timed engine.step() is one whole step
    if args.device != "cpu":
        kw["gpu_memory_utilization"] = 0.85
    llm = LLM(args.model, **kw)
    eng = llm.engine
    eng.block_manager.enable_prefix_caching = False
    vocab = eng.config.model.hf_config.vocab_size
    params = sum(p.numel() for p in eng.runner.model.parameters())
    budget = eng.config.scheduler.max_num_batched_tokens
    res: dict = {"model": args.model, "device": device_name(), "date": time.strftime("%Y-%m-%d"),
                 "batch": args.batch, "prompt_len": args.prompt_len, "max_num_batched_tokens": budget,
                 "parameters": params}
    peak = matmul_peak() if torch.cuda.is_available() else None
    res["matmul_peak_flops"] = peak

    # prefill-only steps
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(random_prompts(args.prefill_prompts, args.prompt_len, vocab, seed=1), one)   # warm-up
    times = []
    for r in range(args.repeats):
        for p in random_prompts(args.prefill_prompts, args.prompt_len, vocab, seed=2 + r):
            eng.add_request(None, p, one)
        times.append(timed_step(llm))
        drain(llm)
    t = statistics.median(times)
    tokens = min(budget, args.prefill_prompts * args.prompt_len)   # the first step's prompt chunks
    res["prefill_step_s"] = t
    res["prefill_tokens_per_step"] = tokens
    res["prefill_tok_s"] = tokens / t
    res["prefill_mfu"] = 2 * params * tokens / t / peak if peak else None

    # decode-only and mixed steps over --batch running sequences, long enough for every step below
    long = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for p in random_prompts(args.batch, args.prompt_len, vocab, seed=50):
        eng.add_request(None, p, long)
    while eng.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running):
        eng.step()
    dec = [timed_step(llm) for _ in range(args.repeats + 2)][2:]
    res["decode_step_s"] = statistics.median(dec)
    mixed = []
    for r in range(args.repeats):
        eng.add_request(None, random_prompts(1, args.prompt_len, vocab, seed=100 + r)[0], one)
        mixed.append(timed_step(llm))
        eng.step()   # the new request's remaining chunk (if any) and its one token
    res["mixed_step_s"] = statistics.median(mixed)
    res["mixed_extra_s"] = res["mixed_step_s"] - res["decode_step_s"]
    res["prefill_chunk_alone_s"] = res["prefill_step_s"] * args.prompt_len / tokens
    if mixed_lens:
        res["piecewise"] = piecewise_vs_eager(llm, args.batch, mixed_lens, args.repeats, vocab)

    # kernels of mixed steps
    if args.profile:
        length = args.profile_len or args.prompt_len
        res["profile_prompt_len"] = length
        res.update(profile_steps(llm, args.profile, length, vocab, args.top))
        if args.profile_eager and eng.runner.piecewise is not None:
            pieces, eng.runner.piecewise = eng.runner.piecewise, None
            res["eager"] = profile_steps(llm, args.profile, length, vocab, args.top)
            eng.runner.piecewise = pieces
    if args.host_profile:
        length = args.profile_len or args.prompt_len
        pieces = eng.runner.piecewise
        eng.runner.piecewise = None
        res["host_eager"] = host_profile(llm, args.host_profile, length, vocab, args.top)
        if pieces is not None:
            eng.runner.piecewise = pieces
            res["host_piecewise"] = host_profile(llm, args.host_profile, length, vocab, args.top)
    drain(llm)
    eng.shutdown()
    out = args.out or f"profile_mixed_{args.model.rstrip('/').split('/')[-1]}_b{args.batch}.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1)

    print(f"\n{res['model']} on {res['device']}, batch {args.batch}, prompts of {args.prompt_len}, "
          f"max_num_batched_tokens {budget}")
    print("| step | ms | note |\n| --- | ---: | --- |")
    mfu = f", MFU {res['prefill_mfu']:.1%}" if res["prefill_mfu"] else ""
    print(f"| prefill only ({tokens} tokens) | {1e3 * res['prefill_step_s']:.2f} | "
          f"{res['prefill_tok_s']:.0f} tok/s{mfu} |")
    print(f"| decode only (batch {args.batch}) | {1e3 * res['decode_step_s']:.2f} | |")
    print(f"| mixed (batch {args.batch} + one {args.prompt_len}-token prompt) | {1e3 * res['mixed_step_s']:.2f} | "
          f"extra {1e3 * res['mixed_extra_s']:.2f} ms vs that chunk's share of a prefill step "
          f"{1e3 * res['prefill_chunk_alone_s']:.2f} ms |")
    if mixed_lens:
        pw = res["piecewise"]
        print(f"\nmixed steps with and without piecewise CUDA graphs ({pw['kind']}, up to {pw['max_tokens']} "
              f"tokens, {pw['sizes']} sizes; with the decode graphs {pw['capture_s']:.1f} s, the aliased "
              f"capture {pw['alias_capture_s']:.1f} s)")
        print("| step tokens (decodes + prompt) | eager ms | piecewise ms (copies) | piecewise ms (aliases) | "
              "speed-up |\n| --- | ---: | ---: | ---: | ---: |")
        for row in pw["rows"]:
            best = min(row["piecewise_s"], row["piecewise_alias_s"])
            print(f"| {row['tokens']} ({args.batch} + {row['prompt_len']}) | {1e3 * row['eager_s']:.2f} | "
                  f"{1e3 * row['piecewise_s']:.2f} | {1e3 * row['piecewise_alias_s']:.2f} | "
                  f"{row['eager_s'] / best:.2f}x |")
    if args.profile:
        what = f"kernels over {args.profile} mixed steps of {res['profile_prompt_len']}-token prompts (+ the step after each)"
        print_profile(what, res)
        if "eager" in res:
            print_profile(what + ", piecewise graphs off", res["eager"])
    for key in ("host_eager", "host_piecewise"):
        if key in res:
            print_host_profile(f"host time by function, mixed steps, {key[5:]}", res[key])


if __name__ == "__main__":
    main()
