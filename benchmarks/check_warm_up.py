"""What the start-up warm-up leaves to compile while serving, and the sampler's part of the
profile run's peak (engine/warm_up.py).

    python benchmarks/check_warm_up.py --model deepseek-r1 --load-format dummy \\
        --engine-args '{"quantization": "fp8", "hf_overrides": {"num_hidden_layers": 5}}' \\
        --speculative-config '{"method": "mtp", "num_speculative_tokens": 1}'
    python benchmarks/check_warm_up.py --model r1-distill-llama-8b --load-format dummy \\
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 3}'
    DEEPSERVE_WARM_UP=1 python benchmarks/check_warm_up.py --engine-args '{"max_model_len": 256}'
                                                      # the demo model on a CPU: the logic only

One engine, one JSON line: its start-up (the warm-up's steps, seconds and Triton compiles; on
a GPU the profile run's peak just before and after it samples from its max_num_seqs x (1 + k)
logits rows, i.e. the bytes the sampler's temporaries now take from the KV pool, and the
pool's blocks), then a request mix that walks the serving paths: batches of 1, 3, 16, 17 and
40 sequences (at most max_num_seqs) of prompts from 5 to about 700 tokens (chunked prefill
beside decodes), each batch greedy, sampled (top-k / top-p / min-p), with penalties,
logit_bias, min_tokens, logprobs, allowed_token_ids and a seed, on text that repeats (n-gram
drafts find it); and every Triton kernel compiled while serving, by name (what the warm-up
missed: the log's "Triton compiled ... while serving" lines, counted, and each one's cause:
the parameters whose specialization classes differ from the nearest key compiled before).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deepserve import LLM, SamplingParams  # noqa: E402
from deepserve.engine import driver_runner  # noqa: E402
from deepserve.engine.warm_up import WATCH  # noqa: E402

BATCHES = (1, 3, 16, 17, 40)
PROMPT_LENS = (5, 40, 130, 700)


def settings(vocab: int) -> dict[str, SamplingParams]:
    """One SamplingParams per serving path of the sampler."""
    sampled = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02)
    return {
        "greedy": SamplingParams(temperature=0),
        "sampled": SamplingParams(**sampled),
        "penalties": SamplingParams(**sampled, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1),
        "logit_bias": SamplingParams(**sampled, logit_bias={1: 2.0, vocab - 1: -5.0}),
        "min_tokens": SamplingParams(temperature=0, min_tokens=6),
        "logprobs": SamplingParams(**sampled, logprobs=5),
        "allowed_token_ids": SamplingParams(**sampled, allowed_token_ids=list(range(2, min(vocab, 200)))),
        "seed": SamplingParams(**sampled, seed=7),
    }


def prompts(n: int, vocab: int, max_len: int) -> list[dict]:
    """n prompts of cycling lengths, each a short random phrase repeated (n-gram drafts find it)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = min(PROMPT_LENS[i % len(PROMPT_LENS)], max_len - 16)
        phrase = torch.randint(2, vocab, (7,), generator=g).tolist()
        out.append({"prompt_token_ids": (phrase * (length // 7 + 1))[:length]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the built-in demo model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--speculative-config", default=None, help="JSON, as deepserve serve takes it")
    ap.add_argument("--engine-args", default="{}", help="JSON of more LLM(...) keyword arguments")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    profile = {}
    sample_from = driver_runner.DriverRunner._profile_sampling

    def measured(self, logits, drafts):
        """The profile run's peak just before and after its sampling (GPU allocator counters)."""
        if logits is None or self.device.type != "cuda":
            return sample_from(self, logits, drafts)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.max_memory_allocated(self.device)
        sample_from(self, logits, drafts)
        torch.cuda.synchronize(self.device)
        profile.update(rows=int(logits.shape[0]), vocab=self.vocab_size, forward_peak_bytes=before,
                       sampler_adds_bytes=torch.cuda.max_memory_allocated(self.device) - before)
    driver_runner.DriverRunner._profile_sampling = measured

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("deepserve").addHandler(handler)
    logging.getLogger("deepserve").setLevel(logging.INFO)

    kw = json.loads(args.engine_args)
    if args.speculative_config:
        kw["speculative_config"] = json.loads(args.speculative_config)
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, **kw)
    start_s = time.perf_counter() - t0
    runner = llm.engine.runner
    warm_compiles = WATCH.compiles
    sc = llm.engine.config.scheduler
    vocab = runner.vocab_size
    served, t0 = Counter(), time.perf_counter()
    for b in (b for b in BATCHES if b <= sc.max_num_seqs):
        batch = prompts(b, vocab, sc.max_model_len)
        for name, params in settings(vocab).items():
            params.max_tokens = args.max_tokens
            llm.generate(batch, params)
            served[name] += b
    serve_s = time.perf_counter() - t0
    serving_lines = [line for line in lines if "while serving" in line]
    missed = Counter(line.split(" while serving")[0].removeprefix("Triton compiled ") for line in serving_lines)
    # each compile's cause: the parameters whose classes differ from the nearest earlier key
    causes = sorted({f"{line.split(' while serving')[0].removeprefix('Triton compiled ')}: {line.split('; ', 1)[-1]}"
                     for line in serving_lines})
    gauges = llm.engine.gauges()
    print(json.dumps({
        "model": args.model or "demo", "device": str(runner.device), "speculative": kw.get("speculative_config"),
        "max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_model_len": sc.max_model_len, "start_s": round(start_s, 2),
        "timings": {k: round(v, 3) for k, v in runner.timings.items()},
        "warm_up_line": next((line for line in lines if line.startswith("warm-up:")), None),
        "compiles_at_start": warm_compiles, "compiles_while_serving": WATCH.compiles - warm_compiles,
        "missed_kernels": dict(missed), "missed_causes": causes, "kv_blocks": runner.num_blocks, "profile_sampling": profile or None,
        "served_sequences": dict(served), "serve_s": round(serve_s, 2),
        "spec_decode_num_drafts": gauges.get("spec_decode_num_drafts"),
    }))
    llm.shutdown()


if __name__ == "__main__":
    main()
