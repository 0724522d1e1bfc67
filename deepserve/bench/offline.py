"""`deepserve bench latency` and `bench throughput`: the engine in-process, no server.

Both follow vLLM's `benchmark_latency.py` / `benchmark_throughput.py`: random prompt token
ids (so no tokenizer or dataset is involved), `ignore_eos` so every request produces exactly
`--output-len` tokens, `--n` sequences a prompt sampled at temperature 1 and top-p 1 as vLLM's
are (one by default), each counted; latency's `--use-beam-search`: `--n` beams. As vLLM's latency, bench latency runs without prefix caching unless
`--enable-prefix-caching` is given: each iteration sends the same prompts.

- latency: one batch of `--batch-size` prompts, timed end to end `--num-iters` times after
  `--num-iters-warmup` untimed runs; reports the mean and percentiles (seconds).
- throughput: `--num-prompts` prompts submitted at once; requests/s and tokens/s over the
  wall time of the whole `generate` call, with output tokens counted from the results.
  `--dataset-name random` (the default without `--dataset-path`) builds random token ids of
  `--input-len` (`--random-range-ratio` / `--random-prefix-len` as in vLLM); `sharegpt` and
  `sonnet` read `--dataset-path` as `bench serve` does, `prefix_repetition` builds `bench serve`'s
  set from its `--prefix-repetition-*` flags; all send the prompts' token ids (model tokenizer,
  no special tokens added), `--output-len` replacing the sharegpt and sonnet output lengths
  where given (vLLM's benchmark_throughput.py). `--num-warmups` runs that many requests of the
  same set (next seed) untimed first; `--prequeue-requests` enqueues every request before the
  engine runs a step.

The measuring functions take the `llm` object, so they run against anything with vLLM's
`LLM.generate` API.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deepserve.bench.datasets import RangeRatio, range_ratios
from deepserve.bench.results import check_result_path, write_result

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[dict]:
    if num < 1 or input_len < 1:
        raise ValueError(f"need >= 1 prompt of >= 1 token, got {num} prompts of {input_len} tokens")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(num, input_len))
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, seed: int,
                    range_ratio: RangeRatio = 0.0, prefix_len: int = 0) -> tuple[list[dict], list[int]]:
    """vLLM's random set as token ids: `prefix_len` ids shared by every prompt, then input and
    output lengths drawn uniformly in [len * (1 - r), len * (1 + r)] (`range_ratio` r in [0, 1),
    or vLLM's {"input": r, "output": r})."""
    ratio_in, ratio_out = range_ratios(range_ratio)
    if prefix_len < 0:
        raise ValueError(f"--random-prefix-len must be >= 0, got {prefix_len}")
    if ratio_in == ratio_out == 0.0 and prefix_len == 0:
        return random_prompts(num, input_len, vocab_size, seed), [output_len] * num
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"need >= 1 prompt of >= 1 token in and out, got {num} prompts of "
                         f"{input_len} / {output_len} tokens")
    rng = np.random.default_rng(seed)

    def lengths(n: int, ratio: float) -> np.ndarray:
        return rng.integers(max(1, math.floor(n * (1 - ratio))), math.ceil(n * (1 + ratio)) + 1, num)

    lens_in, lens_out = lengths(input_len, ratio_in), lengths(output_len, ratio_out)
    prefix = rng.integers(0, vocab_size, prefix_len).tolist()
    prompts = [{"prompt_token_ids": prefix + rng.integers(0, vocab_size, int(n)).tolist()} for n in lens_in]
    return prompts, [int(n) for n in lens_out]


def run_batch(llm: Any, params: Any, prompts: list[dict], beam_search: bool = False) -> None:
    """One batch of bench latency: `llm.generate`, or `llm.beam_search` (`params` a BeamSearchParams)."""
    if beam_search:
        llm.beam_search(prompts, params)
    else:
        llm.generate(prompts, params, use_tqdm=False)


