"""`deepserve ops`: list every operator with the backends that implement it.

    deepserve ops

The torch reference exists for every op; `triton` marks a Triton kernel (imported here so
its registrations show, which needs no GPU). `flaggems` runs the torch path with FlagGems
patching aten underneath, so it is listed for every op when FlagGems is installed.
"""
from __future__ import annotations

import importlib.util


def register(subparsers) -> None:
    p = subparsers.add_parser("ops", help="list operators and their backends (torch, triton, flaggems)",
                              description=__doc__)
    p.set_defaults(func=run)


def op_rows() -> tuple[list[tuple[str, list[str]]], str | None]:
    """(op, backends) per op, and a note when the Triton kernels could not be loaded."""
    from deepserve.ops.registry import op_table

    note = None
    try:
        import deepserve.ops.triton  # noqa: F401  (registers the kernels)
    except ImportError as exc:
        note = f"triton kernels unavailable: {exc}"
    has_flaggems = importlib.util.find_spec("flag_gems") is not None
    rows = []
    for op, backends in op_table().items():
        rows.append((op, backends + (["flaggems"] if has_flaggems and "flaggems" not in backends else [])))
    return rows, note


def run(args) -> int:
    rows, note = op_rows()
    width = max(len(op) for op, _ in rows)
    print(f"{'op':<{width}}  backends")
    for op, backends in rows:
        print(f"{op:<{width}}  {', '.join(backends)}")
    if note:
        print(note)
    return 0
