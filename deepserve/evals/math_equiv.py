"""Decide whether two math answers (LaTeX) are the same value.

Used for MATH-500 and AIME. Two stages, like the MATH benchmark's own checker (Hendrycks et
al. 2021) followed by a symbolic check (as in Qwen2.5-Math's evaluation and math-verify):

1. `normalize` rewrites both strings to a canonical LaTeX form: `\\dfrac` -> `\\frac`,
   `\\frac12` -> `\\frac{1}{2}`, units (`\\text{ cm}`), degrees, percent, dollars,
   `\\left`/`\\right` and spacing removed, thousands separators dropped, "x = 5" -> "5".
   Equal strings are equal answers.
2. Otherwise both are translated to sympy (our own small LaTeX subset: fractions, roots,
   powers, pi, implicit products) and compared: exactly (simplify(a - b) == 0) or
   numerically (relative 1e-6), so `\\frac{1}{2}` == `0.5` and `2\\sqrt{2}` == `\\sqrt{8}`.
Tuples and intervals compare element by element (bracket kinds must match); unordered lists
("1, -2") as multisets.
"""
from __future__ import annotations

import re
from tokenize import TokenError

import sympy
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                        parse_expr, standard_transformations)

from deepserve.evals.extract import _braced

_MAX_SYMPY_LEN = 300  # longer strings are not worth (or safe) to hand to sympy
_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)


def _fix_fracs_and_sqrt(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{x}` -> `\\frac{1}{x}`, `\\sqrt3` -> `\\sqrt{3}`."""
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])", r"\\frac\1{\2}", s)
    return s


_UNIT_TAIL = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?\s*$")


def normalize(answer: str) -> str:
    """Canonical string form of a LaTeX answer (see the module docstring)."""
    s = str(answer).strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\:", "").replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\$", "").replace("$", "")
    # Degrees and percent carry no value of their own in these answers.
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "").replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "")
    # Units: a trailing \text{...} after something with a digit ("10\text{ cm}^2" -> "10").
    while True:
        m = _UNIT_TAIL.search(s)
        if not m or not re.search(r"\d", s[:m.start()]):
            break
        s = s[:m.start()].rstrip()
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|mathbf|boxed)\{([^{}]*)\}", r"\1", s)
    # Plain-word units after a number: "10 cm", "5 inches", "18 dollars".
    m = re.fullmatch(r"(-?[\d.,]+)\s*(?:[a-zA-Z]+\.?\s*)+(?:\^\d)?", s)
    if m:
        s = m.group(1)
    s = _fix_fracs_and_sqrt(s)
    # "x = 5" -> "5" when the left side is a single variable (not for equations like y=2x+1).
    m = re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*([^=]+)", s)
    if m and re.search(r"\d", m.group(1)) and not re.search(r"[a-zA-Z]", re.sub(
            r"\\[a-zA-Z]+", "", m.group(1))):
        s = m.group(1)
    s = s.replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)           # ".5" -> "0.5"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)                 # "18.00" -> "18"
    s = re.sub(r"^(-?\d+\.\d*?)0+$", r"\1", s)             # "2.50" -> "2.5"
    return s.rstrip(".")


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
            group = _braced(s, pos)
            if group is None:
                raise ValueError(f"unbalanced braces in {s!r}")
            args.append(group[0])
            pos = group[1]
        out.append(build(*args))
        i = pos


def latex_to_sympy(s: str):
    """Parse a normalized LaTeX answer into a sympy expression; None when it is not one."""
    if len(s) > _MAX_SYMPY_LEN or not s:
        return None
    try:
        s = _latex_commands_to_py(s)
        if "\\" in s or "=" in s or "<" in s or ">" in s:
            return None
        names = {c: sympy.Symbol(c) for c in set(re.findall(r"[a-zA-Z]", s))}
        names.update({"pi": sympy.pi, "oo": sympy.oo, "sqrt": sympy.sqrt, "E": sympy.E,
                      "log": sympy.log, "ln": sympy.log, "sin": sympy.sin, "cos": sympy.cos,
                      "tan": sympy.tan, "i": sympy.I})
        return parse_expr(s, local_dict=names, transformations=_TRANSFORMS, evaluate=True)
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


def _split_top_level(s: str) -> list[str]:
    """Split on commas that are not inside brackets/braces."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _sympy_equal(a: str, b: str) -> bool:
    ea, eb = latex_to_sympy(a), latex_to_sympy(b)
    if ea is None or eb is None:
        return False
    try:
        if ea.free_symbols or eb.free_symbols:
            return sympy.simplify(ea - eb) == 0
        va, vb = complex(sympy.N(ea)), complex(sympy.N(eb))
        return abs(va - vb) <= 1e-6 * max(1.0, abs(vb))
    except (TypeError, ValueError, AttributeError, OverflowError, RecursionError,
            NotImplementedError):
        return False


def _equal_normalized(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) > 1 or len(pb) > 1:
        if len(pa) != len(pb):
            return False
        return sorted(pa) == sorted(pb) or all(_equal_normalized(x, y) for x, y in zip(pa, pb))
    brackets = "([", ")]"
    if a[:1] in brackets[0] and a[-1:] in brackets[1] and b[:1] in brackets[0] and b[-1:] in brackets[1]:
        inner_a, inner_b = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        if len(inner_a) > 1 or len(inner_b) > 1:
            if (a[0], a[-1]) != (b[0], b[-1]) or len(inner_a) != len(inner_b):
                return False
            return all(_equal_normalized(x, y) for x, y in zip(inner_a, inner_b))
    if a.count("=") == 1 and b.count("=") == 1:
        la, ra = a.split("=")
        lb, rb = b.split("=")
        return _equal_normalized(la, lb) and _equal_normalized(ra, rb)
    return _sympy_equal(a, b)


def math_equal(pred: str | None, gold: str) -> bool:
    """True when `pred` (a model's boxed answer) is mathematically the same as `gold`."""
    if pred is None:
        return False
    a, b = normalize(pred), normalize(gold)
    if not a:
        return False
    return _equal_normalized(a, b)
