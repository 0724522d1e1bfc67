"""Operator registry: one name per op, implementations per backend, and the `OpTable` each model
resolves from them once, at start.

Backends register their kernels here (`register(op, backend)`); an `OpTable` built from a
backend name holds, for every op, the function that runs it (the backend's own, else the torch
reference) and is handed to the model's layers (`bind`), so two engines of one process can run
different backends. Tables count op calls only while counting (`OpTable.counting`, or every
call with DEEPSERVE_OPS_COUNT=1): the engine counts one start-up step to report which share of
op calls runs as Triton kernels, and a production call goes straight to its kernel.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Callable, Iterator

BACKENDS = ("torch", "triton", "flaggems")
TRITON_ALL = "triton-all"  # the triton backend with every shape on the Triton kernels (no cuBLAS)
# where a backend without its own kernel for an op looks next, before the torch reference:
# flaggems runs deepserve's Triton kernels, and FlagGems takes the aten ops beneath them and
# beneath the torch reference (the GEMMs given to cuBLAS, embeddings, elementwise ops)
_FALLBACK = {"flaggems": ("triton",)}

_impls: dict[str, dict[str, Callable]] = collections.defaultdict(dict)
_plugin_backends: set[str] = set()  # out-of-tree platforms' own backends (add_backend)
# (op, backend) whose function chooses between a Triton kernel and cuBLAS/torch per shape and
# takes `force_triton` (a triton-all table passes True)
_per_shape: set[tuple[str, str]] = set()
_flaggems_enabled = False
# what an OpTable holds beside its ops: no op may take these names
_TABLE_FIELDS = frozenset(("name", "backend", "force_triton", "runs", "counts", "always_counting"))


def known_backends() -> tuple[str, ...]:
    return BACKENDS + tuple(sorted(_plugin_backends))


def add_backend(name: str) -> None:
    """An out-of-tree platform's ops backend: its kernels register under `name`; ops it lacks
    run the torch reference."""
    if name in BACKENDS or name == TRITON_ALL:
        raise ValueError(f"ops backend {name!r} is built in")
    _plugin_backends.add(name)


def register(op: str, backend: str, per_shape: bool = False) -> Callable[[Callable], Callable]:
    """Register `op`'s implementation under `backend`. `per_shape`: the function picks a Triton
    kernel or cuBLAS per shape and takes a `force_triton` keyword (True under triton-all)."""
    if backend not in known_backends():
        raise ValueError(f"unknown ops backend {backend!r}; known: {known_backends()}")
    if op.startswith("_") or op in _TABLE_FIELDS or hasattr(OpTable, op):
        raise ValueError(f"op name {op!r} is taken by the op table itself")

    def wrap(fn: Callable) -> Callable:
        _impls[op][backend] = fn
        if per_shape:
            _per_shape.add((op, backend))
        return fn

    return wrap


def resolve(op: str, backend: str) -> tuple[str, Callable]:
    """The (backend, function) that runs `op` under `backend`. The backend's kernels are
    imported first: they register on import, and a caller that had not imported them (a test
    run alone) would otherwise get the torch reference for every op. Without Triton installed
    the torch reference runs, as `deepserve ops` lists (OpTable refuses such a backend); any
    other failed import is raised."""
    try:
        _import_kernels(backend)
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise
    impls = _impls[op]
    for name in (backend,) + _FALLBACK.get(backend, ()):
        if name in impls:
            return name, impls[name]
    return "torch", impls["torch"]


def replays_graphs(backend: str) -> bool:
    """Whether a model on `backend` can be captured as CUDA graphs: its kernels never wait on
    the host (the torch reference does: data-dependent shapes, .item())."""
    return backend in ("triton", "flaggems")


def op_backends() -> dict[str, list[str]]:
    """The backends of each op: the built-in ones first, then out-of-tree platforms' own."""
    order = {b: i for i, b in enumerate(known_backends())}
    return {op: sorted(impls, key=order.__getitem__) for op, impls in sorted(_impls.items())}


# FlagGems functions left to torch under --ops flaggems (FlagGems matches them by function name):
# - `mul`: FlagGems 5.0.2's Hopper `mul` treats two tensors of the same rank as the same shape
#   (no broadcasting), so rms_norm's x [T, H] * rsqrt [T, 1] reads out of bounds (an illegal
#   memory access on an H100; docs/PERFORMANCE.md "Portability");
# - the random draws: FlagGems' own ignore the torch.Generator passed in, so dummy weights and
#   per-request seeds would not follow their seeds (and would differ from every other backend's).
FLAGGEMS_EXCLUDED = ["mul", "exponential_", "multinomial", "normal_", "normal_tensor_tensor", "normal_tensor_float",
                     "normal_float_tensor", "rand", "rand_like", "randn", "randn_like", "randperm", "uniform_"]


