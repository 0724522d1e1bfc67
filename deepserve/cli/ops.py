"""`deepserve ops`: list every operator with the backends that implement it and the one that
runs under the chosen backend.

    deepserve ops [--ops auto|torch|triton|triton-all|flaggems] [--device auto|cpu|cuda|...]

The torch reference exists for every op; `triton` marks a Triton kernel (imported here so
its registrations show, which needs no GPU); an out-of-tree platform's own backend shows once
its plugin is installed. `flaggems` runs the torch path with FlagGems patching aten underneath,
so it is listed for every op when FlagGems is installed. The `runs` column resolves --ops (or
DEEPSERVE_OPS / USE_FLAGGEMS; auto = the device platform's default) as the engine does: an op
the backend lacks runs the torch reference.
"""
from __future__ import annotations

import importlib.util

from deepserve.ops.registry import TRITON_ALL

TOP = 15    # kernels --profile lists by default

# ops that pick a kernel per shape under the triton backend, and how
PER_SHAPE = {
    "linear": "triton: one row -> Triton GEMV; more rows -> Triton GEMM or cuBLAS by the device's "
              "configs/gemm table (flaggems: FlagGems' GEMM in cuBLAS's place); triton-all -> Triton "
              "at every shape",
    "linear_pair": "triton: one row -> one Triton GEMV launch; more rows -> as linear",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("ops", help="list operators, their backends (torch, triton, flaggems) and which runs",
                              description=__doc__)
    p.add_argument("--ops", default=None,
                   help="The backend to resolve: auto | torch | triton | triton-all | flaggems "
                        "(default: DEEPSERVE_OPS, USE_FLAGGEMS=1, else auto).")
    p.add_argument("--device", default="auto", help="Platform whose default backend `auto` means.")
    p.add_argument("--profile", metavar="MODEL", default=None,
                   help="Instead of the table: start MODEL (a folder or a preset, random weights) with "
                        "--ops-profile and print where its start-up generation's kernel time went.")
    p.add_argument("--hf-overrides", default=None, help="With --profile: JSON merged over config.json, "
                   "e.g. '{\"num_hidden_layers\": 2}'.")
    p.add_argument("--max-model-len", type=int, default=None, help="With --profile: the engine's max_model_len.")
    p.add_argument("--top", type=int, default=None, help=f"With --profile: kernels listed (default {TOP}).")
    p.set_defaults(func=run)


def op_rows() -> tuple[list[tuple[str, list[str]]], str | None]:
    """(op, backends) per op, and a note when the Triton kernels could not be loaded."""
    from deepserve.ops.registry import op_backends

    note = None
    try:
        import deepserve.ops.triton  # noqa: F401  (registers the kernels)
    except ImportError as exc:
        note = f"triton kernels unavailable: {exc}"
    has_flaggems = importlib.util.find_spec("flag_gems") is not None
    rows = []
    for op, backends in op_backends().items():
        rows.append((op, backends + (["flaggems"] if has_flaggems and "flaggems" not in backends else [])))
    return rows, note


def chosen_backend(ops: str | None, device: str) -> str:
    """The backend name --ops resolves to, as EngineArgs and the model runner resolve it."""
    from deepserve.config import EngineArgs
    from deepserve.platforms import get_platform

    chosen = EngineArgs(ops=ops or "auto", device=device).ops
    return get_platform(device).default_ops if chosen == "auto" else chosen


def runs(op: str, backend: str) -> str:
    from deepserve.ops.registry import resolve

    ran = resolve(op, "triton" if backend == TRITON_ALL else backend)[0]
    if backend == "flaggems" and ran == "torch":
        return "torch (aten under FlagGems)"
    return ran


def _check_profile_flags(args) -> None:
    """The flags of --profile are refused without it (the table ignores them)."""
    given = [flag for flag, value in (("--hf-overrides", args.hf_overrides), ("--max-model-len", args.max_model_len),
                                      ("--top", args.top)) if value is not None]
    if given and not args.profile:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --profile MODEL only")
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")


def run(args) -> int:
    _check_profile_flags(args)
    backend = chosen_backend(args.ops, args.device)
    if args.profile:
        return profile_model(args, backend)
    rows, note = op_rows()
    width = max(len(op) for op, _ in rows)
    bwidth = max(len(", ".join(b)) for _, b in rows)
    print(f"--ops {backend}")
    print(f"{'op':<{width}}  {'backends':<{bwidth}}  runs")
    for op, backends in rows:
        print(f"{op:<{width}}  {', '.join(backends):<{bwidth}}  {runs(op, backend)}")
    if backend in ("triton", TRITON_ALL, "flaggems"):
        for op, how in PER_SHAPE.items():
            print(f"{op}: {how}")
    if note:
        print(note)
    return 0


def profile_model(args, backend: str) -> int:
    """`deepserve ops --profile MODEL`: the engine's start-up --ops-profile report as a table."""
    import json

    from deepserve import LLM

    try:
        overrides = json.loads(args.hf_overrides) if args.hf_overrides else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--hf-overrides is not valid JSON: {args.hf_overrides!r} ({exc.msg})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--hf-overrides must be a JSON object, got {args.hf_overrides!r}")
    llm = LLM(args.profile, ops=backend, device=args.device, ops_profile=True, hf_overrides=overrides,
              max_model_len=args.max_model_len, load_format="dummy")
    try:
        profiler = getattr(llm.engine, "ops_profiler", None)
        if profiler is None:  # a front end: the engine core logs its report in its own process
            raise RuntimeError("the engine core ran in a process of its own (DEEPSERVE_ENGINE_CORE_PROCESS=1 or "
                               "data parallel): its --ops-profile report is in its log, not here; unset it")
        print(f"--ops {backend}, {args.profile} on {llm.engine.runner.device}: "
              f"{100 * llm.engine.runner.ops.triton_share():.1f}% of a counted step's op calls ran as Triton kernels")
        print(profiler.report.table(args.top or TOP))
    finally:
        llm.shutdown()
    return 0
