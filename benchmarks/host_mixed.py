"""The host's cost of MLA + MoE mixed steps on the CPU: what a GPU host spends outside the kernels.

On a GPU, a mixed step of a few hundred tokens (decodes plus a short prompt chunk) runs the
piecewise graphs (engine/piecewise_graphs.py) with each layer's MLA attention eager between
them, and the GPU waits on the host's Python (docs/PERFORMANCE.md, "The two short rows
profiled"). This runs the same steps on the CPU through `LLM`, on a tiny DeepSeek-V2-Lite-shaped
model (--layers, default 27: the first dense, the rest MoE; q_lora_rank null; hidden sizes so
small that kernels cost next to nothing), with the pieces run as plain calls over the same
static buffers, and reports per step:

  wall ms of engine.step() of decode-only and of mixed steps (--decodes running sequences,
      plus one new --prompt-len prompt in the mixed one); with stub kernels the attention's
      output is whatever its buffer held, so the torch MoE after it (most of the CPU's wall)
      routes differently from one version of the code to another: compare the attend columns;
  attend ms: this thread's CPU time (other processes on the machine add none) in the eager
      attention (the pieces' `attend`: the MLA layer's `attend` and the hand-over of its
      output; with --no-piecewise the layer's `attend`), per step and per layer, with the first
      layer apart (it may build the step's prefill gather); the fastest of --repeats steps;
  op calls and aten launches made there (op-table calls, each one or two kernel launches on
      the triton backend, and the aten ops run outside them), and the host reads of device
      values (.item() / .tolist()) made outside the ops, counted over one more step than timed
      (under a dispatch mode whose own cost would swamp the times).

With --kernels stub (the default) the attention ops (paged_attention, the mla_* ops,
rotary_embedding) return their output buffers without computing them, so the attend time is
the layer's own host work plus one Python call per op, as a GPU host would spend before the
kernel launches; --kernels
triton-wrappers runs the triton backend's functions of those ops with their Triton launches
skipped (TRITON_INTERPRET=1 is set for them): the layer's host work plus those functions' own
(argument checks, launch-table lookups, temporaries) before the launches a GPU host then makes;
--kernels torch runs the torch reference (its attention loops over sequences on the host: that
is the reference's cost, not the layer's). --cprofile N: cProfile over N mixed steps, by function.

    python benchmarks/host_mixed.py                       # 27 layers, 64 decodes + a 32-token prompt
    python benchmarks/host_mixed.py --cprofile 3 --top 25
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, Optional

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the triton backend's functions on the CPU (no launches)

import torch
from launch_count import NO_LAUNCH, op_name, tiny_v2_lite_config
from torch.utils._python_dispatch import TorchDispatchMode

from deepserve import LLM, SamplingParams

def stub_ops(table) -> None:
    """The attention ops of `table` as stubs that compute nothing: each returns its output
    buffer (the one given, else a new one of the op's shape)."""
    def paged_attention(q, k_cache, v_cache, *args, out=None, **kwargs):
        return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1]) if out is None else out

    def mla_kv_write(*args, **kwargs):
        return None

    def mla_q_absorb(q, positions, cos_sin_cache, is_neox, w_uk):
        return q.new_empty(q.shape[0], q.shape[1], w_uk.shape[2] + q.shape[2] - w_uk.shape[1])

    def mla_v_up(out_lat, w_uv, out=None):
        return out_lat.new_empty(out_lat.shape[0], out_lat.shape[1], w_uv.shape[1]) if out is None else out

    def mla_decode_prep(q, kv_a, positions, cos_sin_cache, is_neox, w_uk, *args, **kwargs):
        return mla_q_absorb(q, positions, cos_sin_cache, is_neox, w_uk)

    def rotary_embedding(positions, q, k, cos_sin_cache, is_neox, inplace=False):
        return q, k

    stubs = (paged_attention, mla_kv_write, mla_q_absorb, mla_v_up, mla_decode_prep, rotary_embedding)
    assert tuple(fn.__name__ for fn in stubs) == ATTENTION_OPS
    for fn in stubs:
        setattr(table, fn.__name__, fn)
        table._fns[fn.__name__] = fn


