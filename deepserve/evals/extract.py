"""Pull the final answer out of a reasoning model's reply.

DeepSeek-R1 and its distills think first (`<think> ... </think>`) and answer after. The answer
is read from the text after the last `</think>`, or from `content` alone when the server
already split the reasoning into `reasoning_content`. Inside the answer we look for, in
order of trust: a `\\boxed{}` (math), an explicit "Answer: X" statement, then weaker cues.

Three extractors, one per scoring kind:
- `extract_boxed` / `extract_math_answer`: the last `\\boxed{...}` with nested braces.
- `extract_number`: GSM8K's integer answers ("$1,234." -> "1234").
- `extract_choice`: a multiple-choice letter, avoiding the article "A" and pronoun "I".
"""
from __future__ import annotations

import re

from deepserve.evals.latex_sympy import braced

THINK_END = "</think>"
THINK_START = "<think>"


def answer_text(content: str | None, reasoning_content: str | None = None,
                unclosed: bool = False) -> str:
    """The part of a reply that holds the answer (reasoning removed).

    With `reasoning_content` set, the server already split the reply, so `content` is the answer.
    Otherwise the answer follows the last `</think>`. A reply that opened `<think>` and never
    closed it (cut at max tokens) has no answer: returns "". So does one without a `</think>`
    that the caller knows to be reasoning cut short (`unclosed`): R1's chat template opens the
    `<think>` in the prompt, so such a reply holds neither tag.
    """
    content = content or ""
    if reasoning_content:
        # Some servers split but still leave a stray closing tag in content.
        return content.rsplit(THINK_END, 1)[-1].strip()
    if THINK_END in content:
        return content.rsplit(THINK_END, 1)[-1].strip()
    if THINK_START in content or unclosed:
        return ""
    return content.strip()


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def all_boxed(text: str) -> list[str]:
    """Every `\\boxed{...}` / `\\fbox{...}` (and the brace-less `\\boxed 5`) in order."""
    found = []
    for m in _BOX_RE.finditer(text):
        pos = m.end()
        if pos < len(text) and text[pos] == "{":
            group = braced(text, pos)
            if group is not None:
                found.append(group[0].strip())
        else:
            bare = re.match(r"([^\s$.,;]+)", text[pos:])
            if bare:
                found.append(bare.group(1))
    return found


def extract_boxed(text: str) -> str | None:
    """The last boxed expression, or None. Several boxes in one answer: the last one wins; an
    empty `\\boxed{}` (the prompt's instruction quoted back) is none."""
    boxes = [box for box in all_boxed(text) if box]
    return boxes[-1] if boxes else None


_FINAL_RE = re.compile(
    r"(?:final answer|the answer)\s*(?:is|:)?\s*[:=]?\s*(?:\$+|\\\[|\\\()?([^\n$]+?)"
    r"(?:\$+|\\\]|\\\))?\s*(?:\.\s*)?$",
    re.IGNORECASE | re.MULTILINE)


