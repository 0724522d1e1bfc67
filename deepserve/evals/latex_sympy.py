"""LaTeX answers as sympy expressions, and their symbolic comparison.

The second stage of deepserve/evals/math_equiv.py. It imports nothing from deepserve (only
the standard library and sympy), so that `math_equiv.SympyWorker` runs it as a script in a
child process that starts quickly and can be killed when a comparison runs out of time. As a
script it answers JSON lines on stdin ([a, b]) with JSON lines on stdout (true / false).
"""
from __future__ import annotations

import cmath
import functools
import json
import re
import sys
from tokenize import TokenError

MAX_SYMPY_LEN = 300  # longer strings are not worth (or safe) to hand to sympy


@functools.cache
def _sympy():
    """sympy, its expression parser and the parser's transformations, imported on first use:
    the eval's own process imports this module for `braced` alone (through extract.py, which
    every `deepserve` command's parser loads), and the worker child imports sympy before it
    says it is ready, so no comparison's time limit pays for the import."""
    import sympy
    from sympy.parsing import sympy_parser as parser

    transforms = parser.standard_transformations + (parser.implicit_multiplication_application, parser.convert_xor)
    return sympy, parser.parse_expr, transforms


def braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the brace group opening at text[start] == '{', and the index after it."""
    assert text[start] == "{"
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            continue  # an escaped brace (\{ or \}) does not nest
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _replace_command(s: str, name: str, n_args: int, build) -> str:
    """Rewrite every `\\name{a}{b}` (n_args groups) with build(*args); innermost handled by recursion."""
    out, i = [], 0
    token = "\\" + name
    while True:
        j = s.find(token, i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        pos, args = j + len(token), []
        for _ in range(n_args):
            while pos < len(s) and s[pos] == " ":
                pos += 1
            if pos >= len(s) or s[pos] != "{":
                raise ValueError(f"malformed \\{name} in {s!r}")
            group = braced(s, pos)
            if group is None:
                raise ValueError(f"unbalanced braces in {s!r}")
            args.append(group[0])
            pos = group[1]
        out.append(build(*args))
        i = pos


def latex_to_sympy(s: str):
    """Parse a normalized LaTeX answer into a sympy expression; None when it is not one."""
    if len(s) > MAX_SYMPY_LEN or not s:
        return None
    sympy, parse_expr, transforms = _sympy()
    try:
        s = _latex_commands_to_py(s)
        if "\\" in s or "=" in s or "<" in s or ">" in s:
            return None
        names = {c: sympy.Symbol(c) for c in set(re.findall(r"[a-zA-Z]", s))}
        names.update({"pi": sympy.pi, "oo": sympy.oo, "sqrt": sympy.sqrt, "E": sympy.E,
                      "log": sympy.log, "ln": sympy.log, "sin": sympy.sin, "cos": sympy.cos,
                      "tan": sympy.tan, "i": sympy.I})
        return parse_expr(s, local_dict=names, transformations=transforms, evaluate=True)
    except (ValueError, TypeError, SyntaxError, AttributeError, ZeroDivisionError,
            OverflowError, RecursionError, NotImplementedError, sympy.SympifyError, TokenError):
        return None


def _latex_commands_to_py(s: str) -> str:
    """Rewrite \\frac, \\sqrt and \\sqrt[n] (nested in any order) into Python syntax."""
    s = re.sub(r"\\sqrt\[([^\]]+)\]\{", r"\\root{\1}{", s)
    s = _replace_command(s, "frac", 2, lambda a, b: f"(({_latex_commands_to_py(a)})/"
                                                    f"({_latex_commands_to_py(b)}))")
    s = _replace_command(s, "root", 2, lambda n, a: f"(({_latex_commands_to_py(a)})**"
                                                    f"(1/({_latex_commands_to_py(n)})))")
    s = _replace_command(s, "sqrt", 1, lambda a: f"sqrt({_latex_commands_to_py(a)})")
    return latex_to_py(s)


def latex_to_py(s: str) -> str:
    """Token-level LaTeX -> Python expression text (after \\frac and \\sqrt were rewritten)."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = s.replace("\\pi", " pi ").replace("\\infty", " oo ").replace("\\ln", " ln ")
    for fn in ("log", "sin", "cos", "tan"):
        s = s.replace("\\" + fn, f" {fn} ")
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    return s


def sympy_equal(a: str, b: str) -> bool:
    """Whether two normalized LaTeX answers are the same expression (exactly when either has
    free symbols or is an integer, else numerically to a relative 1e-6)."""
    ea, eb = latex_to_sympy(a), latex_to_sympy(b)
    if ea is None or eb is None:
        return False
    sympy = _sympy()[0]
    try:
        if ea.free_symbols or eb.free_symbols:
            return sympy.simplify(ea - eb) == 0
        va, vb = complex(sympy.N(ea)), complex(sympy.N(eb))
        if not (cmath.isfinite(va) and cmath.isfinite(vb)):
            return va == vb   # -oo is not oo (their difference is no small number)
        integers = [int(x) for x in (a, b) if re.fullmatch(r"-?\d+", x)]
        if integers:
            # an integer equals only a value exactly its own (PRM800K's grader: an integer and a
            # non-integer differ), so 1000000.5 is not 1000000 though within the relative tolerance
            return abs(complex(sympy.N(ea - eb, 50))) <= 1e-30 * max(1, abs(integers[0]))
        return abs(va - vb) <= 1e-6 * max(abs(va), abs(vb)) + 1e-12   # relative: 10^{-7} is not 0
    except (TypeError, ValueError, AttributeError, OverflowError, RecursionError,
            NotImplementedError):
        return False


def serve() -> None:
    """The worker loop: "ready" (once sympy is imported), then one answer line per request
    line, until stdin closes."""
    _sympy()
    print("ready", flush=True)
    for line in sys.stdin:
        a, b = json.loads(line)
        print(json.dumps(sympy_equal(a, b)), flush=True)


if __name__ == "__main__":
    serve()
