"""`deepserve validate`: do two engine setups give the same logits on the same prompts?

    deepserve validate --model M [common engine flags] --a "--ops torch" --b "--ops triton"
        [--prompts FILE.jsonl|txt] [--num-prompts N] [--max-top1-mismatch 0.0]
        [--max-abs-diff X] [--max-kl Y] [--output report.json]

Setup A is the common engine flags plus --a's flags, setup B the common flags plus --b's
(e.g. `--dtype bfloat16` vs `--quantization fp8`, `--tensor-parallel-size 1` vs `2`). They
run one after the other in this process (each engine has its own op table), so both may use
the whole device; each runs in a process of its own with --concurrent (both at once),
--setup-timeout (a process can be stopped), --isolate, or when a setup runs FlagGems (it
patches aten for the whole process). The report
gives top-1 agreement, "in top5" (each side's top-1 among the other's five largest logits),
max |d logit| and mean KL(A||B) per prompt and over all positions.

Thresholds: by default any top-1 flip fails. bf16 rounding flips near-tied tokens, and
random weights (`--load-format dummy`, presets) give near-flat distributions where flips
are common, so compare such setups with `--max-top1-mismatch 0.05 --max-kl 1e-3` or similar.

Exit codes: 0 within the thresholds, 1 beyond them, 2 when a flag is wrong or a setup
fails to start. A single flag needs `=`: `--a=--enforce-eager`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shlex
import tempfile
from pathlib import Path

from deepserve.config import EngineArgs


class _SetupParser(argparse.ArgumentParser):
    """Parses one setup's engine flags; raises instead of exiting so the error names the setup."""

    def error(self, message):
        raise ValueError(message)


def register(subparsers) -> None:
    p = subparsers.add_parser("validate", help="Compare the logits of two engine setups (e.g. "
                              "--ops torch vs triton, bf16 vs fp8, TP=1 vs TP=2).",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    v = p.add_argument_group("validate")
    v.add_argument("--a", dest="setup_a", default="", metavar="FLAGS",
                   help="Engine flags of setup A, one quoted string, e.g. \"--ops torch\".")
    v.add_argument("--b", dest="setup_b", default="", metavar="FLAGS",
                   help="Engine flags of setup B, e.g. \"--ops triton\".")
    v.add_argument("--prompts", default=None, metavar="FILE",
                   help=".txt (one prompt per line) or .jsonl (\"prompt\" / \"text\" / "
                   "\"prompt_token_ids\"); default: a built-in list of varied texts.")
    v.add_argument("--num-prompts", type=int, default=None, help="Use only the first N prompts.")
    v.add_argument("--max-top1-mismatch", type=float, default=0.0,
                   help="Largest share of positions whose argmax may differ (default: 0.0).")
    v.add_argument("--max-abs-diff", type=float, default=None,
                   help="Largest |logit A - logit B| allowed (default: not checked).")
    v.add_argument("--max-kl", type=float, default=None,
                   help="Largest mean KL(A||B) over positions, in nats (default: not checked).")
    v.add_argument("--setup-timeout", type=float, default=None,
                   help="Seconds one setup may take to load and score (default: no limit).")
    v.add_argument("--concurrent", action="store_true",
                   help="Run both setups at once, a process each (when the device holds both); default: one "
                        "after the other.")
    v.add_argument("--isolate", action="store_true",
                   help="Run each setup in a process of its own (default: in this process unless --concurrent, "
                        "--setup-timeout or FlagGems needs processes).")
    v.add_argument("--output", default=None, help="Write the full report as JSON here.")
    e = p.add_argument_group("common engine flags (vLLM names), shared by both setups")
    EngineArgs.add_cli_args(e)
    p.set_defaults(func=run)
    p.error = functools.partial(_setup_flags_error, p.error)


def _setup_flags_error(error, message: str):
    """The parser's error, with the spelling a lone flag as a setup's value needs: argparse takes
    `--a --enforce-eager` for two flags, and `--a` is left without a value."""
    for name in ("--a", "--b"):
        if message == f"argument {name}: expected one argument":
            message += f" (a single flag as its value takes '=': {name}=--enforce-eager)"
    error(message)


def setup_kwargs(name: str, common: dict, flags: str) -> tuple[dict, list[str]]:
    """Engine kwargs of one setup (common flags overridden by its own) and its flag list."""
    try:
        argv = shlex.split(flags)
    except ValueError as exc:
        raise ValueError(f"setup {name}: cannot split flags {flags!r} ({exc})") from None
    parser = _SetupParser(prog=f"setup {name}", add_help=False)
    EngineArgs.add_cli_args(parser)
    try:
        ns = parser.parse_args(argv)
    except ValueError as exc:
        raise ValueError(f"setup {name}: bad flags {flags!r}: {exc}") from None
    own = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(ns, f.name)}
    kwargs = {**common, **own}
    try:  # bad values and missing models fail here, before a process is spent on them
        EngineArgs(**kwargs).create_engine_config()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ValueError(f"setup {name}: {exc}") from None
    return kwargs, argv


