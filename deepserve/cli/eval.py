"""`deepserve eval`: accuracy of any OpenAI-compatible endpoint; `eval compare`: do runs differ?

    deepserve eval --base-url http://host:8000 --model deepseek-r1 \\
        --tasks gsm8k,math500,aime24,gpqa_diamond,mmlu,mmlu_pro,ceval --data-path ./datasets
    deepserve eval compare official.json ours.json

Defaults follow DeepSeek-R1's published evaluation (temperature 0.6, top-p 0.95, 32768
generated tokens, pass@1 over --num-samples); against a server whose context (the
max_model_len its /v1/models lists) is no larger than 32768 tokens no max_tokens is sent, so
each reply may use what its prompt leaves. Rerunning an interrupted command resumes from its
reply cache (`<output>.cache.jsonl`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

from deepserve.cli.arg_types import int_at_least
from deepserve.evals.datasets import LAYOUT
from deepserve.server.vllm_flags import add_refused_flags, check_refused
from deepserve.evals.tasks import DEFAULT_TASKS, TASKS, parse_tasks

R1_MAX_TOKENS = 32768   # generated tokens a reply may take in DeepSeek-R1's published evaluation

DATA_LAYOUT = ("--data-path holds one folder per task: "
               + ", ".join(f"{path} ({name})" for name, path in LAYOUT.items()) + ".")


# lm-evaluation-harness flags (`lm_eval --model local-chat-completions --model_args base_url=...`) a
# user may bring: each is parsed, whatever its values, and refused in one line saying what to use.
LM_EVAL_REFUSED = {
    "--model-args": "is lm-eval's; deepserve eval takes --base-url, --model (the served name) and --api-key",
    "--gen-kwargs": "is lm-eval's; deepserve eval takes --temperature, --top-p, --max-tokens and --seed",
    "--num-fewshot": "is not supported: the tasks run zero-shot, as DeepSeek-R1's evaluation",
    "--fewshot-as-multiturn": "is not supported: the tasks run zero-shot, as DeepSeek-R1's evaluation",
    "--batch-size": "is not supported: requests are sent concurrently (--max-concurrency, default 32)",
    "--max-batch-size": "is not supported: requests are sent concurrently (--max-concurrency, default 32)",
    "--device": "is not supported: deepserve eval measures a running server (--base-url)",
    "--log-samples": "is not supported: every reply is kept in the reply cache (--cache)",
    "--write-out": "is not supported: every reply is kept in the reply cache (--cache)",
    "--use-cache": "is lm-eval's; deepserve eval keeps its replies in --cache (default <output>.cache.jsonl)",
    "--include-path": "is not supported: the tasks are deepserve eval's own (--tasks)",
    "--system-instruction": "is not supported: the prompts are DeepSeek-R1's evaluation prompts",
    **{flag: "is lm-eval's, which deepserve eval does not have"
       for flag in ("--samples", "--predict-only", "--check-integrity", "--show-config", "--verbosity",
                    "--cache-requests", "--wandb-args", "--wandb-config-args", "--hf-hub-log-args",
                    "--confirm-run-unsafe-code", "--metadata")},
}
# lm-eval's --model names the kind of model, where deepserve eval's names the served model
LM_EVAL_MODEL_TYPES = ("local-completions", "local-chat-completions", "openai-completions",
                       "openai-chat-completions", "vllm", "hf", "sglang")


_positive = int_at_least(1)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="accuracy of an OpenAI-compatible endpoint (GSM8K, MATH-500, AIME, ...)",
        description=__doc__ + "\n" + DATA_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="server root or its /v1, e.g. http://localhost:8000")
    p.add_argument("--model", help="served model name sent in each request (default: the server's model, "
                   "when /v1/models lists one)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, from: {', '.join(TASKS)} (default: %(default)s)")
    p.add_argument("--data-path", type=Path, help="root folder of the datasets (see above)")
    p.add_argument("--num-samples", type=_positive, default=1,
                   help="samples per question; pass@1 is averaged over them (default 1)")
    p.add_argument("--limit", type=_positive, default=None, help="first N questions of each task")
    p.add_argument("--max-concurrency", type=_positive, default=32, help="requests in flight (32)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=_positive, default=None,
                   help=f"generated tokens per reply (default {R1_MAX_TOKENS}; none sent where the server's "
                        "context is no larger: each reply may use what its prompt leaves)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed sent to the server (seed + sample index per request)")
    p.add_argument("--output", "--output-path", dest="output", default=None,
                   help="result JSON, or a folder (one that exists, or a path ending in /) for "
                        "<model>__<host>.json (default ./eval-results/); a .md table is written beside it "
                        "(--output-path: lm-eval's spelling)")
    p.add_argument("--cache", type=Path, default=None,
                   help="reply cache JSONL (default <output>.cache.jsonl)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=8,
                   help="retries of a request on connection errors, 429 and 5xx (default 8)")
    p.add_argument("--retry-backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry (default 1)")
    p.add_argument("--math-timeout", type=float, default=5.0,
                   help="seconds of symbolic checking per math answer; one that runs out is "
                        "scored wrong and counted (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # lm-eval's --apply-chat-template is what deepserve eval always does (chat completions)
    add_refused_flags(p, LM_EVAL_REFUSED, switches=("--apply-chat-template",))
    p.set_defaults(func=run_handler)

    sub = p.add_subparsers(dest="eval_command", metavar="compare")
    c = sub.add_parser("compare", help="side-by-side table of several eval results with deltas",
                       description="Compare eval result JSONs against the first one, with a "
                                   "paired test per task on the items they share.")
    c.add_argument("results", nargs="+", type=Path, help="result JSON files; the first is the "
                                                          "baseline")
    c.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    c.add_argument("--output", default=None,
                   help="also write the comparison as JSON here, or as compare.json in a folder "
                        "(one that exists, or a path ending in /; Markdown beside it)")
    c.set_defaults(func=compare_handler)


def output_file(output: str, name: str) -> Path:
    """--output as given: a folder (one that exists, or written with a trailing separator as
    lm-eval's `--output_path ./results/`) holds `name`; any other path is the file itself."""
    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        return path / name
    return path


def default_output(base_url: str, model: str) -> Path:
    from deepserve.evals.client import api_root

    host = urlparse(api_root(base_url)).netloc
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{host}").strip("._")   # no hidden "..x.json"
    return Path("eval-results") / f"{name}.json"


def served_model(base_url: str, api_key: str | None) -> str:
    """The model to evaluate when --model is not given: the server's only one, as /v1/models lists it."""
    from deepserve.bench.serve import served_models

    names = served_models(argparse.Namespace(base_url=base_url, api_key=api_key))
    if len(names) > 1:
        raise ValueError(f"the server serves {', '.join(names)}: choose one with --model")
    print(f"eval: model {names[0]!r} (the server's; --model chooses)", file=sys.stderr)
    return names[0]


def reply_budget(base_url: str, api_key: str | None, model: str) -> int | None:
    """--max-tokens' default: R1's 32768, or None (no max_tokens sent) where the server lists
    `model` with a context of at most that many tokens, which no prompt would leave room for
    (every request was a 400)."""
    from deepserve.bench.serve import model_cards

    try:
        cards = model_cards(argparse.Namespace(base_url=base_url, api_key=api_key))
    except ValueError:   # no /v1/models (not every OpenAI-compatible server has one)
        return R1_MAX_TOKENS
    context = next((card.get("max_model_len") for card in cards if card["id"] == model), None)
    if not isinstance(context, int) or context > R1_MAX_TOKENS:
        return R1_MAX_TOKENS
    print(f"eval: the server's context is {context} tokens, no more than the {R1_MAX_TOKENS} generated "
          "tokens R1's evaluation allows: no max_tokens is sent, each reply may use what its prompt leaves "
          "(--max-tokens sets one)", file=sys.stderr)
    return None


def check_not_lm_eval_type(model: str, base_url: str, api_key: str | None) -> None:
    """--model `model` (one of lm-eval's model kinds) is refused where the server does not serve a
    model of that name: every request would be a 404."""
    from deepserve.bench.serve import served_models

    try:
        names = served_models(argparse.Namespace(base_url=base_url, api_key=api_key))
    except ValueError:
        return
    if model not in names:
        raise ValueError(f"--model {model} is lm-eval's kind of model; deepserve eval's --model is the served "
                         f"model's name ({', '.join(names)}; left out: the server's), with --base-url for "
                         "lm-eval's base_url")


def run_handler(args) -> int:
    # the HTTP client and the runner are imported here, not when every `deepserve` command
    # builds its parser (a server process has no use for them)
    from deepserve.evals.client import SamplingSettings
    from deepserve.evals.report import markdown_table, write_result
    from deepserve.evals.runner import EvalOptions, run_eval

    check_refused(args, LM_EVAL_REFUSED, served={}, message="{flag} {why}")
    missing = [flag for flag, value in (("--base-url", args.base_url), ("--data-path", args.data_path)) if not value]
    if missing:
        raise ValueError(f"deepserve eval needs {', '.join(missing)} "
                         "(or use `deepserve eval compare A.json B.json`)")
    from deepserve.cli.bench import check_reachable
    from deepserve.evals.client import api_root, server_url

    tasks = parse_tasks(args.tasks)   # the user's own inputs first, before any request
    if not args.data_path.is_dir():
        raise FileNotFoundError(f"--data-path {args.data_path} is not a directory")
    args.base_url = server_url(args.base_url)
    check_reachable(api_root(args.base_url))    # else every request is retried for minutes
    if args.model in LM_EVAL_MODEL_TYPES:
        check_not_lm_eval_type(args.model, args.base_url, args.api_key)
    args.model = args.model or served_model(args.base_url, args.api_key)
    if args.max_tokens is None:
        args.max_tokens = reply_budget(args.base_url, args.api_key, args.model)
    settings = SamplingSettings(model=args.model, temperature=args.temperature,
                                top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    output = default_output(args.base_url, args.model)
    if args.output:
        output = output_file(args.output, output.name)
    cache = args.cache or output.with_suffix(".cache.jsonl")
    for path in (output, cache):   # a folder that cannot be made fails now, not after the run
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot write {path}: cannot make the folder {exc.filename} "
                             f"({exc.strerror})") from None
    opts = EvalOptions(base_url=args.base_url, settings=settings, tasks=tasks,
                       data_path=args.data_path, cache_path=cache, num_samples=args.num_samples,
                       limit=args.limit, max_concurrency=args.max_concurrency,
                       api_key=args.api_key, request_timeout=args.request_timeout,
                       max_retries=args.max_retries, retry_backoff=args.retry_backoff,
                       progress=not args.no_progress, math_timeout=args.math_timeout)
    try:
        result = run_eval(opts)
    except KeyboardInterrupt:
        print(f"\neval: interrupted; the replies so far are kept in {cache}: rerun the same command "
              "to resume", file=sys.stderr)
        raise
    try:
        json_path, md_path = write_result(result, output)
    except OSError as exc:
        raise ValueError(f"cannot write {exc.filename}: {exc.strerror}; the replies are kept: rerun with "
                         f"another --output and --cache {cache}") from None
    req = result["requests"]
    print(markdown_table(result), end="")
    for name, task in result["tasks"].items():
        if task["n_truncated"]:
            limit = "the server's context" if args.max_tokens is None else f"--max-tokens {args.max_tokens}"
            cut = "; those cut inside their reasoning have no answer" if result.get("reasoning") else \
                " and were scored as given"
            print(f"note: {name}: {task['n_truncated']} of {task['n_samples']} replies hit "
                  f"{limit}{cut}", file=sys.stderr)
        if task.get("n_failed"):
            print(f"note: {name}: {task['n_failed']} of {task['n_samples']} requests were refused "
                  f"and scored wrong (rerun to send them again); first: {task['first_error']}",
                  file=sys.stderr)
        if task.get("n_timeouts"):
            print(f"note: {name}: {task['n_timeouts']} of {task['n_samples']} answers ran out of "
                  f"--math-timeout {args.math_timeout:g} s and were scored wrong", file=sys.stderr)
    print(f"\n{req['total']} requests ({req['from_cache']} from cache, {req['retries']} retries)"
          f"; results: {json_path}, {md_path}", file=sys.stderr)
    return 0


def compare_handler(args) -> int:
    from deepserve.evals.report import compare, compare_markdown, load_result

    paths = [str(p) for p in args.results]
    results = [load_result(p) for p in paths]
    comparison = compare(results, paths, alpha=args.alpha)
    table = compare_markdown(comparison)
    print(table, end="")
    if args.output:
        from deepserve.bench.results import check_result_path, write_result

        output = output_file(args.output, "compare.json")
        check_result_path(output, "--output")
        write_result(output, json.dumps(comparison, indent=1) + "\n")
        write_result(output.with_suffix(".md"), table)
    return 0
