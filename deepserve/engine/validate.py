"""Logit-level consistency of two engine setups on the same prompts (`deepserve validate`).

A setup is a set of engine arguments (e.g. `ops=torch` vs `ops=triton`, bf16 vs fp8,
`tensor_parallel_size` 1 vs 2). Each builds its engine and scores every prompt position with
`LLM.prompt_logits`. The two run in this process one after the other (each engine resolves
its own op table), unless something needs a process per setup (`process_reason`): running
both at once (--concurrent), stopping one that overruns (--setup-timeout), FlagGems (it
patches aten for the whole process), or asking for it (--isolate). A setup process

    python -m deepserve.engine.validate --worker SPEC.json

reads the engine arguments and prompts from SPEC.json and writes the logits with
`torch.save`. The two sets are then compared position by position:

- top-1 agreement: the share of positions whose argmax is the same in A and B;
- max |d logit|: the largest absolute logit difference anywhere;
- top-1 in top-5: the share of positions where each setup's argmax is among the other's
  five largest logits (a flip between near-tied tokens passes this, a real error rarely);
- mean KL(A||B): KL divergence of the next-token distributions, softmax in fp64 (fp32
  cancellation would hide the small divergences between near-identical backends),
  averaged over all positions.

This mirrors how vLLM's kernel and quantization tests compare against a reference, but on
whole-model logits, so any layer's regression shows up.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

Prompt = Union[str, dict]
TOP_K = 5  # "near agreement": each setup's top-1 token is in the other's top TOP_K

# Varied on purpose: narrative, code, arithmetic, chat markup with a think block,
# non-Latin scripts and a list, so tokenizers and byte fallbacks are all exercised.
DEFAULT_PROMPTS: list[str] = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether? Answer: 48 / 2 = 24, 48 + 24 =",
    "<|User|>What is the capital of France?<|Assistant|><think>\nThe user asks about France. "
    "Its capital is Paris.\n</think>\n\nThe capital of France is",
    "深度求索发布了推理模型，它在数学和代码任务上表现出色。",
    "Shopping list:\n1. eggs\n2. milk (2 liters)\n3. bread\n4. apples, pears & plums\n5.",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 1234567890 %$#@",
    "Tom and his dog went to the big red house. The dog was happy and wagged its tail. Then",
]


@dataclass
class Thresholds:
    """Limits a comparison must stay within; None disables a check."""

    max_top1_mismatch: Optional[float] = 0.0
    max_abs_diff: Optional[float] = None
    max_kl: Optional[float] = None

    def __post_init__(self):
        for name in ("max_top1_mismatch", "max_abs_diff", "max_kl"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.max_top1_mismatch is not None and self.max_top1_mismatch > 1:
            raise ValueError(f"--max-top1-mismatch is a share in [0, 1], got {self.max_top1_mismatch}")


# --------------------------------------------------------------------------- prompts
def load_prompts(path: Optional[str], num_prompts: Optional[int] = None) -> list[Prompt]:
    """Prompts from a .txt (one per non-empty line) or .jsonl file (per line: a JSON string,
    or an object with "prompt", "text" or "prompt_token_ids"); the built-in list if no path."""
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if path is None:
        prompts: list[Prompt] = list(DEFAULT_PROMPTS)
    else:
        file = Path(path)
        if file.is_dir():
            raise ValueError(f"prompts file {path} is a folder; name a .txt or .jsonl file")
        if not file.is_file():
            raise FileNotFoundError(f"prompts file {path} not found")
        if file.suffix == ".txt":
            prompts = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif file.suffix == ".jsonl":
            prompts = [_jsonl_prompt(line, file, i + 1)
                       for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()) if line.strip()]
        else:
            raise ValueError(f"prompts file must end in .txt or .jsonl, got {path}")
        if not prompts:
            raise ValueError(f"prompts file {path} holds no prompts")
    return prompts[:num_prompts] if num_prompts else prompts


def _jsonl_prompt(line: str, file: Path, lineno: int) -> Prompt:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(item, str) and item:
        return item
    if isinstance(item, dict):
        ids = item.get("prompt_token_ids")
        if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
            return {"prompt_token_ids": ids}
        for key in ("prompt", "text"):
            if isinstance(item.get(key), str) and item[key]:
                return item[key]
    raise ValueError(f"{file}:{lineno}: expected a non-empty string or an object with "
                     f"'prompt', 'text' or 'prompt_token_ids', got {line[:60]!r}")


def display_width(text: str) -> int:
    """Terminal columns of `text`: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def prompt_label(prompt: Prompt, width: int = 28) -> str:
    """A one-line preview of a prompt, at most `width` terminal columns, for tables."""
    text = prompt if isinstance(prompt, str) else f"ids {prompt['prompt_token_ids'][:6]}"
    text = " ".join(text.split())
    if display_width(text) <= width:
        return text
    while display_width(text) > width - 3:
        text = text[:-1]
    return text + "..."


