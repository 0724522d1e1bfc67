"""Structured-output overhead (issue 19): decode tokens/s with and without a JSON schema, on the
same engine, same prompts, batch 1 and 64.

The schema is an object with one string of at least --min-chars characters, so no row can finish
before --new-tokens and both runs decode the same number of tokens; the constrained run pays the
grammar's per-step work (xgrammar's token bitmask, filled on the CPU, applied to the logits).
Each figure is the median of --repeats timed runs of (full run - prefill-only run), as in
benchmarks/bench_engine.py. The constrained outputs are checked to be the schema's JSON prefix.

Usage (GPU):  python benchmarks/bench_structured.py --tokenizer TOK   # r1-distill-llama-8b, dummy
Usage (CPU check):  python benchmarks/bench_structured.py --model ../shared/models/stories260k \
    --load-format auto --device cpu --batches 1 4 --new-tokens 16 --repeats 1
Writes benchmarks/results/structured_<model>_b<batch>.json (or --out-dir) and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_engine import device_name, random_prompts, record, release, synchronize

from deepserve import LLM, SamplingParams
from deepserve.engine.sampling_params import GuidedDecoding


def schema(min_chars: int) -> dict:
    return {"type": "object", "properties": {"answer": {"type": "string", "minLength": min_chars}},
            "required": ["answer"], "additionalProperties": False}


def rate(llm: LLM, prompts: list, full: SamplingParams, one: SamplingParams, repeats: int) -> tuple[float, list]:
    """Decode tokens/s over all rows: generated tokens after the first / (full - prefill-only) time."""
    outs = llm.generate(prompts, full)  # warm-up (and the grammar compiled once)
    rates = []
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        llm.generate(prompts, one)
        synchronize()
        t1 = time.perf_counter()
        outs = llm.generate(prompts, full)
        synchronize()
        t2 = time.perf_counter()
        tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
        rates.append(tokens / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates), rates, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="r1-distill-llama-8b")
    ap.add_argument("--tokenizer", help="tokenizer folder (the grammar needs the vocabulary; a preset has none)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--min-chars", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    kw = dict(load_format=args.load_format, max_model_len=args.prompt_len + args.new_tokens + 16,
              max_num_seqs=max(args.batches), device=args.device, tokenizer=args.tokenizer,
              async_scheduling=False)   # structured-output steps run synchronously: the free runs too
    if args.device != "cpu":
        kw["gpu_memory_utilization"] = 0.85
    llm = LLM(args.model, **kw)
    llm.engine.block_manager.enable_prefix_caching = False
    vocab = llm.engine.config.model.hf_config.vocab_size
    guided = GuidedDecoding(json=schema(args.min_chars))
    rows: list = []
    name = Path(args.model).name
    for b in args.batches:
        prompts = random_prompts(b, args.prompt_len, vocab)
        plain_full = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        plain_one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        json_full = SamplingParams(temperature=0, max_tokens=args.new_tokens, guided=guided)
        json_one = SamplingParams(temperature=0, max_tokens=1, guided=guided)
        free, free_runs, _ = rate(llm, prompts, plain_full, plain_one, args.repeats)
        cons, cons_runs, outs = rate(llm, prompts, json_full, json_one, args.repeats)
        lens = [len(o.outputs[0].token_ids) for o in outs]
        texts = [o.outputs[0].text for o in outs]
        ok = all(t.replace(" ", "").replace("\n", "").startswith('{"answer":"') for t in texts)
        if not ok or min(lens) != args.new_tokens:
            raise SystemExit(f"constrained outputs are not the schema's prefix or ended early: lengths {set(lens)}, "
                             f"first {texts[0][:80]!r}")
        overhead = 1 - cons / free
        record(rows, f"{name}_b{b}", cons, "tok/s", free,
               {"unconstrained_tok_s": free, "overhead": overhead, "runs_json": cons_runs, "runs_free": free_runs,
                "schema": schema(args.min_chars), "new_tokens": args.new_tokens, "prompt_len": args.prompt_len},
               prefix="structured_", results=Path(args.out_dir))
    release(llm)
    print(f"\n| model | batch | free tok/s | json-schema tok/s | overhead | device |\n| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {name} | {r['name'].rsplit('_b', 1)[1]} | {r['unconstrained_tok_s']:.1f} | {r['value']:.1f} | "
              f"{r['overhead']:.1%} | {device_name()} |")


if __name__ == "__main__":
    main()
