"""The deployment guides' commands, read literally from ../shared/reference/*.md, turned into
deepserve command lines (`vllm serve` -> `deepserve serve`, `benchmark_throughput.py` ->
`deepserve bench throughput`, ...) and scaled to a CPU: world sizes to <= 2, lengths short,
the model path to a tiny checkpoint. Everything else stays as the guide wrote it."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

# guide program (first words) -> deepserve sub-command
PROGRAMS = [(("vllm", "bench", "serve"), ["bench", "serve"]),
            (("vllm", "serve"), ["serve"]),
            (("vllm-mindspore", "serve"), ["serve"]),
            (("flagscale", "serve"), ["serve"]),
            (("benchmark_serving.py",), ["bench", "serve"]),
            (("benchmark_throughput.py",), ["bench", "throughput"]),
            (("benchmark_latency.py",), ["bench", "latency"])]
_START = re.compile(r"^\s*(vllm(-mindspore)? (serve|bench serve)|flagscale serve|python3 \S*benchmark_\w+\.py)\b")


def _joined_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    return out


def commands(path: Path) -> list[list[str]]:
    """Every serving / bench command of a guide, as argv (shell redirections dropped)."""
    found = []
    for line in _joined_lines(path.read_text()):
        if not _START.match(line):
            continue
        argv = shlex.split(line, comments=True)
        while len(argv) > 1 and re.fullmatch(r"\d?>.*|2>&1", argv[-1]):
            argv.pop()
        if len(argv) >= 2 and argv[-2] == ">":
            argv = argv[:-2]
        found.append(argv)
    return found


def exports(path: Path) -> dict[str, str]:
    """`export K=V` lines of a guide (the last one of each name)."""
    env = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*export ([A-Za-z_][A-Za-z0-9_]*)=(\S+)", line)
        if m:
            env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""
    return env


def curl_bodies(path: Path) -> list[tuple[str, dict]]:
    """(endpoint path, JSON body) of each `curl ... -d '{...}'` in a guide."""
    out = []
    lines = _joined_lines(path.read_text())
    for n, line in enumerate(lines):
        if not line.lstrip().startswith("curl "):
            continue
        for more in lines[n + 1:]:   # a quoted body may run over several lines
            try:
                argv = shlex.split(line)
                break
            except ValueError:
                line += "\n" + more
        url = next(a for a in argv if a.startswith("http"))
        body = argv[argv.index("-d") + 1]
        out.append(("/v1/" + url.split("/v1/", 1)[1], json.loads(body)))
    return out


def yaml_blocks(path: Path) -> list[str]:
    """Fenced code blocks of a guide, comments and `cd` lines before the content removed."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S)
    out = []
    for block in blocks:
        lines = block.splitlines()
        while lines and (lines[0].startswith(("cd ", "#")) or not lines[0].strip()):
            lines.pop(0)
        out.append("\n".join(lines) + "\n")
    return out


def to_deepserve(argv: list[str]) -> list[str]:
    """The guide's program replaced by the deepserve sub-command; the flags unchanged."""
    for words, sub in PROGRAMS:
        n = len(words)
        if len(words) == 1 and argv[0] == "python3" and argv[1].endswith(words[0]):
            return sub + argv[2:]
        if tuple(argv[:n]) == words:
            return sub + argv[n:]
    raise ValueError(f"not a guide command: {argv}")


def set_flags(argv: list[str], values: dict[str, object]) -> list[str]:
    """Replace the value of each flag in `values` (any of its spellings: `--a-b v`, `--a_b=v`,
    `-tp v`); a value of None drops the flag (and its value). Flags not present are not added."""
    out, i = [], 0
    aliases = {}
    for name, value in values.items():
        for spelling in name.split("|"):
            aliases[spelling] = value
    while i < len(argv):
        arg = argv[i]
        key, sep, _ = arg.partition("=")
        norm = key.replace("_", "-") if key.startswith("--") else key
        if norm in aliases:
            value = aliases[norm]
            takes_value = not sep and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            i += 2 if takes_value else 1
            if value is None:
                continue
            if value is True:
                out.append(key)
            else:
                out += [key + "=" + str(value)] if sep else [key, str(value)]
            continue
        out.append(arg)
        i += 1
    return out


def set_model(argv: list[str], model: str) -> list[str]:
    """The model path (serve's positional, or --model) replaced by `model`."""
    argv = list(argv)
    if argv[0] == "serve" and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1] = model
    return set_flags(argv, {"--model": model})
