"""Compile the Triton kernels of the steps a server will run before it serves.

Triton compiles a kernel on its first launch for each specialization: every integer argument
is classed as 1, a multiple of 16, or other, and the launch tables (ops/triton/configs) pick
tile settings by size, each a compile of its own. The profile run and the CUDA-graph
captures cover the largest prefill and the captured sizes; the rest (a one-prompt prefill,
prefill chunks beside decodes, eager steps over the piecewise limit, the sampling kernel)
would compile inside a user's request, 1-2 s on an H100 per new kernel. `warm_up_steps`
lists steps whose sizes cover each class; the driver runs them at start with no cache
writes. `CompileWatch` logs every compile after that, naming the kernel and the parameters
whose classes differ from the nearest key compiled before (`nearest_key_diff`), so a shape
the warm-up missed shows in the server log with its cause.

What varies between served steps beyond these classes is kept out of the keys rather than
warmed: step inputs start 16-byte aligned (engine/input_staging.py), and kernels take no
class of per-step scalars used only in masks, bounds and addresses (block-table width, token
and split counts) nor of the alignment of the per-step arrays they read by scalar loads
(do_not_specialize / do_not_specialize_on_alignment); tests/engine/test_warm_up_keys.py
checks every launch key of a served request mix against the warm-up's.

With speculative decoding the steps also include verify steps (each sequence's last token
and its k drafts after some context), and with mtp every step is followed by the MTP
module's forwards over its rows (the k draft forwards included), as a served step is. The
sampler's own Triton kernel (ops.sample) is launched the same way whatever the request's
settings (penalties, logit_bias, min_tokens, logprobs and allowed_token_ids are torch ops
before it; its integer arguments are the vocabulary and the row strides, the row count only
its grid), and speculative verification samples its rows with the same op: one sampled
draw warms them.

The profile run's step (`profile_inputs`) and its sampling (`profile_sampling`) live here
too: they size the activations and the sampler's temporaries every later step may use.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import verify_sampled
from deepserve.engine.step_inputs import StepInputs

logger = logging.getLogger("deepserve")


# eager sizes above this run only at max_num_batched_tokens itself: the launch tables' size
# keys end below it, and each such step of a large model costs seconds
LARGEST_POWER = 16384


@dataclass(frozen=True)
class WarmUpStep:
    decodes: int             # decode sequences first: one token each, or 1 + drafts (verify)
    prompts: tuple           # then prompt chunks, each from position 0
    drafts: int = 0          # speculative decoding: each decode sequence's drafts after its token

    @property
    def num_tokens(self) -> int:
        return self.decodes * (1 + self.drafts) + sum(self.prompts)


def warm_up_steps(max_tokens: int, max_seqs: int, max_model_len: int, piecewise_max: int,
                  drafts: int = 0) -> list[WarmUpStep]:
    """Steps whose token count, sequence count, decode count and longest chunk each take the
    values 1, a multiple of 16 and neither, at small sizes (graph and piecewise steps, whose
    attention runs eagerly between the pieces) and at each power of two above the piecewise
    limit up to `max_tokens` (eager steps, where size-keyed launch tables change tiles; up to
    LARGEST_POWER, then `max_tokens` itself). With `drafts` (speculative decoding's k) the
    small steps with decodes come again as verify steps: each decode sequence its last token
    and k drafts, alone or beside the prompt chunks."""
    # decode counts 1-16, 17-32 and over 32 beside prompts: the MLA q-absorb / v-up tiles of a
    # mixed step's eager attention are sized by its decodes (16, 32 or 64 rows, mla_prep._token_block)
    small = [WarmUpStep(0, (1,)), WarmUpStep(0, (16,)), WarmUpStep(0, (17,)), WarmUpStep(1, (15,)),
             WarmUpStep(3, (16, 13)), WarmUpStep(16, (16,)), WarmUpStep(15, (17,)), WarmUpStep(17, (31,)),
             WarmUpStep(33, (15,)), WarmUpStep(3, ()), WarmUpStep(1, ())]
    steps = list(small)
    if drafts:
        steps += [WarmUpStep(s.decodes, s.prompts, drafts) for s in small + [WarmUpStep(1, ()), WarmUpStep(16, ())]
                  if s.decodes]
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
        if s.drafts and s.drafts + 2 > max_model_len:    # a verify sequence: context, token, drafts
            continue
        d = min(s.decodes, max(0, max_seqs - len(s.prompts)), max_tokens // (1 + s.drafts))
        step = WarmUpStep(d, tuple(n for n in s.prompts if 0 < n <= max_model_len), s.drafts if d else 0)
        if 0 < step.num_tokens <= max_tokens and d + len(step.prompts) <= max_seqs:
            out.append(step)
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
    """A warm-up step as the runner's inputs: no cache slot written, the logits of each
    sequence's last row kept, and of every row of a verify sequence (each decode sequence
    follows a one-token context; block ids wrap around the pool)."""
    per_decode = 1 + step.drafts
    q_lens = [per_decode] * step.decodes + list(step.prompts)
    seq_lens = [1 + per_decode] * step.decodes + list(step.prompts)
    width = max(-(-n // block_size) for n in seq_lens)
    tables = [[b % num_blocks for b in range(width)] for _ in seq_lens]
    positions = np.concatenate([np.tile(np.arange(1, 1 + per_decode, dtype=np.int64), step.decodes)]
                               + [np.arange(n, dtype=np.int64) for n in step.prompts])
    decode_rows = step.decodes * per_decode
    rows = list(range(decode_rows)) + (decode_rows + np.cumsum(step.prompts) - 1).tolist()
    return StepInputs(ids=[0] * len(positions), positions=positions, slots=np.full(len(positions), -1),
                      q_lens=q_lens, seq_lens=seq_lens, tables=tables, logits_rows=rows,
                      num_decodes=step.decodes if not step.drafts else 0)


def mtp_inputs(target: StepInputs, k: int, block_size: int, num_blocks: int, max_model_len: int) -> StepInputs:
    """The MTP module's step after the warm-up step `target`: its rows fed by all of that
    step's hidden states (as after a step whose drafts were all accepted), each sequence
    drafting its k tokens from its last row where max_model_len leaves room for them, its
    table wide enough for the k - 1 positions drafting reuses the module at; no cache slot
    written."""
    drafts = [n + k - 1 <= max_model_len for n in target.seq_lens]
    width = max(-(-(n + (k - 1) * d) // block_size) for n, d in zip(target.seq_lens, drafts))
    ends = np.cumsum(target.q_lens) - 1
    return StepInputs(ids=[0] * target.num_tokens, positions=target.positions, slots=target.slots,
                      q_lens=target.q_lens, seq_lens=target.seq_lens,
                      tables=[[b % num_blocks for b in range(width)] for _ in target.q_lens],
                      logits_rows=[int(e) for e, d in zip(ends, drafts) if d], num_decodes=target.num_decodes)


@torch.inference_mode()
def profile_sampling(sampler, logits: torch.Tensor, max_seqs: int, drafts: int) -> None:
    """Sample from the profile run's logits [rows, V] as the heaviest served step may, so that
    the measured peak holds the sampler's [rows, V] temporaries (fp32 logits, logprobs,
    penalty counts and masks, allowed-token masks, noise, the torch path's sorts): `sampler`
    (the engine's Sampler) over `max_seqs` rows with every setting that allocates them (a
    step samples one row a sequence), then with speculative decoding (`drafts` = k) the
    verification of rows // (k + 1) sequences of k drafts each (every row sampled)."""
    rows, vocab = logits.shape
    sampled = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)
    # every setting that allocates [rows, V] temporaries in the sampler (20: --max-logprobs' default)
    full = SamplingParams(**sampled, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1,
                          logprobs=min(20, vocab), min_tokens=1, max_tokens=2, logit_bias={0: 1.0},
                          allowed_token_ids=[0])
    n = min(rows, max_seqs)
    sampler(logits[:n], [Sequence("profile", i, [0], full) for i in range(n)])
    m = rows // (drafts + 1) if drafts else 0
    if m:   # (what a sequence with drafts may ask for: penalties, logprobs, bias, allowed ids draft nothing)
        verify_sampled(logits[:m * (drafts + 1)], [Sequence("profile", i, [0], SamplingParams(**sampled))
                                                   for i in range(m)], [[0] * drafts] * m, sampler)