ATTENTION_OPS = ("paged_attention", "mla_kv_write", "mla_q_absorb", "mla_v_up", "mla_decode_prep", "rotary_embedding")


@contextlib.contextmanager
def triton_wrappers(table) -> Iterator[None]:
    """The attention ops of `table` as the triton backend's functions, their Triton launches
    skipped (nothing computed): the host work of those functions before their launches. Inside
    the block every Triton launch is skipped."""
    from triton.runtime.jit import KernelInterface

    from deepserve.ops.registry import resolve
    for name in ATTENTION_OPS:
        backend, fn = resolve(name, "triton")
        assert backend == "triton", name
        setattr(table, name, fn)
        table._fns[name] = fn
    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


class AttendCounter(TorchDispatchMode):
    """While `counting`, per layer (`layer`, set by `instrument`'s wrappers): op-table calls and
    aten launches outside them (`inside_op` > 0 while an op runs: its own launches are the op's,
    counted as one call) in `calls[layer]`, and host reads of device values there in `syncs`."""

    def __init__(self):
        super().__init__()
        self.calls: dict[int, Counter] = defaultdict(Counter)
        self.syncs = 0
        self.inside_op = 0
        self.layer: Optional[int] = None
        self.counting = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and self.layer is not None and not self.inside_op:
            name = op_name(func)
            if name == "_local_scalar_dense":
                self.syncs += 1
            elif name not in NO_LAUNCH:
                self.calls[self.layer]["aten." + name] += 1
        return func(*args, **(kwargs or {}))

    def per_step(self) -> Counter:
        return sum(self.calls.values(), Counter())


