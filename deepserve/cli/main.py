"""`deepserve` entry point: one sub-command per module of this package.

Each module `deepserve/cli/<name>.py` has `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed args; returns the exit code). Errors a user can fix are
printed as one line, never as a traceback (DEEPSERVE_DEBUG=1 shows it).

Flags are spelled as in vLLM, whose parser also takes underscores (`--pipeline_parallel_size=2`,
as the vLLM-MindSpore guide writes it) and unique prefixes (`--random-input` for
`--random-input-len`); `normalize_argv` turns the first into the second spelling, and vLLM's
dotted keys of a JSON flag (`--profiler-config.profiler torch`, `-O.cudagraph_mode FULL`) into
the flag's JSON.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import re
import sys
from pathlib import Path

from deepserve import __version__

# (sub-command module, in the order `deepserve --help` lists them)
COMMANDS = ["serve", "generate", "chat", "complete", "bench", "eval", "convert", "plan", "validate", "ops"]


class UserError(Exception):
    """An error in what the user asked for: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """A sub-command's parser (and its own sub-commands'): a bad value or an unknown flag is one
    line naming it, not the sub-command's whole usage above it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {self._unknown_flag_value(message) or message}\n")

    def _unknown_flag_value(self, message: str) -> str | None:
        """An unknown flag's value that argparse took for a sub-command of this one (`deepserve eval
        --foo 5`: "argument compare: invalid choice: '5'"), named as the unknown flag it follows."""
        m = re.fullmatch(r"argument [^:]+: invalid choice: '(.*)' \(choose from .*\)", message, re.S)
        argv = getattr(self, "_argv", None) or []
        if m is None or not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            return None
        known = {o for a in self._actions for o in a.option_strings}
        for i, arg in enumerate(argv[1:], 1):
            flag = argv[i - 1].split("=", 1)[0]
            if arg == m.group(1) and flag.startswith("-") and flag not in known:
                return f"unrecognized arguments: {argv[i - 1]} {arg}"
        return None

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(args) if args is not None else sys.argv[1:]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:   # else the top-level parser names them, after its usage line
            folder = next((e for e in extras if (Path(e) / "config.json").is_file()), None)
            takes_model = any("--model" in a.option_strings for a in self._actions)
            hint = f" (a model folder: pass it as --model {folder})" if folder and takes_model else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every sub-command's parser, or only `command`'s (one of COMMANDS): a command then imports
    only its own module's dependencies (`deepserve eval` and `deepserve bench` talk HTTP, and
    never import torch)."""
    parser = argparse.ArgumentParser(prog="deepserve", description="Serve, convert, benchmark and "
                                     "evaluate DeepSeek-R1 and its distilled models.")
    parser.add_argument("-v", "--version", action="version", version=__version__)   # as `vllm --version`
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name in [command] if command in COMMANDS else COMMANDS:
        try:
            module = importlib.import_module(f"deepserve.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deepserve.cli.{name}":
                continue  # sub-command not part of this build
            raise
        module.register(sub)
    return parser


_FLAG_NAME = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")


def normalize_argv(argv: list[str]) -> list[str]:
    """`--flag_name[=value]` -> `--flag-name[=value]`, as vLLM's FlexibleArgumentParser does.
    Only the flag's name changes; values (`--served-model-name deepseek_r1`) stay as given."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("-O."):   # vLLM's dotted -O: `-O.cudagraph_mode=FULL_DECODE_ONLY`
            arg = "--compilation-config" + arg[2:]
        elif arg == "-cc" or arg.startswith(("-cc=", "-cc.")):   # vLLM's other short --compilation-config
            arg = "--compilation-config" + arg[3:]
        elif arg.startswith("-O") and arg != "-O":   # vLLM's -O3 / -O=3: the optimization level
            out += ["--optimization-level", arg[3:] if arg[2] == "=" else arg[2:]]
            continue
        elif arg == "-O" and argv[i + 1:i + 2] in (["0"], ["1"], ["2"], ["3"]):   # -O 3 the same; -O '{..}' a config
            arg = "--optimization-level"
        name, sep, value = arg.partition("=")
        # a flag token only: a value that starts with "--" (validate's `--b "--hf-overrides '{...}'"`)
        # keeps its underscores
        if _FLAG_NAME.fullmatch(name):
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return _dotted_json(out)


_DOTTED_FLAG = re.compile(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)((?:\.[A-Za-z0-9_]+)+)")


def _dotted_json(argv: list[str]) -> list[str]:
    """vLLM's `--json-flag.key value` or `--json-flag.key=value` (`.a.b` nests): the keys of
    each flag merged into one `--json-flag '{...}'` at the end, as vLLM's parser does; a value
    is JSON where it parses as JSON (`false`, `3`), else the text."""
    out: list[str] = []
    merged: dict[str, dict] = {}
    i = 0
    while i < len(argv):
        name, sep, value = argv[i].partition("=")
        m = _DOTTED_FLAG.fullmatch(name)
        if m is None or (not sep and i + 1 == len(argv)):   # argparse names a missing value
            out.append(argv[i])
            i += 1
            continue
        if not sep:
            value = argv[i + 1]
        i += 1 if sep else 2
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = merged.setdefault(m.group(1).replace("_", "-"), {})
        *path, last = m.group(2)[1:].split(".")
        for key in path:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = value
    for flag, obj in merged.items():
        out += [flag, json.dumps(obj)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C ends any command with exit code 130 and no traceback, also while it still imports
    its modules (torch takes seconds).

    The heap is frozen at the process's exit (gc.freeze, before the interpreter's last
    collections): those walk every object it holds, torch's and transformers' included (a
    CPU-second where the command imported them), only to find next to no garbage; what they
    would have freed is released with the process."""
    atexit.unregister(gc.freeze)   # once, however often a process calls main
    atexit.register(gc.freeze)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


# dashes a document or chat app puts where `--` was typed: en / em dash, minus sign, ...
_PASTED_FLAG = re.compile(r"([\u2010-\u2015\u2212\ufe58\ufe63\uff0d]{1,2})([A-Za-z][A-Za-z0-9_-]*)(=.*)?", re.S)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of `parser` and of its sub-commands' parsers."""
    names = set()
    for action in parser._actions:
        names.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _option_strings(sub)
    return names


def check_pasted_dashes(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """A flag whose `--` a formatted page turned into a dash (`–max-model-len`, `—tp 8`) would be
    a positional to argparse: "unrecognized arguments: 512", or taken for the serve YAML. One line
    naming it instead, when its ASCII spelling (or a unique prefix of one) is a flag here."""
    flags = None
    for arg in argv:
        m = _PASTED_FLAG.fullmatch(arg)
        if m is None:
            continue
        flags = _option_strings(parser) if flags is None else flags
        name = m.group(2).replace("_", "-")
        long = f"--{name}"   # or a unique prefix of a long flag, which argparse takes too
        typed = long if long in flags or len([o for o in flags if o.startswith(long)]) == 1 else \
            f"-{name}" if f"-{name}" in flags else None
        if typed:
            raise UserError(f"{arg!r} begins with {m.group(1)!r} ({', '.join(f'U+{ord(c):04X}' for c in m.group(1))}), "
                            f"not ASCII hyphens (pasted from a formatted page?): type {typed}")


def _main(argv: list[str] | None) -> int:
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(argv[0] if argv else None)
    try:
        check_pasted_dashes(argv, parser)
    except UserError as exc:
        print(f"deepserve{f' {argv[0]}' if argv and argv[0] in COMMANDS else ''}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        if os.environ.get("DEEPSERVE_DEBUG"):
            raise       # the traceback, for a bug report
        # a KeyError's str() is the repr of its message, quotes included
        message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
        print(f"deepserve {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