def format_table(report: dict) -> str:
    from deepserve.engine.validate import display_width

    rows = report["prompts"]
    width = max([display_width(r["prompt"]) for r in rows] + [6])
    head = (f"{'#':>3}  {'prompt':<{width}}  {'tokens':>6}  {'top-1':>7}  {'in top5':>7}  "
            f"{'max|d|':>9}  {'KL(A||B)':>9}  first diff")
    lines = [head, "-" * len(head)]
    for r in rows:
        first = "-" if r["first_mismatch"] is None else str(r["first_mismatch"])
        label = r["prompt"] + " " * (width - display_width(r["prompt"]))
        near = 100 * r["top1_in_top5"] / r["tokens"]
        lines.append(f"{r['index']:>3}  {label}  {r['tokens']:>6}  {100 * r['top1_agreement']:>6.2f}%  "
                     f"{near:>6.2f}%  {r['max_abs_diff']:>9.3g}  {r['mean_kl']:>9.3g}  {first}")
    s = report["summary"]
    lines.append("-" * len(head))
    lines.append(f"{'all':>3}  {'':<{width}}  {s['tokens']:>6}  {100 * s['top1_agreement']:>6.2f}%  "
                 f"{100 * s['top1_in_top5']:>6.2f}%  {s['max_abs_diff']:>9.3g}  {s['mean_kl']:>9.3g}")
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    lines.append(f"A = {report['setups']['A']['flags'] or '(common flags only)'}   "
                 f"B = {report['setups']['B']['flags'] or '(common flags only)'}")
    lines.append(verdict)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from deepserve.engine.validate import (Thresholds, check, compare_runs, load_prompts, process_reason,
                                           run_in_process, run_setups, summarize)

    limits = Thresholds(args.max_top1_mismatch, args.max_abs_diff, args.max_kl)
    if args.setup_timeout is not None and args.setup_timeout <= 0:
        raise ValueError(f"--setup-timeout must be > 0, got {args.setup_timeout}")
    if args.output:
        check_output(Path(args.output))
    prompts = load_prompts(args.prompts, args.num_prompts)
    common = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(args, f.name)}
    setups = {name: setup_kwargs(name, common, flags) for name, flags in (("A", args.setup_a), ("B", args.setup_b))}
    engine_args = {name: kwargs for name, (kwargs, _) in setups.items()}
    processes = process_reason(engine_args, args.concurrent, args.setup_timeout, args.isolate)
    if processes is None:
        results = run_in_process(engine_args, prompts)
    else:
        with tempfile.TemporaryDirectory(prefix="deepserve-validate-") as tmp:
            results = run_setups(engine_args, prompts, Path(tmp), args.concurrent, args.setup_timeout)
    rows = compare_runs(results["A"], results["B"], prompts)
    summary = summarize(rows)
    failures = check(summary, limits)
    report = {
        "setups": {name: {"flags": shlex.join(argv), "engine_args": kwargs,
                          "load_seconds": results[name]["load_seconds"],
                          "score_seconds": results[name]["score_seconds"],
                          "truncated_prompts": results[name]["truncated"]}
                   for name, (kwargs, argv) in setups.items()},
        "setup_processes": processes,     # why each setup had a process of its own (None: this one)
        "thresholds": dataclasses.asdict(limits), "summary": summary, "prompts": rows,
        "passed": not failures, "failures": failures,
    }
    print(format_table(report))
    if args.output:
        out = Path(args.output)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise ValueError(f"cannot write --output {out}: {exc.strerror or exc}") from None
    return 0 if not failures else 1


def check_output(out: Path) -> None:
    """Refuse an --output path that cannot become a file, before the setups spend their time."""
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder; name a file, e.g. {out / 'report.json'}")
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"--output {out}: {blocking} is a file, not a folder")
