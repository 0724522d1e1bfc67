"""Speculative decoding on one GPU (issue 18): verify-step cost, n-gram acceptance and speedup,
projected MTP speedup. One run produces every figure the issue asks for:

    python benchmarks/bench_spec.py                        # one H100 or H200, a few minutes
    python benchmarks/bench_spec.py --tiny --device cpu    # the logic at toy sizes

Parts, each in a fresh process (an engine's memory is not all back in the allocator when the
next one starts), merged into one JSON (--out, default benchmarks/results/spec.json):

  r1      the deepseek-r1 preset cut to 3 dense + 2 MoE layers (hf_overrides num_hidden_layers
          5, as benchmarks/bench_r1.py), dummy weights, fp8 (--quantization fp8), with its MTP
          layer (--speculative-config mtp, k = 3, so CUDA graphs are captured up to 64 x 4
          tokens). Step costs: a plain decode step against a verify step with k = 1, 2, 3 drafts
          at batch 1, 16, 64 over a 512-token context (`step_costs`); one MTP forward as the
          engine drafts (the draft cost, per draft token) and one R1 MoE decoder layer (the
          MTP block) on b and b(k+1) rows captured in a CUDA graph, which extrapolate the cut
          to R1's 61 layers.
  llama8b the r1-distill-llama-8b preset, dummy weights, bf16, with n-gram (k = 3): the same
          step costs; then n-gram acceptance and speedup (decode tok/s with and without drafts,
          greedy, the same engine) on ShareGPT first turns (../shared/datasets/serving) made
          self-repeating (each prompt twice, tokenized with the R1-Distill-Llama tokenizer) at
          batch 1 and 16. Random weights generate what random weights do: this acceptance
          measures the machinery on that text, not a trained model's.
  demo    stories260k (the trained demo model) with n-gram (k = 3, lookup 2..4): acceptance and
          speedup of its stories (which repeat) at batch 1 and 16, greedy tokens checked equal.

A step's cost is its forward (`ModelRunner.run_step`, inputs staged from the host as the engine
does; verify steps as the engine runs them: one-token rows replaying the decode graphs where
graphs are captured) plus its sampling (greedy: the sampler for a plain step, the verification
of a verify step's rows), median of --iters after a warm-up, synchronized.

Projection (MTP; random weights cannot show its acceptance, so acceptance a is given): with
a per-position acceptance a, a step emits E = 1 + a + ... + a^k tokens and costs
verify(k) + k x mtp_forward, against E plain steps: speedup = E x plain / (verify(k) + k x mtp).
For R1 (61 layers: 3 dense + 58 MoE) each step cost adds 56 x the MoE layer's cost at its row
count to the cut's (plain: b rows, verify: b(k+1)). Targets (issue 18): >= 1.7x at batch 1,
k = 1, a = 0.85; verify overhead <= 10% over a plain step at batch 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from bench_moe_layer import graph_or_eager_ms  # noqa: E402

from deepserve import LLM, SamplingParams  # noqa: E402
from deepserve.engine.sequence import Sequence  # noqa: E402
from deepserve.engine.spec_decode import SpecDecoder, as_decode_rows, verify_inputs  # noqa: E402
from deepserve.engine.step_inputs import StepMessage  # noqa: E402

SHARED = REPO.parent / "shared"
SHAREGPT = SHARED / "datasets" / "serving" / "ShareGPT_V3_filtered_500.json"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "deepseek-r1-distill-llama-8b"
R1_DENSE, R1_LAYERS, CUT_MOE = 3, 61, 2
ACCEPTANCE = (0.7, 0.8, 0.85, 0.9)
KS = (1, 2, 3)
# --tiny: the same structures at toy sizes, for a CPU check of the logic
R1_TINY = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
           "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 32,
           "qk_nope_head_dim": 32, "v_head_dim": 32, "max_position_embeddings": 4096, "vocab_size": 1024}
LLAMA_TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096}


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- step costs
def synthetic_seqs(llm: LLM, batch: int, context: int, k: int, seed: int = 0):
    """`batch` greedy sequences of `context` tokens whose first context - 1 are (notionally) in
    the cache, each on blocks of its own, with k random drafts -> (seqs, drafts)."""
    engine = llm.engine
    vocab, bs = engine.config.model.hf_config.vocab_size, engine.config.cache.block_size
    per_seq = math.ceil((context + k) / bs)
    if batch * per_seq > engine.runner.num_blocks:
        raise RuntimeError(f"{batch} sequences of {context} + {k} tokens need {batch * per_seq} KV blocks, "
                           f"the pool has {engine.runner.num_blocks}")
    g = torch.Generator().manual_seed(seed)
    greedy = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    seqs, drafts = [], []
    for i in range(batch):
        s = Sequence(f"bench{i}", 0, torch.randint(0, vocab, (context,), generator=g).tolist(), greedy)
        s.block_table = list(range(i * per_seq, (i + 1) * per_seq))
        s.num_computed_tokens = context - 1
        seqs.append(s)
        drafts.append(torch.randint(0, vocab, (k,), generator=g).tolist())
    return seqs, drafts


def step_costs(llm: LLM, batches, context: int, device: str, iters: int) -> dict:
    """{batch: {k: {forward_ms, sample_ms, step_ms, rows}}} with k = 0 the plain decode step."""
    engine, runner = llm.engine, llm.engine.runner
    decoder = SpecDecoder(engine.config.speculative, engine.max_model_len)
    decoder.sampler = runner.sampler                   # verification samples with the engine's op
    graphs = runner.graphs is not None and runner.graphs.enabled
    out = {}
    for b in batches:
        out[b] = {}
        for k in (0,) + KS:
            seqs, drafts = synthetic_seqs(llm, b, context, k)
            inputs, order = verify_inputs(seqs, [1] * b, drafts, engine.config.cache.block_size)
            if k and graphs:
                inputs = as_decode_rows(inputs)        # as run_speculative_step runs it
            msg = StepMessage(inputs)
            ordered = [seqs[i] for i in order]
            forward = median_ms(lambda: runner.run_step(msg), device, iters)
            logits = runner.run_step(msg)
            if k:
                ds = [drafts[i] for i in order]
                sample = median_ms(lambda: decoder.verify(logits, ordered, ds), device, iters)
            else:
                sample = median_ms(lambda: runner.sampler(logits, ordered), device, iters)
            out[b][k] = {"forward_ms": forward, "sample_ms": sample, "step_ms": forward + sample,
                         "rows": inputs.num_tokens}
            print(f"  batch {b:3d} k={k}: forward {forward:.3f} ms + sampling {sample:.3f} ms "
                  f"({inputs.num_tokens} rows)", flush=True)
    return out


def mtp_costs(llm: LLM, batches, context: int, device: str, iters: int) -> dict:
    """One MTP forward with its logits at b decode rows, as the engine drafts (a replay of the
    module's CUDA graph where captured), and the MTP block alone (one R1 MoE decoder layer)
    at b and b(k+1) rows in a CUDA graph."""
    engine, runner = llm.engine, llm.engine.runner
    mtp = runner.mtp.mtp
    d = engine.config.model.hf_config.hidden_size
    out = {}
    for b in batches:
        seqs, _ = synthetic_seqs(llm, b, context, 0)
        inputs, _ = verify_inputs(seqs, [1] * b, [[]] * b, engine.config.cache.block_size)
        ids, pos, meta = runner.to_device(inputs)
        hidden = torch.randn(b, d, dtype=runner.dtype, device=runner.device)

        def draft():
            with torch.inference_mode():
                runner.mtp.forward(ids, pos, hidden, meta)
        entry = {"mtp_forward_ms": median_ms(draft, device, iters), "layer_ms": {}}
        for k in (0,) + KS:
            s, dr = synthetic_seqs(llm, b, context, k)
            rows = as_decode_rows(verify_inputs(s, [1] * b, dr, engine.config.cache.block_size)[0])
            lids, lpos, lmeta = runner.to_device(rows)
            x = torch.randn(rows.num_tokens, d, dtype=runner.dtype, device=runner.device)

            def layer():
                with torch.inference_mode():
                    mtp.mtp_block(lpos, x, None, lmeta)
            ms, how = graph_or_eager_ms(layer, torch.device(device), iters)
            entry["layer_ms"][k] = ms
            entry["layer_timed_as"] = how
        out[b] = entry
        print(f"  batch {b:3d}: MTP forward {entry['mtp_forward_ms']:.3f} ms; MoE layer "
              + ", ".join(f"k={k} {v:.3f} ms" for k, v in entry["layer_ms"].items()), flush=True)
    return out


def tokens_per_step(a: float, k: int) -> float:
    """Expected tokens a step emits with k drafts each accepted with probability a (given the ones before)."""
    return sum(a ** j for j in range(k + 1))


def projection(steps: dict, mtp: dict, full_model: bool) -> dict:
    """{batch: {k: {acceptance: speedup}}} from the measured costs (see the module docstring)."""
    extra_layers = R1_LAYERS - R1_DENSE - CUT_MOE if full_model else 0
    out = {}
    for b, per_k in steps.items():
        layer = mtp[b]["layer_ms"]
        plain = per_k[0]["step_ms"] + extra_layers * layer[0]
        out[b] = {}
        for k in KS:
            verify = per_k[k]["step_ms"] + extra_layers * layer[k]
            cost = verify + k * mtp[b]["mtp_forward_ms"]
            out[b][k] = {"plain_ms": plain, "verify_ms": verify, "draft_ms": k * mtp[b]["mtp_forward_ms"],
                         "verify_overhead": verify / plain - 1.0,
                         "speedup": {str(a): tokens_per_step(a, k) * plain / cost for a in ACCEPTANCE}}
    return out


# ----------------------------------------------------------------------------- n-gram runs
def ngram_run(llm: LLM, prompts: list, max_tokens: int, device: str) -> dict:
    """Decode tok/s of the same greedy requests without drafts (engine.spec off) and with
    n-gram drafts; acceptance from the engine's spec counters; whether the tokens agree."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    decoder = engine.spec

    def timed(spec):
        engine.spec = spec
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))   # warm-up
        before = dict(decoder.stats.counters())
        sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(device)
        secs = time.perf_counter() - t0
        after = decoder.stats.counters()
        return [o.outputs[0].token_ids for o in outs], secs, {k: after[k] - before.get(k, 0) for k in after}

    try:
        plain, plain_s, _ = timed(None)
        spec, spec_s, delta = timed(decoder)
    finally:
        engine.spec = decoder
    tokens = sum(len(t) for t in plain)
    drafted, accepted = delta["spec_decode_num_draft_tokens"], delta["spec_decode_num_accepted_tokens"]
    per_pos = [delta.get(f"spec_decode_num_accepted_tokens_per_pos_{j}", 0) for j in range(decoder.k)]
    return {"batch": len(prompts), "max_tokens": max_tokens, "plain_tok_s": tokens / plain_s,
            "spec_tok_s": sum(len(t) for t in spec) / spec_s, "speedup": plain_s / spec_s,
            "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            "mean_acceptance_length": 1.0 + accepted / max(1, delta["spec_decode_num_drafts"]),
            "accepted_per_position": per_pos, "greedy_equal": spec == plain}