def instrument(model, pieces, table, times: list, counter: AttendCounter) -> None:
    """Time the eager attention of each layer into times[layer] (seconds, summed): the pieces'
    `attend` (the layer's attend and what hands its output on) where `pieces` is given, else
    each MLA layer's `attend`; and count the op-table calls made there into counter.calls."""
    for name in list(table._fns):
        fn = getattr(table, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            if counter.counting and counter.layer is not None and not counter.inside_op:
                counter.calls[counter.layer]["op." + _name] += 1
            counter.inside_op += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                counter.inside_op -= 1
        setattr(table, name, counted)

    def timed_call(inner, layer_of):
        def timed(*args, **kwargs):
            counter.layer = layer_of(args)
            t0 = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                times[counter.layer] += time.thread_time() - t0
                counter.layer = None
        return timed
    if pieces is not None:
        pieces.attend = timed_call(pieces.attend, lambda args: args[0])
    else:
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.attend = timed_call(layer.self_attn.attend, lambda args, _i=i: _i)


def uninstrument(table) -> None:
    """The op table's own functions back (instrument's pieces / layers stay wrapped)."""
    for name, fn in table._fns.items():
        setattr(table, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--decodes", type=int, default=64, help="running sequences")
    p.add_argument("--prompt-len", type=int, default=32, help="the mixed steps' new prompt")
    p.add_argument("--context", type=int, default=100, help="prompt length of the running sequences")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kernels", default="stub", choices=("stub", "triton-wrappers", "torch"))
    p.add_argument("--piecewise", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed steps through the (uncaptured) piecewise pieces, as the GPU's up to --max-pieces")
    p.add_argument("--max-pieces", type=int, default=512)
    p.add_argument("--cprofile", type=int, default=0, help="cProfile this many mixed steps")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    torch.set_num_threads(1)
    scratch = tempfile.TemporaryDirectory(prefix="host_mixed_")   # the config.json (dummy weights)
    folder = Path(scratch.name)
    (folder / "config.json").write_text(json.dumps(tiny_v2_lite_config(args.layers)))
    steps = 3 * (args.repeats + 1) + 2 * args.cprofile + 16   # decode steps the running sequences last
    llm = LLM(str(folder), load_format="dummy", device="cpu", ops="torch", dtype="float32", seed=0,
              max_model_len=args.context + steps + args.prompt_len + 16, max_num_seqs=args.decodes + 8,
              max_num_batched_tokens=max(2048, args.prompt_len + args.decodes), kv_cache_memory_bytes=64 << 20,
              async_scheduling=False, skip_tokenizer_init=True)
    eng = llm.engine
    runner = eng.runner
    eng.block_manager.enable_prefix_caching = False
    stack = contextlib.ExitStack()
    if args.kernels == "stub":
        stub_ops(runner.ops)
    elif args.kernels == "triton-wrappers":
        stack.enter_context(triton_wrappers(runner.ops))
    pieces = None
    if args.piecewise:
        from deepserve.engine.piecewise_graphs import PiecewiseGraphs
        pieces = runner.piecewise = PiecewiseGraphs(runner.model, args.max_pieces, runner.device)
    layers = len(runner.model.model.layers)
    times = [0.0] * layers
    counter = AttendCounter()
    instrument(runner.model, pieces, runner.ops, times, counter)

    gen = torch.Generator().manual_seed(0)
    vocab = runner.vocab_size

    def prompt(n: int) -> dict:
        return {"prompt_token_ids": torch.randint(1, vocab, (n,), generator=gen).tolist()}

    long = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(args.decodes):
        eng.add_request(None, prompt(args.context), long)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()

    def step() -> float:
        t0 = time.perf_counter()
        eng.step()
        return time.perf_counter() - t0

    def measure(mixed: bool) -> dict:
        """Timed steps (`repeats`), then one counted under the dispatch mode (its time not taken:
        the mode's own Python cost is per aten op)."""
        walls, attend, first = [], [], []
        for r in range(args.repeats + 1):
            if mixed:
                eng.add_request(None, prompt(args.prompt_len), one)
            times[:] = [0.0] * layers
            if r < args.repeats:
                walls.append(step())
                attend.append(sum(times))
                first.append(times[0])
            else:
                counter.calls.clear()
                counter.syncs = 0
                counter.counting = True
                with counter:
                    step()
                counter.counting = False
            if mixed:
                eng.step()    # the new prompt's token: a decode-only step
        ms = 1e3
        # the fastest step of each (timeit's rule: other processes only ever add time)
        return {"wall_ms": min(walls) * ms, "attend_ms": min(attend) * ms,
                "attend_first_layer_ms": min(first) * ms,
                "attend_other_layer_ms": min(a - f for a, f in zip(attend, first)) * ms / (layers - 1),
                "calls_per_step": dict(counter.per_step()), "syncs_outside_ops": counter.syncs}

    for _ in range(3):   # warm-up
        step()
    res = {"args": vars(args), "decode": measure(False), "mixed": measure(True)}
    print(f"tiny V2-Lite-shaped model, {layers} MLA layers, CPU ({args.kernels} attention kernels"
          f"{', piecewise pieces' if args.piecewise else ', eager'}); {args.decodes} decodes, mixed: + one "
          f"{args.prompt_len}-token prompt; the fastest of {args.repeats} steps")
    print("| step | wall ms | attend ms | attend ms, layer 0 | attend ms, each later layer | "
          "op calls + aten launches in attend, a step | host syncs in attend |\n|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("decode", "mixed"):
        r = res[kind]
        print(f"| {kind} | {r['wall_ms']:.2f} | {r['attend_ms']:.2f} | {r['attend_first_layer_ms']:.3f} | "
              f"{r['attend_other_layer_ms']:.3f} | {sum(r['calls_per_step'].values())} | {r['syncs_outside_ops']} |")
    print("mixed step, attend's calls:", ", ".join(f"{k} x{v}" for k, v in sorted(res["mixed"]["calls_per_step"].items())))

    if args.cprofile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        for _ in range(args.cprofile):
            eng.add_request(None, prompt(args.prompt_len), one)
            prof.enable()
            step()
            prof.disable()
            eng.step()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(args.top)
    stack.close()
    eng.shutdown()
    scratch.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
