"""Decide whether two math answers (LaTeX) are the same value.

Used for MATH-500 and AIME. Two stages, like the MATH benchmark's own checker (Hendrycks et
al. 2021) followed by a symbolic check (as in Qwen2.5-Math's evaluation and math-verify):

1. `normalize` rewrites both strings to a canonical LaTeX form: `\\dfrac` -> `\\frac`,
   `\\frac12` -> `\\frac{1}{2}`, units (`\\text{ cm}`), degrees, percent, dollars,
   `\\left`/`\\right` and spacing removed, thousands separators dropped, "x = 5" -> "5",
   mixed numbers `1\\frac{4}{5}` -> `(1+\\frac{4}{5})`. Equal strings are equal answers, and
   text answers ("\\text{East}", "east") equal in any case.
2. Otherwise both are translated to sympy (our own small LaTeX subset: fractions, roots,
   powers, pi, implicit products) and compared: exactly (simplify(a - b) == 0) or
   numerically (relative 1e-6; an integer only exactly, as in PRM800K), so `\\frac{1}{2}` == `0.5` and `2\\sqrt{2}` == `\\sqrt{8}`.
Tuples and intervals compare element by element (bracket kinds must match); unordered lists
("1, -2") and sets ("\\{1, -2\\}") as multisets, "a \\pm b" standing for a + b and a - b;
"x \\in [1, 2]" is the interval.

sympy can run for minutes (or forever) on some model outputs ("(10^{7})!", big
simplifications), so stage 2 (latex_sympy.py) runs in a worker process with a time limit per
answer (`SympyWorker`, 5 s by default as in math-verify): an answer that runs out of time is
scored wrong, the worker is killed and restarted, and `judge` reports it so the evaluation
can count and report such cases.
"""
from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

DEFAULT_TIMEOUT = 5.0  # seconds of sympy per answer