def measure_latency(llm: Any, sampling_params: Any, prompts: list[dict], num_iters: int,
                    num_iters_warmup: int, progress: bool = True, beam_search: bool = False) -> dict:
    """Time `llm.generate(prompts)` (`beam_search`: `llm.beam_search(prompts)`, `sampling_params`
    then a BeamSearchParams) `num_iters` times; vLLM's latency JSON fields (seconds)."""
    from tqdm.auto import tqdm

    if num_iters < 1 or num_iters_warmup < 0:
        raise ValueError(f"--num-iters must be >= 1 and --num-iters-warmup >= 0, "
                         f"got {num_iters} and {num_iters_warmup}")
    for _ in tqdm(range(num_iters_warmup), desc="warmup", disable=not progress, file=sys.stderr):
        run_batch(llm, sampling_params, prompts, beam_search)
    latencies = []
    for _ in tqdm(range(num_iters), desc="latency", disable=not progress, file=sys.stderr):
        start = time.perf_counter()
        run_batch(llm, sampling_params, prompts, beam_search)
        latencies.append(time.perf_counter() - start)
    arr = np.asarray(latencies)
    return {"avg_latency": float(arr.mean()), "latencies": latencies,
            "percentiles": {str(p): float(np.percentile(arr, p)) for p in LATENCY_PERCENTILES}}


def measure_throughput(llm: Any, sampling_params: Any, prompts: list[dict], progress: bool = True,
                       prequeue: bool = False) -> dict:
    """One `generate` over all prompts (`prequeue`: vLLM's --prequeue-requests, every request
    enqueued before the engine runs a step, then wait_for_completion); vLLM's throughput JSON
    fields plus output tokens/s."""
    start = time.perf_counter()
    if prequeue:
        llm.enqueue(prompts, sampling_params, use_tqdm=progress)
        outputs = llm.wait_for_completion(use_tqdm=progress)
    else:
        outputs = llm.generate(prompts, sampling_params, use_tqdm=progress)
    elapsed = time.perf_counter() - start
    if len(outputs) != len(prompts):
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(prompts)} prompts")
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    output_tokens = sum(len(seq.token_ids) for o in outputs for seq in o.outputs)
    return {"elapsed_time": elapsed, "num_requests": len(prompts),
            "total_num_tokens": prompt_tokens + output_tokens,
            "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
            "requests_per_second": len(prompts) / elapsed,
            "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
            "output_tokens_per_second": output_tokens / elapsed}


def _load_engine(args) -> tuple[Any, Any, int, int]:
    """(llm, SamplingParams class, vocab size, seed) from the engine flags in `args`."""
    try:
        from deepserve import LLM, SamplingParams
    except ImportError as exc:
        raise RuntimeError(f"the in-process engine is not available in this build ({exc})") from None
    from deepserve.config import TRUST_REMOTE_CODE_NOTE, EngineArgs, load_hf_config

    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.trust_remote_code:
        print(TRUST_REMOTE_CODE_NOTE, file=sys.stderr)
    vocab = int(load_hf_config(engine_args.model, engine_args.hf_overrides).get("vocab_size", 0))
    if vocab < 1:
        raise ValueError(f"model {engine_args.model!r} has no vocab_size in its config.json")
    return LLM(**dataclasses.asdict(engine_args)), SamplingParams, vocab, engine_args.seed


def _write_json(path: Optional[str], result: dict) -> None:
    if path:
        write_result(Path(path), json.dumps(result, indent=2))
        print(f"bench: result written to {path}", file=sys.stderr)


def check_output_json(args) -> None:
    if getattr(args, "output_json", None):
        check_result_path(Path(args.output_json), "--output-json")


def check_profile_flag(args) -> None:
    """vLLM's --profile of bench latency / throughput needs the engine's --profiler-config."""
    if getattr(args, "profile", False) and not (getattr(args, "profiler_config", None) or {}).get("profiler"):
        raise ValueError("--profile needs --profiler-config, e.g. '{\"profiler\": \"torch\", "
                         "\"torch_profiler_dir\": \"/abs/dir\"}'")


