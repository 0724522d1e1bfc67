"""Compile the Triton kernels of the steps a server will run before it serves.

Triton compiles a kernel on its first launch for each specialization: every integer argument
is classed as 1, a multiple of 16, or other, and the launch tables (ops/triton/configs) pick
tile settings by size, each a compile of its own. The profile run and the CUDA-graph
captures cover the largest prefill and the captured sizes; the rest (a one-prompt prefill,
prefill chunks beside decodes, eager steps over the piecewise limit, the sampling kernel)
would compile inside a user's request, 1-2 s on an H100 per new kernel. `warm_up_steps`
lists steps whose sizes cover each class; the driver runs them at start with no cache
writes. `CompileWatch` logs every compile after that, naming the kernel, so a shape the
warm-up missed shows in the server log.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from deepserve.engine.step_inputs import StepInputs

logger = logging.getLogger("deepserve")


# eager sizes above this run only at max_num_batched_tokens itself: the launch tables' size
# keys end below it, and each such step of a large model costs seconds
LARGEST_POWER = 16384


@dataclass(frozen=True)
class WarmUpStep:
    decodes: int             # one-token decode rows first
    prompts: tuple           # then prompt chunks, each from position 0


def warm_up_steps(max_tokens: int, max_seqs: int, max_model_len: int, piecewise_max: int) -> list[WarmUpStep]:
    """Steps whose token count, sequence count, decode count and longest chunk each take the
    values 1, a multiple of 16 and neither, at small sizes (graph and piecewise steps, whose
    attention runs eagerly between the pieces) and at each power of two above the piecewise
    limit up to `max_tokens` (eager steps, where size-keyed launch tables change tiles; up to
    LARGEST_POWER, then `max_tokens` itself)."""
    steps = [WarmUpStep(0, (1,)), WarmUpStep(0, (16,)), WarmUpStep(0, (17,)), WarmUpStep(1, (15,)),
             WarmUpStep(3, (16, 13)), WarmUpStep(16, (16,)), WarmUpStep(15, (17,)), WarmUpStep(17, (31,)),
             WarmUpStep(3, ())]
    max_tokens = min(max_tokens, max_seqs * max_model_len)    # the most one step can hold
    sizes, p = [], 1
    while p <= min(max_tokens, LARGEST_POWER):
        if p > piecewise_max:
            sizes.append(p)
        p *= 2
    if max_tokens > piecewise_max and max_tokens not in sizes:
        sizes.append(max_tokens)
    for t in sizes:
        steps.append(WarmUpStep(0, _chunks(t, max_model_len)))
        steps.append(WarmUpStep(17, _chunks(t - 19, max_model_len)))    # T = t - 2: not a multiple of 16
    out = []
    for s in steps:
        d = min(s.decodes, max(0, max_seqs - len(s.prompts)), max_tokens)
        prompts = tuple(n for n in s.prompts if 0 < n <= max_model_len)
        tokens = d + sum(prompts)
        if 0 < tokens <= max_tokens and d + len(prompts) <= max_seqs:
            out.append(WarmUpStep(d, prompts))
    return list(dict.fromkeys(out))


def warm_up_wanted(device_type: str) -> bool:
    """Whether the driver warms up at start: on CUDA unless DEEPSERVE_WARM_UP=0; DEEPSERVE_WARM_UP=1
    runs it on any device (its steps through every rank of a layout, on a CPU too)."""
    value = os.environ.get("DEEPSERVE_WARM_UP", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"DEEPSERVE_WARM_UP must be 0 or 1, got {value!r}")
    return value == "1" if value else device_type == "cuda"


def _chunks(tokens: int, longest: int) -> tuple:
    """`tokens` as prompt chunks of at most `longest` tokens."""
    full, rest = divmod(tokens, longest)
    return (longest,) * full + ((rest,) if rest else ())


def profile_inputs(max_tokens: int, max_seqs: int, max_model_len: int, block_size: int,
                   logits_rows: int) -> tuple[StepInputs, int]:
    """The profile run's step, which sizes the activations every later step may use: the most
    tokens one step holds (`max_tokens`, at most `max_seqs` full-length sequences), as prompts
    of at most `max_model_len` tokens from position 0 (so no warm-up or served step has more),
    each in blocks of its own of a scratch pool, and `logits_rows` logits rows (as many as a
    step may sample: max_num_seqs, times 1 + k drafts with speculative decoding). Returns the
    inputs and the scratch pool's block count."""
    lens = _chunks(min(max_tokens, max_seqs * max_model_len), max_model_len)
    per_seq = [-(-n // block_size) for n in lens]
    first = np.cumsum([0] + per_seq[:-1])
    width = max(per_seq)
    tables = [[int(f) + min(b, p - 1) for b in range(width)] for f, p in zip(first, per_seq)]
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
    slots = np.concatenate([f * block_size + np.arange(n, dtype=np.int64) for f, n in zip(first, lens)])
    tokens = len(positions)
    rows = np.arange(tokens - min(tokens, max(logits_rows, len(lens))), tokens)
    return StepInputs(ids=[0] * tokens, positions=positions, slots=slots, q_lens=list(lens), seq_lens=list(lens),
                      tables=tables, logits_rows=rows.tolist(), num_decodes=0), sum(per_seq)


def step_inputs(step: WarmUpStep, block_size: int, num_blocks: int) -> StepInputs:
    """A warm-up step as the runner's inputs: no cache slot written, every row's logits kept
    (each decode reads a two-token context; block ids wrap around the pool)."""
    q_lens = [1] * step.decodes + list(step.prompts)
    seq_lens = [2] * step.decodes + list(step.prompts)
    width = max(-(-n // block_size) for n in seq_lens)
    tables = [[b % num_blocks for b in range(width)] for _ in seq_lens]
    positions = np.concatenate([np.full(step.decodes, 1, dtype=np.int64)]
                               + [np.arange(n, dtype=np.int64) for n in step.prompts])
    rows = np.cumsum(q_lens) - 1
    return StepInputs(ids=[0] * len(positions), positions=positions, slots=np.full(len(positions), -1),
                      q_lens=q_lens, seq_lens=seq_lens, tables=tables, logits_rows=rows.tolist(),
                      num_decodes=step.decodes)


class CompileWatch:
    """Counts Triton's kernel compiles in this process through its JIT hooks (chained to any
    hook already set); once `serving` is set, logs each compile with the kernel's name."""

    def __init__(self):
        self.compiles = 0
        self.seconds = 0.0
        self.serving = False
        self._started: dict = {}
        self._installed = False

    def install(self) -> bool:
        """Hook into Triton's JIT (False where this Triton has no such hooks)."""
        try:
            from triton import knobs
        except ImportError:
            return False
        rt = getattr(knobs, "runtime", None)
        if rt is None or not hasattr(rt, "jit_cache_hook") or self._installed:
            return self._installed
        before, after = rt.jit_cache_hook, rt.jit_post_compile_hook

        def on_start(*args, **kwargs):
            self.started(kwargs.get("fn"), kwargs.get("key"))
            return before(*args, **kwargs) if before is not None else False

        def on_done(*args, **kwargs):
            self.finished(kwargs.get("fn"), kwargs.get("key"), kwargs.get("repr", ""))
            return after(*args, **kwargs) if after is not None else False

        rt.jit_cache_hook, rt.jit_post_compile_hook = on_start, on_done
        self._installed = True
        return True

    def started(self, fn, key) -> None:
        self._started[(_name(fn), str(key))] = time.perf_counter()

    def finished(self, fn, key, text: str = "") -> None:
        t0 = self._started.pop((_name(fn), str(key)), None)
        took = time.perf_counter() - t0 if t0 is not None else 0.0
        self.compiles += 1
        self.seconds += took
        if self.serving:
            logger.info("Triton compiled %s while serving (%.0f ms): a shape the start-up warm-up did not "
                        "run; %s", _name(fn), 1e3 * took, text[:300])


def _name(fn) -> str:
    return f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', fn)}"


# Triton's JIT hooks are per process, so is their watch: the runners install it on a GPU
WATCH = CompileWatch()