def _fix_fracs_and_sqrt(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{x}` -> `\\frac{1}{x}`, `\\sqrt3` -> `\\sqrt{3}`."""
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])", r"\\frac\1{\2}", s)
    return s


# Words of two or more letters set apart from the number, or units written without a space
# (PRM800K's grader strips a list of unit words the same way).
_UNIT_NAMES = ("cm|mm|km|kg|mg|lb|lbs|oz|ft|yd|mi|in|inch|inches|feet|foot|sq|mph|sec|min|hr|hrs|"
               "dollars?|cents?|units?|degrees?|meters?|miles?|hours?|minutes?|seconds?|days?|weeks?|years?")
_WORD_UNITS = re.compile(rf"(-?[\d.,]+)(?:\s+[a-zA-Z]{{2,}}\.?|\s*(?:{_UNIT_NAMES})\.?(?![a-zA-Z]))"
                         rf"(?:\s+[a-zA-Z]+\.?)*(?:\^\d)?\s*")
_UNIT_TAIL = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}(?:\^\{?\d\}?)?\s*$")


def normalize(answer: str) -> str:
    """Canonical string form of a LaTeX answer (see the module docstring)."""
    s = str(answer).strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("{,}", ",")
    s = re.sub(r"(?<!\\)\\ ", " ", s.replace("\\:", "")).replace("~", " ")   # "\ " is a space, "\\" a row break
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"^\s*[a-zA-Z]\s*\\in(?![a-zA-Z])\s*", "", s)   # "x \in [-2,7]" -> "[-2,7]"
    s = re.sub(r"^\s*\\\{(.*)\\\}\s*$", r"\1", s)            # a set "\{1,2\}": its elements, any order
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
    s = re.sub(r"(?<=\S)\s+(?:or|and)\s+(?=\S)", ",", s)   # "1 \\text{ or } -2" lists two answers
    # Plain-word units after a number: "10 cm", "5 inches", "18 dollars", "6cm^2". Letters
    # glued to the number are a product ("2k", "5r^5", "6i"), kept unless a known unit.
    m = _WORD_UNITS.fullmatch(s)
    if m:
        s = m.group(1)
    s = _fix_fracs_and_sqrt(s)
    # A mixed number, "1\\frac{4}{5}" or "-137 \\frac{1}{2}", is a sum (PRM800K's grader reads
    # "7 3/4" as 7+3/4), not the product sympy would make of it.
    s = re.sub(r"(?<![\w.}^_\\])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\\frac{\2}{\3})", s)
    # "x = 5" -> "5" when the left side is a single variable (not for equations like y=2x+1).
    m = re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*([^=]+)", s)
    if m and re.search(r"\d", m.group(1)) and not re.search(r"[a-zA-Z]", re.sub(
            r"\\[a-zA-Z]+", "", m.group(1))):
        s = m.group(1)
    s = s.replace(" ", "")
    parts = _split_top_level(s)   # the roots "x=1,x=-2" (or x_1, x_2): the values
    if len(parts) > 1 and len({p[0] for p in parts}) == 1 and \
            all(re.match(r"[a-zA-Z](?:_\{?\w+\}?)?=[^=]+$", p) for p in parts):
        s = ",".join(p.split("=")[1] for p in parts)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)           # ".5" -> "0.5"
    s = re.sub(r"^(-?)0+(?=\d+(?:\.\d+)?$)", r"\1", s)   # "025" -> "25" (AIME: 000-999)
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)                 # "18.00" -> "18"
    s = re.sub(r"^(-?\d+\.\d*?)0+$", r"\1", s)             # "2.50" -> "2.5"
    return s.rstrip(".")


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


_SCRIPT = Path(__file__).with_name("latex_sympy.py")
# run the script without its folder on sys.path (its neighbours' names could shadow modules)
_BOOT = "import runpy, sys; sys.path.pop(0); runpy.run_path(sys.argv[1], run_name='__main__')"


class SympyWorker:
    """Runs `latex_sympy.sympy_equal` in a child process with a time limit per call.

    A sympy call cannot be interrupted, so the child (a Python that imports only sympy) is
    killed when a comparison runs out of time, and started again for the next one. The time
    limit starts once the child is ready."""

    STARTUP_TIMEOUT = 120.0

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError(f"the math timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self._proc: Optional[subprocess.Popen] = None

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(_SCRIPT)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self._read(self.STARTUP_TIMEOUT) != "ready":
            self.close()
            raise RuntimeError(f"the sympy worker ({_SCRIPT}) did not start within {self.STARTUP_TIMEOUT:.0f} s")

    def _read(self, timeout: float) -> Optional[str]:
        """The child's next line, or None when none comes within `timeout` seconds."""
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else ""
        return line.strip() or None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
            self._proc = None

    def equal(self, a: str, b: str) -> Optional[bool]:
        """Whether a and b are the same expression, or None when sympy ran out of time."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        try:
            self._proc.stdin.write(json.dumps([a, b]) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:   # the child died (e.g. out of memory): as slow as a timeout
            self.close()
            return None
        line = self._read(self.timeout)
        if line is None:
            self.close()
            return None
        return json.loads(line)


_workers: dict[float, SympyWorker] = {}


def _worker(timeout: float) -> SympyWorker:
    if timeout not in _workers:
        if not _workers:
            atexit.register(lambda: [w.close() for w in _workers.values()])
        _workers[timeout] = SympyWorker(timeout)
    return _workers[timeout]


@dataclass(frozen=True)
class Verdict:
    equal: bool
    timed_out: bool = False   # a symbolic comparison ran out of time (then `equal` is False)


def judge(pred: str | None, gold: str, timeout: float = DEFAULT_TIMEOUT) -> Verdict:
    """Whether `pred` (a model's boxed answer) is mathematically the same as `gold`, and
    whether sympy ran out of its `timeout` seconds on the way."""
    if pred is None:
        return Verdict(False)
    a, b = normalize(pred), normalize(gold)
    if not a:
        return Verdict(False)
    timeouts = []

    def symbolic(x: str, y: str) -> bool:
        result = _worker(timeout).equal(x, y)
        if result is None:
            timeouts.append((x, y))
        return bool(result)

    equal = _equal_normalized(a, b, symbolic)
    return Verdict(equal, timed_out=bool(timeouts) and not equal)


def math_equal(pred: str | None, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when `pred` (a model's boxed answer) is mathematically the same as `gold`."""
    return judge(pred, gold, timeout).equal


_MATRIX = re.compile(r"\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}", re.DOTALL)


def _matrix_cells(s: str) -> list[list[str]] | None:
    """`\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}` -> [["1", "2"], ["3", "4"]]; None if not a matrix."""
    m = _MATRIX.fullmatch(s)
    if not m:
        return None
    rows = [row for row in m.group(2).split("\\\\") if row]
    return [row.split("&") for row in rows]


def _expand_pm(parts: list[str]) -> list[str]:
    """"1\\pm\\sqrt{5}" stands for two answers: "1+\\sqrt{5}" and "1-\\sqrt{5}"."""
    out = []
    for part in parts:
        out += [part.replace("\\pm", "+"), part.replace("\\pm", "-")] if part.count("\\pm") == 1 else [part]
    return out


_WORDS = re.compile(r"[A-Za-z(),]+")   # a text answer: "\\text{east}", "Evelyn", "(C)"


def _equal_normalized(a: str, b: str, symbolic: Callable[[str, str], bool]) -> bool:
    if a == b:
        return True
    if _WORDS.fullmatch(a) and _WORDS.fullmatch(b):
        return a.lower() == b.lower()   # text answers in any case, as PRM800K's grader
    ma, mb = _matrix_cells(a), _matrix_cells(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(_equal_normalized(x, y, symbolic)
                   for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    pa, pb = _expand_pm(_split_top_level(a)), _expand_pm(_split_top_level(b))
    if len(pa) > 1 or len(pb) > 1:
        if len(pa) != len(pb):
            return False
        if sorted(pa) == sorted(pb):
            return True
        unmatched = list(pb)   # a multiset: each element of a equals a distinct element of b
        for x in pa:
            hit = next((i for i, y in enumerate(unmatched) if _equal_normalized(x, y, symbolic)), None)
            if hit is None:
                return False
            del unmatched[hit]
        return True
    brackets = "([", ")]"
    if a[:1] in brackets[0] and a[-1:] in brackets[1] and b[:1] in brackets[0] and b[-1:] in brackets[1]:
        inner_a, inner_b = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        if len(inner_a) > 1 or len(inner_b) > 1:
            if (a[0], a[-1]) != (b[0], b[-1]) or len(inner_a) != len(inner_b):
                return False
            return all(_equal_normalized(x, y, symbolic) for x, y in zip(inner_a, inner_b))
    if a.count("=") == 1 and b.count("=") == 1:
        la, ra = a.split("=")
        lb, rb = b.split("=")
        return _equal_normalized(la, lb, symbolic) and _equal_normalized(ra, rb, symbolic)
    return symbolic(a, b)