def sampling_kwargs(args) -> dict:
    """The sampling of bench latency / throughput requests, vLLM's: --n sequences a prompt
    sampled at temperature 1 / top-p 1 (one included: the sampler's cost is part of the time);
    --disable-detokenize."""
    n = getattr(args, "n", 1)
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    kwargs = dict(n=n, temperature=1.0, top_p=1.0)
    return {**kwargs, **({"detokenize": False} if getattr(args, "disable_detokenize", False) else {})}


def check_fits(llm: Any, prompts: list[dict], out_lens: list[int]) -> None:
    """Every request's prompt and output within the engine's max_model_len, as vLLM's benchmarks
    assert: past it the engine stops the output early, and the run would time shorter outputs
    than were asked for."""
    limit = getattr(getattr(llm, "engine", None), "max_model_len", None)
    if limit is None:   # vLLM's LLM; an object that tells none is not checked
        limit = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
    if limit is None:
        return
    longest = max(len(p["prompt_token_ids"]) + n for p, n in zip(prompts, out_lens))
    if longest > limit:
        raise ValueError(f"a request of {longest} tokens (prompt + output) does not fit max_model_len {limit}: "
                         "lower --input-len / --output-len or raise --max-model-len")


def run_latency(args) -> dict:
    check_profile_flag(args)
    check_output_json(args)
    sampling = sampling_kwargs(args)
    llm, SamplingParams, vocab, seed = _load_engine(args)
    max_tokens = args.output_len or 128
    if args.use_beam_search:   # vLLM's: --n beams a prompt
        from deepserve import BeamSearchParams
        params = BeamSearchParams(beam_width=args.n, max_tokens=max_tokens, ignore_eos=True)
    else:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
    prompts = random_prompts(args.batch_size, args.input_len, vocab, seed)
    check_fits(llm, prompts, [max_tokens] * len(prompts))
    if args.profile:   # as vLLM: after the warm-up, one batch under the profiler, untimed
        for _ in range(args.num_iters_warmup):
            run_batch(llm, params, prompts, args.use_beam_search)
        print(f"Profiling one batch with the {llm.engine.config.profiler.profiler} profiler...", file=sys.stderr)
        llm.start_profile()
        run_batch(llm, params, prompts, args.use_beam_search)
        llm.stop_profile()
        return {}
    result = measure_latency(llm, params, prompts, args.num_iters, args.num_iters_warmup,
                             progress=not args.disable_tqdm, beam_search=args.use_beam_search)
    print(f"Avg latency: {result['avg_latency']:.4f} seconds "
          f"(batch {args.batch_size}, {args.input_len} in / {max_tokens} out)")
    for p, value in result["percentiles"].items():
        print(f"{p}% percentile latency: {value:.4f} seconds")
    _write_json(args.output_json, result)
    return result


def dataset_prompts(args, seed: int) -> tuple[list[dict], list[int]]:
    """(prompts as token ids, output length of each) from a sharegpt or sonnet file, or vLLM's
    prefix_repetition set; the lengths not given take vLLM's throughput defaults (sonnet: 550 in,
    150 out, --prefix-len 0; prefix_repetition: its own flags, 256 / 256 / 10 prefixes / 128 out)."""
    from deepserve.bench.datasets import (check_dataset_file, oversample, sample_prefix_repetition,
                                          sample_sharegpt, sample_sonnet)
    from deepserve.config import EngineArgs
    from deepserve.engine.tokenizer import resolve_tokenizer

    if args.dataset_name != "prefix_repetition":
        if not args.dataset_path:
            raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
        check_dataset_file(args.dataset_path)
    engine_args = EngineArgs.from_cli_args(args)
    tok = resolve_tokenizer(engine_args.tokenizer, engine_args.model)
    if args.dataset_name == "sharegpt":
        requests = oversample(sample_sharegpt(tok, args.dataset_path, args.num_prompts, args.output_len, seed),
                              args, seed)
    elif args.dataset_name == "sonnet":
        requests = sample_sonnet(tok, args.dataset_path, args.num_prompts, _given(args.input_len, 550),
                                 args.prefix_len, _given(args.output_len, 150), chat_format=True, seed=seed)
    else:
        requests = sample_prefix_repetition(
            tok, args.num_prompts, _given(args.prefix_repetition_prefix_len, 256),
            _given(args.prefix_repetition_suffix_len, 256), _given(args.prefix_repetition_num_prefixes, 10),
            _given(args.prefix_repetition_output_len, 128), seed)
    return ([{"prompt_token_ids": tok.encode(r.prompt, add_special_tokens=False)} for r in requests],
            [r.expected_output_len for r in requests])