# --------------------------------------------------------------------------- comparison
def compare_prompt(a, b) -> dict[str, Any]:
    """Metrics of one prompt's logits a, b: [len, V] tensors of the same shape."""
    import torch

    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    a64, b64 = a.double(), b.double()
    top_a, top_b = a64.argmax(-1), b64.argmax(-1)                             # [len]
    agree = top_a == top_b
    # a flip between near-tied tokens (common with bf16, or random dummy weights) still
    # keeps each side's choice among the other's top 5, as vLLM's logprob checks accept
    k = min(TOP_K, a.shape[-1])
    near = ((a64.topk(k, -1).indices == top_b[:, None]).any(-1)
            & (b64.topk(k, -1).indices == top_a[:, None]).any(-1))           # [len]
    log_pa, log_pb = torch.log_softmax(a64, -1), torch.log_softmax(b64, -1)
    kl = (log_pa.exp() * (log_pa - log_pb)).sum(-1).clamp_min(0.0)            # [len]
    mismatches = (~agree).nonzero().flatten()
    return {"tokens": int(a.shape[0]), "top1_agree": int(agree.sum()),
            "top1_agreement": float(agree.double().mean()), "top1_in_top5": int(near.sum()),
            "max_abs_diff": float((a64 - b64).abs().max()),
            "mean_kl": float(kl.mean()), "kl_sum": float(kl.sum()),
            "first_mismatch": int(mismatches[0]) if len(mismatches) else None}


def compare_runs(a: dict, b: dict, prompts: list[Prompt]) -> list[dict[str, Any]]:
    """Per-prompt rows from two worker results (each {"token_ids": [...], "logits": [...]})."""
    if len(a["logits"]) != len(prompts) or len(b["logits"]) != len(prompts):
        raise ValueError(f"expected logits for {len(prompts)} prompts, got {len(a['logits'])} "
                         f"from setup A and {len(b['logits'])} from setup B")
    rows = []
    for i, prompt in enumerate(prompts):
        if a["token_ids"][i] != b["token_ids"][i]:
            raise ValueError(f"prompt {i} was tokenized differently by the two setups "
                             f"({len(a['token_ids'][i])} vs {len(b['token_ids'][i])} tokens); "
                             f"compare setups that share a tokenizer and max-model-len")
        if a["logits"][i].shape[-1] != b["logits"][i].shape[-1]:
            raise ValueError(f"vocabulary sizes differ: A {a['logits'][i].shape[-1]} vs "
                             f"B {b['logits'][i].shape[-1]}")
        row = compare_prompt(a["logits"][i], b["logits"][i])
        rows.append({"index": i, "prompt": prompt_label(prompt), **row})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over all positions of all prompts (not a mean of per-prompt means)."""
    tokens = sum(r["tokens"] for r in rows)
    agree = sum(r["top1_agree"] for r in rows)
    return {"prompts": len(rows), "tokens": tokens, "top1_agreement": agree / tokens,
            "top1_mismatch": (tokens - agree) / tokens,
            "top1_in_top5": sum(r["top1_in_top5"] for r in rows) / tokens,
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "mean_kl": sum(r["kl_sum"] for r in rows) / tokens}


def check(summary: dict[str, Any], limits: Thresholds) -> list[str]:
    """One message per threshold the summary is beyond; empty when all hold."""
    failures = []
    if limits.max_top1_mismatch is not None and summary["top1_mismatch"] > limits.max_top1_mismatch:
        failures.append(f"top-1 mismatch {summary['top1_mismatch']:.4f} > {limits.max_top1_mismatch}")
    if limits.max_abs_diff is not None and summary["max_abs_diff"] > limits.max_abs_diff:
        failures.append(f"max |d logit| {summary['max_abs_diff']:.4g} > {limits.max_abs_diff}")
    if limits.max_kl is not None and summary["mean_kl"] > limits.max_kl:
        failures.append(f"mean KL {summary['mean_kl']:.4g} > {limits.max_kl}")
    return failures


# --------------------------------------------------------------------------- running the setups
def score_setup(engine_args: dict, prompts: list[Prompt]) -> dict:
    """Build the engine of one setup, score the prompts (each cut to what one step takes) and
    shut the engine down: token ids, logits (fp32, CPU), timings, how many prompts were cut."""
    from deepserve import LLM

    start = time.perf_counter()
    with LLM(**engine_args) as llm:             # shut down on the way out, failed or not
        load_s = time.perf_counter() - start
        engine = llm.engine
        limit = min(engine.max_model_len, engine.config.scheduler.max_num_batched_tokens)
        token_ids, truncated = [], 0
        for prompt in prompts:
            ids = engine.tokenize_prompt(prompt)[1]
            if not ids:
                raise ValueError(f"prompt {prompt_label(prompt)!r} has no tokens")
            truncated += len(ids) > limit
            token_ids.append(ids[:limit])
        start = time.perf_counter()
        logits = [t.float().cpu().contiguous() for t in llm.prompt_logits([{"prompt_token_ids": ids}
                                                                          for ids in token_ids])]
        score_s = time.perf_counter() - start
    return {"token_ids": token_ids, "logits": logits, "load_seconds": load_s, "score_seconds": score_s,
            "truncated": truncated}


def release_device_memory() -> None:
    """Free what a finished engine left: its model and CUDA graphs sit in reference cycles."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def process_reason(setups: dict[str, dict], concurrent: bool, timeout: Optional[float],
                   isolate: bool = False) -> Optional[str]:
    """Why the setups must run in processes of their own, or None (both run in this one)."""
    if isolate:
        return "--isolate asks for it"
    if concurrent:
        return "--concurrent runs the setups at once"
    if timeout is not None:
        return "--setup-timeout stops a setup that overruns, which only a process allows"
    from deepserve.config import EngineArgs
    from deepserve.platforms import get_platform
    for name, kwargs in setups.items():
        args = EngineArgs(**kwargs)
        ops = get_platform(args.device).default_ops if args.ops == "auto" else args.ops
        if ops == "flaggems":
            return f"setup {name} runs FlagGems, which patches aten for the whole process"
    return None


