"""The evaluation tasks: which data, which prompt, how a reply is scored, which table row.

Prompts follow DeepSeek-R1's published evaluation: no system prompt, everything in the user
turn, math asks "Please reason step by step, and put your final answer within \\boxed{}."
Multiple-choice prompts list lettered options and ask for a final "Answer: X" line (C-Eval's
in Chinese, in C-Eval's own wording). Row titles are those of the deployment guides'
accuracy tables ("GSM8K (EM)", "MMLU (Acc.)", "AIME 2024 (Pass@1)", ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from deepserve.evals import datasets
from deepserve.evals.datasets import LETTERS, Item
from deepserve.evals.extract import extract_choice, extract_math_answer, extract_number
from deepserve.evals.math_equiv import DEFAULT_TIMEOUT, judge

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_prompt(item: Item) -> str:
    return f"{item.question}\n{MATH_INSTRUCTION}"


def choice_prompt(item: Item) -> str:
    letters = LETTERS[:len(item.choices)]
    options = "\n".join(f"{letter}) {text}" for letter, text in zip(letters, item.choices))
    return ("Answer the following multiple choice question. Think step by step, then give your "
            f"final answer on the last line in the form 'Answer: X', where X is one of "
            f"{', '.join(letters)}.\n\n{item.question}\n\n{options}")


def ceval_prompt(item: Item) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", item.choices))
    return (f"以下是中国关于{item.subject}考试的单项选择题，请选出其中的正确答案。"
            "请逐步思考，并在最后一行以“答案：X”的格式给出答案，其中X为A、B、C、D之一。\n\n"
            f"{item.question}\n{options}")


class Scored(NamedTuple):
    """One reply's score, the answer read from it, and whether checking it ran out of time."""
    score: float
    pred: str | None
    timed_out: bool = False


def score_math(item: Item, answer: str, timeout: float = DEFAULT_TIMEOUT) -> Scored:
    pred = extract_math_answer(answer)
    verdict = judge(pred, item.gold, timeout)
    return Scored(float(verdict.equal), pred, verdict.timed_out)


def score_number(item: Item, answer: str, timeout: float = DEFAULT_TIMEOUT) -> Scored:
    pred = extract_number(answer)
    if pred is None:
        return Scored(0.0, None)
    try:
        return Scored(float(abs(float(pred) - float(item.gold)) < 1e-6), pred)
    except ValueError:
        return Scored(0.0, pred)


def score_choice(item: Item, answer: str, timeout: float = DEFAULT_TIMEOUT) -> Scored:
    pred = extract_choice(answer, LETTERS[:len(item.choices)])
    return Scored(float(pred == item.gold), pred)


@dataclass(frozen=True)
class Task:
    """One evaluation: `title` is its row in the accuracy table."""
    name: str
    title: str
    load: Callable[[Path], list[Item]]
    prompt: Callable[[Item], str]
    score: Callable[[Item, str, float], Scored]   # (item, reply, math timeout in seconds)


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("gsm8k", "GSM8K (EM)", datasets.load_gsm8k, math_prompt, score_number),
    Task("mmlu", "MMLU (Acc.)", datasets.load_mmlu, choice_prompt, score_choice),
    Task("ceval", "CEVAL", datasets.load_ceval, ceval_prompt, score_choice),
    Task("aime24", "AIME 2024 (Pass@1)", datasets.load_aime24, math_prompt, score_math),
    Task("aime25", "AIME 2025 (Pass@1)", datasets.load_aime25, math_prompt, score_math),
    Task("gpqa_diamond", "GPQA-Diamond (Pass@1)", datasets.load_gpqa_diamond, choice_prompt,
         score_choice),
    Task("math500", "MATH-500 (Pass@1)", datasets.load_math500, math_prompt, score_math),
    Task("mmlu_pro", "MMLU-Pro (Acc.)", datasets.load_mmlu_pro, choice_prompt, score_choice),
]}

DEFAULT_TASKS = ["gsm8k", "mmlu", "ceval", "aime24", "gpqa_diamond", "math500", "mmlu_pro"]


def parse_tasks(spec: str) -> list[Task]:
    """"gsm8k, math500" -> [Task, Task]; unknown names raise ValueError listing the known ones."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--tasks is empty (got {spec!r}); known: {', '.join(TASKS)}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return [TASKS[n] for n in dict.fromkeys(names)]
