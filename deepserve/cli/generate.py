"""`deepserve generate --prompt TEXT`: one completion from the offline engine, printed.

    deepserve generate --prompt "Once upon a time" --max-tokens 32 --temperature 0
    echo "Once upon a time" | deepserve generate       # the prompt from stdin (or --prompt -)

Engine flags are the same as `deepserve serve`'s (vLLM names; no --model: the demo model).
As LLM.generate, an output that --max-tokens would take past --max-model-len stops there.
`add_sampling_args` / `sampling_params_from_args` are shared with `deepserve chat`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepserve.config import EngineArgs


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"Tokens to generate (default {max_tokens}).")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default).")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 or -1: off.")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
    g.add_argument("--ignore-eos", action="store_true", help="Keep generating after EOS.")


def sampling_params_from_args(args: argparse.Namespace, **extra):
    from deepserve.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=list(args.stop), ignore_eos=args.ignore_eos, **extra)


def check_tokenizer(engine_args: EngineArgs, use: str) -> None:
    """Text in and out needs a tokenizer: a model folder without tokenizer.json (which the engine
    serves token ids only) is refused before it loads, saying what to pass."""
    if engine_args.tokenizer:
        return      # the tokenizer names its own file when it cannot read it
    folder = Path(str(engine_args.model))
    if (folder / "tokenizer.json").is_file():
        return
    slow = (" (tokenizer.model alone is not read: deepserve reads fast tokenizers)"
            if (folder / "tokenizer.model").is_file() else "")
    raise ValueError(f"model {engine_args.model} has no tokenizer.json{slow} to {use}: pass --tokenizer FOLDER")


def engine_from_args(args: argparse.Namespace, use: str = "encode the prompt"):
    from deepserve.cli.serve import check_in_process
    from deepserve.engine.llm_engine import LLMEngine

    engine_args = EngineArgs.from_cli_args(args)
    check_in_process(engine_args)   # before any rank starts
    check_tokenizer(engine_args, use)
    return LLMEngine(engine_args)


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Generate one completion offline and print it.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="Prompt text; '-' or none with stdin piped reads stdin "
                   "(one trailing newline dropped).")
    p.add_argument("--n", type=int, default=1, help="Completions to print, separated by blank lines.")
    add_sampling_args(p, max_tokens=64)
    EngineArgs.add_cli_args(p.add_argument_group("engine (vLLM flag names)"))
    p.set_defaults(func=run)


def utf8_text(text: str, source: str) -> str:
    """`text` as read from argv or stdin, which Python decodes with surrogateescape (argv always,
    stdin under a C locale): bytes that are not UTF-8 are refused there, naming the first, rather
    than failing in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = text[exc.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{source} is not UTF-8 text: byte 0x{byte[0]:02x} at character {exc.start}") from None
    return text


def read_prompt(prompt: str | None) -> str:
    """--prompt's text, or stdin's for `--prompt -` or for no --prompt with stdin piped."""
    if prompt is not None and prompt != "-":
        return utf8_text(prompt, "--prompt")
    if prompt is None and (sys.stdin is None or sys.stdin.isatty()):
        raise ValueError("no prompt: pass --prompt TEXT, or pipe it on stdin")
    text = utf8_text(sys.stdin.read(), "stdin")
    return text[:-1] if text.endswith("\n") else text


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args.prompt)
    if args.n > 1 and args.temperature == 0:   # SamplingParams refuses it too, naming no flag
        raise ValueError(f"--n {args.n} needs --temperature > 0: the default 0 is greedy, which gives one "
                         "completion only (n must be 1 when using greedy sampling)")
    params = sampling_params_from_args(args, n=args.n)
    engine = engine_from_args(args)
    request_id = engine.add_request(None, prompt, params)   # an output past max_model_len stops there
    final = None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    final = out
    except BaseException:
        engine.abort_request(request_id)
        raise
    texts = [o.text for o in sorted(final.outputs, key=lambda o: o.index)]
    print("\n\n".join(texts))
    return 0