def _given(value: Optional[int], default: int) -> int:
    return default if value is None else value


def throughput_requests(args, num: int, seed: int, llm: Any, vocab: int,
                        SamplingParams) -> tuple[list[dict], list]:
    """`num` prompts of the chosen set and their sampling parameters (every output length exact;
    `args.n` sequences a prompt at temperature 1, as vLLM samples them)."""
    sampling = sampling_kwargs(args)
    if args.dataset_name == "random":
        prompts, out_lens = random_requests(num, _given(args.input_len, 1024), _given(args.output_len, 128), vocab,
                                            seed, args.random_range_ratio, args.random_prefix_len)
    else:
        prompts, out_lens = dataset_prompts(argparse.Namespace(**{**vars(args), "num_prompts": num}), seed)
    check_fits(llm, prompts, out_lens)
    if len(set(out_lens)) == 1:
        return prompts, SamplingParams(max_tokens=out_lens[0], ignore_eos=True, **sampling)
    return prompts, [SamplingParams(max_tokens=tokens, ignore_eos=True, **sampling) for tokens in out_lens]


def run_throughput(args) -> dict:
    check_profile_flag(args)
    check_output_json(args)
    if args.backend != "vllm":
        raise ValueError(f"--backend {args.backend} is not supported: the engine runs in-process (--backend vllm)")
    if args.dataset is not None:   # vLLM's deprecated spelling, with its warning
        print("bench throughput: --dataset is deprecated; use --dataset-name and --dataset-path", file=sys.stderr)
        args.dataset_path = args.dataset_path or args.dataset
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    sampling_kwargs(args)   # its flags checked before the model loads
    args.dataset_name = args.dataset_name or ("sharegpt" if args.dataset_path else "random")
    if args.dataset_name in ("random", "prefix_repetition") and args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} takes no --dataset-path; name the file's set with "
                         "--dataset-name sharegpt or sonnet")
    if args.dataset_name != "random" and args.dataset_path:
        from deepserve.bench.datasets import check_dataset_file
        check_dataset_file(args.dataset_path)   # before the model loads
    llm, SamplingParams, vocab, seed = _load_engine(args)
    if args.num_warmups:   # vLLM's: the same set with the next seed, untimed
        warm_prompts, warm_params = throughput_requests(args, args.num_warmups, seed + 1, llm, vocab,
                                                       SamplingParams)
        print(f"Warming up with {len(warm_prompts)} requests...", file=sys.stderr)
        llm.generate(warm_prompts, warm_params, use_tqdm=False)
    prompts, params = throughput_requests(args, args.num_prompts, seed, llm, vocab, SamplingParams)
    if args.profile:   # as vLLM: the measured run is profiled
        llm.start_profile()
    result = measure_throughput(llm, params, prompts, progress=not args.disable_tqdm, prequeue=args.prequeue_requests)
    if args.profile:
        llm.stop_profile()
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, "
          f"{result['tokens_per_second']:.2f} total tokens/s, "
          f"{result['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {result['total_prompt_tokens']}")
    print(f"Total num output tokens:  {result['total_output_tokens']}")
    _write_json(args.output_json, result)
    return result