def run_in_process(setups: dict[str, dict], prompts: list[Prompt]) -> dict[str, dict]:
    """Results of each named setup, built and scored in this process one after the other; a
    setup that fails is a ValueError naming it, in one line."""
    results = {}
    for name, kwargs in setups.items():
        try:
            results[name] = score_setup(kwargs, prompts)
            release_device_memory()       # the next setup may use the whole device
        except Exception as exc:  # noqa: BLE001  (any failure is the setup's, reported as one line)
            if os.environ.get("DEEPSERVE_DEBUG"):
                raise
            raise ValueError(f"setup {name} failed: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
    return results


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")


def failure_reason(log: str) -> str:
    """One line saying why a worker failed: its last output line, plus the first exception
    in the log when that differs (with TP the root cause is in a rank's traceback, and the
    last line only says that the rank died)."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    if not lines:
        return ""
    first = next((line for line in lines if _EXCEPTION_LINE.match(line)), None)
    if first and first != lines[-1]:
        return f"{lines[-1]} (first error: {first})"
    return lines[-1]


class SetupProcess:
    """One setup scoring the prompts in a fresh Python process (stdout and stderr go to a
    log file, so two processes at once can never block on a full pipe)."""

    def __init__(self, name: str, engine_kwargs: dict, prompts: list[Prompt], workdir: Path):
        self.name = name
        spec = workdir / f"setup_{name}.json"
        self.output = workdir / f"setup_{name}.pt"
        self.log = workdir / f"setup_{name}.log"
        spec.write_text(json.dumps({"name": name, "engine_args": engine_kwargs, "prompts": prompts,
                                    "output": str(self.output)}))
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # importable without pip install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "deepserve.engine.validate", "--worker", str(spec)]
        with open(self.log, "wb") as log:
            # its own session: stop() can end the worker together with any TP rank processes
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def result(self, timeout: Optional[float] = None) -> dict:
        """Wait for the process; its saved results. Raises ValueError naming the setup, with
        the worker's last output line, when it fails or outlives `timeout` seconds."""
        import torch

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            last = failure_reason(self.log.read_text(errors="replace"))
            raise ValueError(f"setup {self.name}: no result within {timeout:g} s; stopped it"
                             + (f" (last output: {last})" if last else "")) from None
        if code != 0 or not self.output.is_file():
            reason = failure_reason(self.log.read_text(errors="replace")) or f"worker exited with code {code}"
            raise ValueError(f"setup {self.name} failed: {reason}")
        return torch.load(self.output, weights_only=True)

    def stop(self) -> None:
        """End the worker's process group (the worker and the ranks it started)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended between poll() and killpg()
            self.proc.wait()


def run_setups(setups: dict[str, dict], prompts: list[Prompt], workdir: Path,
               concurrent: bool = False, timeout: Optional[float] = None) -> dict[str, dict]:
    """Results of each named setup, each in a process of its own: one process after the other
    (each may then use the whole device), or all at once when `concurrent`. `timeout` bounds
    each setup."""
    results: dict[str, dict] = {}
    started: list[SetupProcess] = []
    try:
        if concurrent:
            started = [SetupProcess(name, kwargs, prompts, workdir) for name, kwargs in setups.items()]
            deadline = None if timeout is None else time.monotonic() + timeout
            for proc in started:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                results[proc.name] = proc.result(left)
        else:
            for name, kwargs in setups.items():
                started.append(SetupProcess(name, kwargs, prompts, workdir))
                results[name] = started[-1].result(timeout)
    finally:
        for proc in started:  # a failed setup ends the run: stop the other one too
            proc.stop()
    return results


def _worker(spec_path: str) -> int:
    """Subprocess side: build the engine, score the prompts, save the logits."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    result = score_setup(spec["engine_args"], spec["prompts"])
    out = Path(spec["output"])
    tmp = out.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.rename(out)  # the parent sees either nothing or a complete file
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m deepserve.engine.validate --worker SPEC.json", file=sys.stderr)
        return 2
    try:
        return _worker(argv[1])
    except Exception as exc:  # noqa: BLE001  (the parent reports any failure as one line)
        if os.environ.get("DEEPSERVE_DEBUG"):
            raise
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