def check_backend_runs_on(platform_name: str, ops: str) -> None:
    """A Triton backend (`triton`, `triton-all`, `flaggems`) on the CPU platform needs Triton's
    interpreter (TRITON_INTERPRET=1); without it one line names the way out, instead of Triton's
    "0 active drivers" from the first kernel launch."""
    if platform_name != "cpu" or ops not in ("triton", TRITON_ALL, "flaggems"):
        return
    from deepserve.ops.triton._common import interpret_env
    if not interpret_env():
        raise ValueError(f"--ops {ops} runs Triton kernels, which need a GPU (this machine runs on the CPU); "
                         "use --ops torch, or TRITON_INTERPRET=1 to interpret them (slow)")


def _import_kernels(name: str) -> None:
    """Import the kernels backend `name` runs (they register on import): flaggems runs the
    Triton ones (_FALLBACK)."""
    if name in ("triton", "flaggems"):
        import deepserve.ops.triton  # noqa: F401


def _load_backend(name: str) -> None:
    """Import what backend `name` needs: its kernels; FlagGems patches aten for the whole process
    (its design), once."""
    global _flaggems_enabled
    _import_kernels(name)
    if name == "flaggems" and not _flaggems_enabled:
        try:
            import flag_gems
        except ImportError:
            raise RuntimeError("--ops flaggems needs FlagGems: pip install 'deepserve[flaggems]'") from None
        flag_gems.enable(unused=FLAGGEMS_EXCLUDED)
        _flaggems_enabled = True


def counting_from_env() -> bool:
    return os.environ.get("DEEPSERVE_OPS_COUNT", "0").lower() in ("1", "true")


class OpTable:
    """The op functions one model runs, resolved once from a backend name: `table.rms_norm(...)`
    is the backend's kernel (or the torch reference where the backend has none).

    `name` is the backend asked for (`torch`, `triton`, `triton-all`, `flaggems` or an
    out-of-tree platform's); `backend` the one that registers the kernels (`triton` for
    `triton-all`); `force_triton` whether ops that choose a Triton kernel or cuBLAS per shape
    take the kernel at every shape; `runs` which backend runs each op. `counts` holds
    (op, backend) -> calls made while counting."""

    def __init__(self, name: str = "torch", count: bool | None = None):
        force = name == TRITON_ALL
        backend = "triton" if force else name
        if backend not in known_backends():
            raise ValueError(f"ops backend must be one of {known_backends() + (TRITON_ALL,)}, got {name!r}")
        _load_backend(backend)
        self.name, self.backend, self.force_triton = name, backend, force
        self._fns: dict[str, Callable] = {}
        self.runs: dict[str, str] = {}
        for op in sorted(_impls):
            ran, fn = resolve(op, backend)
            if force and (op, ran) in _per_shape:
                fn = functools.partial(fn, force_triton=True)
            self._fns[op], self.runs[op] = fn, ran
        self.counts: collections.Counter = collections.Counter()
        self.always_counting = counting_from_env() if count is None else count
        self._bind(self.always_counting)

    def __repr__(self) -> str:
        return f"OpTable({self.name!r})"

    def _bind(self, counted: bool) -> None:
        for op, fn in self._fns.items():
            setattr(self, op, self._counted(op, fn) if counted else fn)

    def _counted(self, op: str, fn: Callable) -> Callable:
        key, counts = (op, self.runs[op]), self.counts

        def call(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        call.__name__ = call.__qualname__ = op
        return call

    @contextlib.contextmanager
    def counting(self) -> Iterator[collections.Counter]:
        """Count this table's op calls inside the block (into `counts`, which it yields)."""
        if self.always_counting:
            yield self.counts
            return
        self._bind(True)
        try:
            yield self.counts
        finally:
            self._bind(False)

    def call_totals(self) -> dict[str, int]:
        """Op calls counted, all and those that ran as Triton kernels (what /metrics reports;
        summed over DP ranks the share stays a share)."""
        return {"op_calls": sum(self.counts.values()),
                "triton_op_calls": sum(n for (_, b), n in self.counts.items() if b == "triton")}

    def triton_share(self) -> float:
        """Share of the counted op calls that ran as Triton kernels."""
        totals = self.call_totals()
        return totals["triton_op_calls"] / totals["op_calls"] if totals["op_calls"] else 0.0


def bind(module, table: OpTable) -> None:
    """Give `module` and every module below it `table` as their `ops`."""
    for m in module.modules():
        m.ops = table