# "The final answer is $X$. I hope it is correct." (Minerva's format, lm-eval's hendrycks_math):
# math set in $...$ is the whole answer, whatever follows it on the line.
_FINAL_MATH_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)?\s*[:=]?\s*\$+([^$]+?)\$+",
                            re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """A math answer: the last boxed expression, else the last "the final answer is X" that
    ends its line or sets X in $...$."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    text = text.replace("**", "")
    matches = [m for regex in (_FINAL_RE, _FINAL_MATH_RE) for m in regex.finditer(text)]
    return max(matches, key=lambda m: m.start()).group(1).strip() if matches else None


_NUMBER_RE = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _latex_digits(text: str) -> str:
    """LaTeX digit grouping as plain text: "1,\\!200" / "1{,}200" -> "1,200", "1\\,200" -> "1200"."""
    return text.replace("\\$", "$").replace("{,}", ",").replace("\\,", "").replace("\\!", "")


def clean_number(text: str) -> str | None:
    """"$1,234.00." -> "1234.00"; the first number in a short string, or None."""
    text = _latex_digits(text)
    text = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^}]*)\}", r"\1", text)
    m = _NUMBER_RE.search(text)
    if not m:
        return None
    num = m.group(0).replace("$", "").replace(" ", "")
    # "1,234" is a thousands separator; a comma before a non-3-digit group is a list.
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", num):
        num = num.replace(",", "")
    else:
        num = num.split(",")[0]
    return num.rstrip(".")


def extract_number(text: str) -> str | None:
    """GSM8K-style answer: boxed number, else "answer is N" / "#### N", else the last number."""
    text = _latex_digits(text)
    boxed = extract_boxed(text)
    if boxed is not None:
        result = boxed.rsplit("=", 1)[-1]   # a boxed worked equation, "3 \times 6 = 18": its result
        num = clean_number(result if re.search(r"\d", result) else boxed)
        if num is not None:
            return num
    for pattern in (r"####\s*([^\n]+)", r"answer\s*(?:is|:)\s*([^\n]+)"):
        hits = re.findall(pattern, text, re.IGNORECASE)
        for hit in reversed(hits):
            num = clean_number(hit)
            if num is not None:
                return num
    numbers = [m.group(0) for m in _NUMBER_RE.finditer(text)]
    for raw in reversed(numbers):
        num = clean_number(raw)
        if num is not None:
            return num
    return None


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


_FULL_WIDTH = {ord("Ａ") + i: ord("A") + i for i in range(26)}   # "答案：Ｂ" is "答案：B"


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter in a multiple-choice answer, or None.

    Tried in order, the first pattern that matches wins, with its last hit except for an
    answer statement, whose first hit wins (simple-evals reads ANSWER_PATTERN_MULTICHOICE with
    re.search): `\\boxed{C}`; "Answer: C" / "answer is (C)" / "**Answer: C**" / "答案：C"
    (first hit); "the correct option is C"; a line that is only a
    letter; a parenthesised "(C)"; a bare capital letter in prose that is not the article
    "A" or the pronoun "I" (a letter followed by a lowercase word is prose, not an answer).
    """
    L = _letter_class(letters)
    text = text.translate(_FULL_WIDTH).replace("**", "").replace("__", "")
    for box in reversed(all_boxed(text)):
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^}]*)\}", r"\1", box).strip()
        m = re.fullmatch(rf"\(?({L})\)?(?:[.:)]\s*.*)?", inner, re.DOTALL)
        if m:
            return m.group(1)
    # Keywords match in any case, the letter only in upper case ("the answer is a bit ...").
    # (pattern, which hit): an "Answer: X" / "答案：X" statement counts from its first hit, as
    # simple-evals reads ANSWER_PATTERN_MULTICHOICE with re.search; the other cues from their last
    strong = [
        # "option" / "choice" only with an "is" or colon: "answer choice A is tempting" names
        # an option, "the answer choice is C" / "Answer: option C" choose one
        (rf"(?i:answer)\s*(?:(?i:option|choice)\s*(?i:is|:|：)\s*[:：]?|(?i:is|:|：)\s*[:：]?\s*"
         rf"(?:(?i:option|choice)\s*)?)?\s*[\(\[]?({L})(?![\w'’])", 0),
        (rf"答案\s*(?:应该|應該|应当|應當|就)?\s*(?:是|为|為|應為|应为|选|選|：|:)*\s*[\(（]?({L})", 0),
        (rf"(?:正确|正確|最佳|应|應)的?(?:选项|選項|选择|選擇)\s*(?:是|为|為|：|:)*\s*[\(（]?({L})(?![a-zA-Z])", -1),
        (rf"(?i:correct|right|best)\s+(?i:option|choice)\s*(?i:is|:)?\s*[\(\[]?({L})(?![\w'’])", -1),
        (rf"(?:选|選)(?:择|擇)?\s*[\(（]?({L})(?![a-zA-Z])", -1),
        # "选项B正确" / "B选项正确" / "故B正确" / "B是正确的": option B is right
        (rf"(?<![a-zA-Z])({L})\s*(?:选项|選項|项|項)?\s*(?:是|为|為)?\s*(?:正确|正確)", -1),
    ]
    for pattern, which in strong:
        hits = re.findall(pattern, text)
        if hits:
            return hits[which]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        m = re.fullmatch(rf"[\(\[]?({L})[\)\]]?[.:]?", line)
        if m:
            return m.group(1)
    hits = re.findall(rf"\(({L})\)", text)
    if hits:
        return hits[-1]
    # Bare letters in prose: skip "A " / "I " followed by a lowercase word (article, pronoun),
    # and letters glued to other Latin letters or digits ("A-level", "I'm"); next to Chinese
    # characters a letter stands alone ("因此B是对的").
    candidates = []
    for m in re.finditer(rf"(?<![A-Za-z0-9_'’-])({L})(?![A-Za-z0-9_'’-])", text):
        after = text[m.end():m.end() + 3]
        if re.match(r"\s+[a-z]", after):
            continue
        candidates.append(m.group(1))
    return candidates[-1] if candidates else None
