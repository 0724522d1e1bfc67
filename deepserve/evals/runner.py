"""Run an evaluation against an OpenAI-compatible endpoint and score it.

The run is a flat list of jobs (task, item, sample index). Jobs already in the reply cache
are skipped; the rest go to `max_concurrency` async workers, and each reply is written to
the cache the moment it arrives. Scores are then computed from the cache alone, so a resumed
run and an uninterrupted one produce the same numbers from the same replies. A request the
server refuses on its own (400, 413, 422: a prompt over the context, say) is not cached: it
scores 0, is counted per task (n_failed) and is sent again by the next run. A failure every
request would meet (401, 403, 404, retries exhausted; the same refusal of the first requests
before any reply; refusals of all of them) stops the run (replies so far stay cached;
rerunning the command resumes).

pass@1 with k samples (DeepSeek-R1 report): an item's score is the fraction of its k samples
that are correct; a task's score is the mean over items, with a 95 % interval over items.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from deepserve.evals.cache import ReplyCache, cache_key
from deepserve.evals.client import ChatClient, RequestFailed, SamplingSettings
from deepserve.evals import datasets
from deepserve.evals.datasets import Item
from deepserve.evals.extract import THINK_END, answer_text
from deepserve.evals.math_equiv import DEFAULT_TIMEOUT
from deepserve.evals.stats import mean_ci
from deepserve.evals.tasks import Task


@dataclass
class EvalOptions:
    """Everything one `deepserve eval` run needs (the CLI fills it from flags)."""
    base_url: str
    settings: SamplingSettings
    tasks: list[Task]
    data_path: Path
    cache_path: Path
    num_samples: int = 1
    limit: int | None = None
    max_concurrency: int = 32
    api_key: str | None = None
    request_timeout: float = 3600.0
    max_retries: int = 8
    retry_backoff: float = 1.0
    progress: bool = True
    math_timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.math_timeout <= 0:
            raise ValueError(f"--math-timeout must be > 0 seconds, got {self.math_timeout}")
        if self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.retry_backoff < 0:
            raise ValueError(f"--retry-backoff must be >= 0 seconds, got {self.retry_backoff}")
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if not Path(self.data_path).is_dir():
            raise FileNotFoundError(f"--data-path {self.data_path} is not a directory")


@dataclass
class Job:
    task: Task
    item: Item
    sample: int
    prompt: str
    key: str = field(default="")


def load_items(opts: EvalOptions) -> dict[str, list[Item]]:
    """Items per task, the first `limit` of each in file order."""
    items = {}
    for task in opts.tasks:
        try:
            loaded = task.load(Path(opts.data_path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"task {task.name}: {exc} (expected --data-path/"
                                    f"{datasets.LAYOUT[task.name]}; the layout of every task: "
                                    "`deepserve eval --help`)") from None
        if not loaded:
            raise ValueError(f"task {task.name}: no items found under {opts.data_path}")
        items[task.name] = list(loaded[:opts.limit] if opts.limit else loaded)
    return items


def build_jobs(opts: EvalOptions, items: dict[str, list[Item]]) -> list[Job]:
    jobs = []
    for task in opts.tasks:
        for item in items[task.name]:
            prompt = task.prompt(item)
            for sample in range(opts.num_samples):
                key = cache_key(task.name, item.id, sample, prompt, opts.settings)
                jobs.append(Job(task, item, sample, prompt, key))
    return jobs


FIRST_REFUSALS = 8   # identical refusals before any reply that stop the run (every request would get one)


async def _send_all(opts: EvalOptions, todo: list[Job], cache: ReplyCache, bar: tqdm,
                    refused: dict[str, str], any_cached: bool) -> int:
    """Run the jobs with bounded concurrency; returns the number of retries made. Requests the
    server refuses on their own are recorded in `refused` (key -> the server's message)."""
    client = ChatClient(opts.base_url, api_key=opts.api_key, timeout=opts.request_timeout,
                        max_retries=opts.max_retries, backoff=opts.retry_backoff,
                        max_connections=opts.max_concurrency)
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in todo:
        queue.put_nowait(job)

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            settings = opts.settings
            if settings.seed is not None:  # distinct but reproducible seeds per sample
                settings = replace(settings, seed=settings.seed + job.sample)
            started = time.time()
            try:
                reply = await client.chat([{"role": "user", "content": job.prompt}], settings)
            except RequestFailed as exc:
                if not exc.per_request:
                    raise
                refused[job.key] = str(exc)
                if not any_cached and len(refused) >= min(FIRST_REFUSALS, len(todo)) and \
                        len(set(refused.values())) == 1 and not any(j.key in cache for j in todo):
                    raise
                bar.update(1)
                continue
            cache.put({"key": job.key, "task": job.task.name, "item_id": job.item.id,
                       "sample": job.sample, **reply, "latency_s": round(time.time() - started, 3)})
            bar.update(1)

    workers = [asyncio.create_task(worker()) for _ in range(min(opts.max_concurrency, len(todo)))]
    try:
        # The first failure propagates; the other workers are cancelled in `finally`.
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await client.close()
    return client.retries_done


def thinks(records) -> bool:
    """Whether these replies come from a reasoning model: one of them has split reasoning or
    closed a `</think>`."""
    return any(r.get("reasoning_content") or THINK_END in (r.get("content") or "") for r in records)


def score_task(task: Task, items: list[Item], jobs: list[Job], cache: ReplyCache,
               math_timeout: float = DEFAULT_TIMEOUT, refused: dict[str, str] | None = None,
               reasoning: bool = False) -> dict:
    """Per-item and overall scores of one task, from cached replies. A reply whose math check
    ran out of `math_timeout` seconds scores 0 and is counted in n_timeouts (its item lists
    the sample in "timeouts"); a request the server refused (`refused`: key -> message) scores
    0 and is counted in n_failed (its item lists the sample in "failed"). With `reasoning` (the
    model thinks), a reply cut at the token limit before any `</think>` has no answer."""
    refused = refused or {}
    per_item: dict[str, dict] = {item.id: {"gold": item.gold, "scores": [], "preds": []}
                                 for item in items}
    truncated = unanswered = timeouts = failed = 0
    first_error = None
    for job in jobs:
        record = cache.get(job.key)
        if record is None and job.key in refused:
            entry = per_item[job.item.id]
            entry["scores"].append(0.0)
            entry["preds"].append(None)
            entry.setdefault("failed", []).append(job.sample)
            failed += 1
            first_error = first_error or refused[job.key]
            continue
        if record is None:
            raise RuntimeError(f"internal: no cached reply for {task.name}/{job.item.id} "
                               f"sample {job.sample} after the run")
        cut = reasoning and record.get("finish_reason") == "length"
        answer = answer_text(record.get("content"), record.get("reasoning_content"), unclosed=cut)
        score, pred, timed_out = task.score(job.item, answer, math_timeout)
        entry = per_item[job.item.id]
        entry["scores"].append(score)
        entry["preds"].append(pred)
        if timed_out:
            entry.setdefault("timeouts", []).append(job.sample)
            timeouts += 1
        truncated += record.get("finish_reason") == "length"
        unanswered += pred is None
    item_scores = []
    for entry in per_item.values():
        entry["score"] = sum(entry["scores"]) / len(entry["scores"])
        item_scores.append(entry["score"])
    mean, low, high = mean_ci(item_scores)
    return {"title": task.title, "score": 100 * mean, "ci95": [100 * low, 100 * high],
            "n_items": len(items), "n_samples": len(jobs), "n_truncated": truncated,
            "n_unanswered": unanswered, "n_timeouts": timeouts, "n_failed": failed,
            **({"first_error": first_error} if first_error else {}), "items": per_item}


def run_eval(opts: EvalOptions) -> dict:
    """Run (or resume) the evaluation; returns the result document (see report.py)."""
    started = time.time()
    items = load_items(opts)
    jobs = build_jobs(opts, items)
    cache = ReplyCache(opts.cache_path)
    todo = [job for job in jobs if job.key not in cache]
    retries = 0
    refused: dict[str, str] = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="eval", unit="req",
               disable=not opts.progress, dynamic_ncols=True)
    try:
        if todo:
            retries = asyncio.run(_send_all(opts, todo, cache, bar, refused,
                                            any_cached=len(todo) < len(jobs)))
    except RequestFailed as exc:
        done = sum(job.key in cache for job in jobs)
        raise RuntimeError(f"{exc} ({done}/{len(jobs)} replies are cached in "
                           f"{opts.cache_path}; rerun the same command to resume)") from None
    finally:
        bar.close()
        cache.close()
    if refused and not any(job.key in cache for job in jobs):
        raise RuntimeError(f"the server refused all {len(jobs)} requests; first: "
                           f"{next(iter(refused.values()))}")
    reasoning = thinks(cache.get(job.key) or {} for job in jobs)
    tasks = {}
    for task in opts.tasks:
        task_jobs = [job for job in jobs if job.task is task]
        tasks[task.name] = score_task(task, items[task.name], task_jobs, cache, opts.math_timeout,
                                      refused, reasoning)
    return {
        "format": "deepserve-eval/1",
        "model": opts.settings.model,
        "base_url": opts.base_url,
        "settings": asdict(opts.settings),
        "num_samples": opts.num_samples,
        "limit": opts.limit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 3),
        "requests": {"total": len(jobs), "from_cache": len(jobs) - len(todo),
                     "sent": len(todo), "retries": retries, "failed": len(refused)},
        "cache": str(opts.cache_path),
        "reasoning": reasoning,
        "tasks": tasks,
    }