def self_repeating_sharegpt(n: int, prompt_tokens: int) -> list[dict]:
    """ShareGPT first human turns, each tokenized and given twice (its first prompt_tokens / 2
    tokens, then again), so a model that copies its context would draft from it."""
    from deepserve.engine.tokenizer import Tokenizer
    tok = Tokenizer(str(LLAMA_TOKENIZER))
    convs = json.loads(SHAREGPT.read_text())
    out = []
    for c in convs:
        ids = tok.encode(c["conversations"][0]["value"])[:prompt_tokens // 2]
        if len(ids) >= 16:
            out.append({"prompt_token_ids": ids + ids})
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- parts
def engine_kwargs(args, **kw) -> dict:
    kw = {"max_model_len": args.max_model_len, **kw}
    # synchronous steps: speculative engines run them (async_scheduling_plan), and the plain
    # engines they are compared with must too
    kw.update(device=args.device, seed=0, enable_prefix_caching=False, max_num_seqs=max(args.batches),
              async_scheduling=False)
    if args.device == "cuda":
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kw


def part_r1(args) -> dict:
    overrides = {"num_hidden_layers": R1_DENSE + CUT_MOE, "num_nextn_predict_layers": 1,
                 **(R1_TINY if args.tiny else {})}
    llm = LLM("deepseek-r1", load_format="dummy", quantization="fp8", hf_overrides=overrides,
              dtype="bfloat16" if args.device == "cuda" else "float32",
              speculative_config={"method": "mtp", "num_speculative_tokens": max(KS)}, **engine_kwargs(args))
    print(f"r1 cut: {R1_DENSE} dense + {CUT_MOE} MoE layers + MTP, fp8, startup {llm.engine.runner.timings}",
          flush=True)
    steps = step_costs(llm, args.batches, args.context, args.device, args.iters)
    mtp = mtp_costs(llm, args.batches, args.context, args.device, args.iters)
    return {"model": "deepseek-r1 cut (hf_overrides num_hidden_layers=5), dummy fp8", "steps": steps, "mtp": mtp,
            "projection_cut": projection(steps, mtp, full_model=False),
            "projection_r1_61_layers": projection(steps, mtp, full_model=True),
            "note": "random weights: MTP acceptance is given (0.7/0.8/0.85/0.9), not measured"}


def part_llama8b(args) -> dict:
    spec = {"method": "ngram", "num_speculative_tokens": max(KS), "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    llm = LLM("r1-distill-llama-8b", load_format="dummy", dtype="bfloat16" if args.device == "cuda" else "float32",
              hf_overrides=LLAMA_TINY if args.tiny else None, speculative_config=spec, **engine_kwargs(args))
    steps = step_costs(llm, args.batches, args.context, args.device, args.iters)
    prompts = self_repeating_sharegpt(max(args.ngram_batches),
                                      min(args.prompt_tokens, args.max_model_len - args.max_tokens - 1))
    runs = [ngram_run(llm, prompts[:b], args.max_tokens, args.device) for b in args.ngram_batches]
    return {"model": "r1-distill-llama-8b, dummy bf16, ngram k=3 (lookup 2..4)", "steps": steps,
            "verify_overhead": {b: {k: v[k]["step_ms"] / v[0]["step_ms"] - 1.0 for k in KS} for b, v in steps.items()},
            "sharegpt_self_repeating": runs,
            "note": "random weights: n-gram acceptance is that of the random model's output"}


def part_demo(args) -> dict:
    spec = {"method": "ngram", "num_speculative_tokens": max(KS), "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    llm = LLM(speculative_config=spec, **engine_kwargs(args, max_model_len=512))
    tok = llm.get_tokenizer()
    starts = ["Once upon a time", "Tom and Lily went to the park.", "The little dog saw a big red ball.",
              "Lily had a cat.", "One day, Sue found a box.", "Ben liked to play with his toy car."]
    prompts = [{"prompt_token_ids": tok.encode(starts[i % len(starts)])} for i in range(max(args.ngram_batches))]
    runs = [ngram_run(llm, prompts[:b], min(args.max_tokens, 256), args.device) for b in args.ngram_batches]
    return {"model": "stories260k (trained demo model), ngram k=3 (lookup 2..4)", "stories": runs}


PARTS = {"demo": part_demo, "llama8b": part_llama8b, "r1": part_r1}


# ----------------------------------------------------------------------------- table
def table(result: dict) -> str:
    lines = []
    for name in ("r1", "llama8b"):
        part = result.get(name)
        if not part or "steps" not in part:
            continue
        lines += [f"\n{part['model']}: step cost (ms, forward + sampling) at a 512-token context",
                  "| batch | plain | k=1 | k=2 | k=3 |", "|---|---|---|---|---|"]
        for b, per_k in part["steps"].items():
            p = per_k["0"]["step_ms"] if "0" in per_k else per_k[0]["step_ms"]
            cells = [f"{p:.3f}"] + [f"{v['step_ms']:.3f} ({v['step_ms'] / p - 1:+.0%})"
                                    for k, v in per_k.items() if str(k) != "0"]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    r1 = result.get("r1")
    if r1 and "projection_r1_61_layers" in r1:
        for key, title in (("projection_cut", "the 5-layer cut"), ("projection_r1_61_layers", "R1, 61 layers")):
            lines += [f"\nprojected MTP speedup ({title}; acceptance given)",
                      "| batch | k | " + " | ".join(f"a={a}" for a in ACCEPTANCE) + " | verify overhead |",
                      "|---|---|" + "---|" * (len(ACCEPTANCE) + 1)]
            for b, per_k in r1[key].items():
                for k, v in per_k.items():
                    lines.append(f"| {b} | {k} | " + " | ".join(f"{s:.2f}x" for s in v["speedup"].values())
                                 + f" | {v['verify_overhead']:+.1%} |")
    for name, key in (("demo", "stories"), ("llama8b", "sharegpt_self_repeating")):
        part = result.get(name)
        if not part or key not in part:
            continue
        lines += [f"\n{part['model']}: n-gram on {key}", "| batch | plain tok/s | spec tok/s | speedup | acceptance | "
                  "mean acc. length | greedy equal |", "|---|---|---|---|---|---|---|"]
        for r in part[key]:
            lines.append(f"| {r['batch']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | "
                         f"{r['acceptance']:.1%} | {r['mean_acceptance_length']:.2f} | {r['greedy_equal']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="toy model sizes (a CPU check of the logic)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ngram-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=512, help="tokens per sequence in the step-cost steps")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request in the n-gram runs")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="ShareGPT prompt tokens (a half given twice)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.88)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spec.json"))
    ap.add_argument("--in-process", action="store_true", help="run the parts in this process (default: one "
                    "process each)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    result = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/bench_spec.py " + " ".join(argv),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "tiny": args.tiny}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.parts:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        if args.in_process or len(args.parts) == 1:
            result[name] = PARTS[name](args)
        else:
            part_json = out.with_name(f"{out.stem}_{name}.json")
            cmd = [sys.executable, __file__, *_without_parts(argv), "--parts", name, "--out", str(part_json)]
            rc = subprocess.run(cmd).returncode
            result[name] = (json.loads(part_json.read_text())[name] if rc == 0 and part_json.exists()
                            else {"error": f"part {name} exited with {rc}"})
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    out.write_text(json.dumps(_json_keys(result), indent=2))
    print(table(_json_keys(result)))
    print(f"\nwrote {out}")
    return 0 if all("error" not in result[p] for p in args.parts) else 1


def _without_parts(argv: list[str]) -> list[str]:
    """argv less its --parts and --out options (each part gets its own)."""
    out, skip = [], False
    for a in argv:
        if a in ("--parts", "--out"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def _json_keys(obj):
    """JSON round trip (int keys become strings), so the table reads one form."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


if __name__ == "__main__":
    sys.exit(main())