class CompileWatch:
    """Counts Triton's kernel compiles in this process through its JIT hooks (chained to any
    hook already set); once `serving` is set, logs each compile with the kernel's name and
    how its key differs from the nearest one compiled before for that kernel."""

    def __init__(self):
        self.compiles = 0
        self.seconds = 0.0
        self.serving = False
        self._started: dict = {}
        self._keys: dict[str, list[str]] = {}     # kernel name -> keys compiled, in order
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
        name, key = _name(fn), str(key)
        t0 = self._started.pop((name, key), None)
        took = time.perf_counter() - t0 if t0 is not None else 0.0
        self.compiles += 1
        self.seconds += took
        before = self._keys.setdefault(name, [])
        if self.serving:
            logger.info("Triton compiled %s while serving (%.0f ms): a shape the start-up warm-up did not "
                        "run; %s", name, 1e3 * took, nearest_key_diff(_param_names(fn), key, before))
        before.append(key)


def _name(fn) -> str:
    return f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', fn)}"


def _param_names(fn) -> list[str]:
    """The kernel's parameter names, in its signature's order (Triton's JitFunctionInfo)."""
    return [p.name for p in getattr(getattr(fn, "jit_function", None), "params", ())]


def split_key(key: str) -> tuple[list[str], str]:
    """A Triton 3.x cache key, str(specialization list) + str(options), as the text of each
    parameter's (type, class) entry, in the kernel's parameter order, and the options' text."""
    items, depth, start, i = [], 0, 1, 0
    while i < len(key):
        c = key[i]
        if c in "'\"" and depth:
            i = key.find(c, i + 1) if key.find(c, i + 1) > 0 else len(key)
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                if key[start:i].strip():
                    items.append(key[start:i].strip())
                return items, key[i + 1:]
        elif c == "," and depth == 1:
            items.append(key[start:i].strip())
            start = i + 1
        i += 1
    return [key], ""


def nearest_key_diff(names: list[str], key: str, before: list[str]) -> str:
    """Which parameters' specialization classes differ between `key` and the one of `before`
    (keys compiled earlier for the same kernel) that differs in the fewest: "name: before ->
    now" for each, the options too when they differ."""
    if not before:
        return "the kernel's first compile"
    items, options = split_key(key)
    best = None
    for other in before:
        o_items, o_options = split_key(other)
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(o_items, items)) if a != b]
        if len(o_items) != len(items):
            diff.append((-1, f"{len(o_items)} parameters", f"{len(items)}"))
        if o_options != options:
            diff.append((-2, o_options, options))
        if best is None or len(diff) < len(best):
            best = diff
    parts = []
    for i, a, b in best:
        label = names[i] if 0 <= i < len(names) else ("options" if i == -2 else "signature" if i == -1 else f"#{i}")
        parts.append(f"{label}: {a} -> {b}")
    return f"differs from the nearest of {len(before)} earlier keys in " + ("; ".join(parts) or "nothing")


# Triton's JIT hooks are per process, so is their watch: the runners install it on a GPU
WATCH = CompileWatch()
