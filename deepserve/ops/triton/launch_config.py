"""Kernel launch settings as data: per-device JSON tables, as vLLM keeps its fused-MoE configs.

A device is known by its properties, not its name: the key `sm90-132sm-144g` is compute
capability 9.0 (`gfx..` on ROCm), 132 SMs and about 144 GiB of memory (total memory rounded to
16 GiB: the H200; the 80 GB H100 is `sm90-132sm-80g`). `configs/<op>/default.json` holds the
settings of a device nobody measured separately, and `configs/<op>/<KEY>.json` what devices
measured differently: a table applies where every dash-separated part of its key is a part of
the device's (`sm90.json` would apply to every sm90 device, `sm90-132sm-144g.json` to the
H200s alone); "interpreter" is the CPU interpreter (TRITON_INTERPRET=1), where numpy's cost is
per operation: few, large programs. The sweep scripts in benchmarks/ write these files
(`--write`, under the measured device's full key); docs/PERFORMANCE.md keeps what was measured
when.

A table is a list of rules, each `{"if": {conditions}, "set": {settings}}`. Every rule whose
conditions all hold updates the settings, in file order, so a narrower rule follows a broader
one; a device's table is the default's rules followed by its own files' rules (keys of fewer
parts first). A condition names a shape variable the op passes (`n`, `k`, `kernel`, `fp8`,
...): `"v": x` is equality, `"v_le"`, `"v_lt"`, `"v_ge"`, `"v_gt"` bounds, `"v_multiple_of"`
and `"v_not_multiple_of"` divisibility.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import torch

from deepserve.ops.triton._common import device_properties, interpreting

CONFIG_DIR = Path(__file__).with_name("configs")
INTERPRETER = "interpreter"
DEFAULT = "default"

_TESTS = {
    "le": lambda v, x: v <= x, "lt": lambda v, x: v < x, "ge": lambda v, x: v >= x, "gt": lambda v, x: v > x,
    "multiple_of": lambda v, x: v % x == 0, "not_multiple_of": lambda v, x: v % x != 0,
}

# extra rules appended to an op's table while a sweep or a test tries settings (`trying`)
_trials: dict[str, list[dict]] = {}


MEMORY_CLASS_GIB = 16


def properties_key(props, hip: Optional[bool] = None) -> str:
    """The table key of a device with these properties (torch.cuda.get_device_properties, or
    anything with major, minor, multi_processor_count and total_memory): "sm90-132sm-144g"."""
    hip = torch.version.hip is not None if hip is None else hip
    arch = f"{'gfx' if hip else 'sm'}{props.major}{props.minor}"
    memory = int(props.total_memory / 2**30 / MEMORY_CLASS_GIB + 0.5) * MEMORY_CLASS_GIB
    return f"{arch}-{props.multi_processor_count}sm-{memory}g"


# properties_key of each properties object met (the one torch returns per device: read once),
# by identity, so that a launch's code builds no string
_keys: dict[int, tuple[object, str]] = {}


def device_key(device: torch.device) -> str:
    """Which tables apply: "interpreter" under TRITON_INTERPRET=1, else the device's
    properties_key ("" off CUDA: the default table alone)."""
    if interpreting():
        return INTERPRETER
    props = device_properties(device)
    if props is None:
        return ""
    known = _keys.get(id(props))
    if known is None or known[0] is not props:
        known = _keys[id(props)] = (props, properties_key(props))
    return known[1]


def _applies(table_key: str, device: str) -> bool:
    return set(table_key.split("-")) <= set(device.split("-"))


def dumps(rules: list[dict]) -> str:
    """A table as JSON, one rule a line."""
    return "[\n" + ",\n".join(" " + json.dumps(rule) for rule in rules) + "\n]\n" if rules else "[]\n"


def _holds(condition: str, expected, shape: dict) -> bool:
    for suffix, test in _TESTS.items():
        if condition.endswith("_" + suffix) and condition[:-len(suffix) - 1] in shape:
            return test(shape[condition[:-len(suffix) - 1]], expected)
    if condition not in shape:
        raise KeyError(f"launch table condition {condition!r} names no shape variable of {sorted(shape)}")
    return shape[condition] == expected


def _read(path: Path) -> list[dict]:
    rules = json.loads(path.read_text())
    if not isinstance(rules, list) or not all(isinstance(r, dict) and "set" in r for r in rules):
        raise ValueError(f"{path}: a launch table is a list of {{'if': ..., 'set': ...}} rules")
    return rules


@functools.lru_cache(maxsize=None)
def table(op: str, device: str) -> tuple[dict, ...]:
    """The rules for `op` on the device of key `device` (see device_key)."""
    folder = CONFIG_DIR / op
    if not (folder / f"{DEFAULT}.json").is_file():
        raise FileNotFoundError(f"no launch table {folder / (DEFAULT + '.json')}")
    rules = _read(folder / f"{DEFAULT}.json")
    named = sorted((p for p in folder.glob("*.json") if p.stem != DEFAULT and _applies(p.stem, device)),
                   key=lambda p: (len(p.stem.split("-")), p.stem))
    for path in named:
        rules += _read(path)
    return tuple(rules)


@functools.lru_cache(maxsize=8192)
def _resolve(op: str, device: str, shape: tuple) -> tuple:
    settings, vars_ = {}, dict(shape)
    for rule in table(op, device) + tuple(_trials.get(op, ())):
        if all(_holds(c, x, vars_) for c, x in rule.get("if", {}).items()):
            settings.update(rule["set"])
    return tuple(settings.items())


def lookup(op: str, device: str, **shape) -> dict:
    """The settings of `op` for these shape variables on the device of key `device` (as
    device_key gives), a new dict each call."""
    return dict(_resolve(op, device, tuple(sorted(shape.items()))))


def launch_settings(op: str, device: torch.device, **shape) -> dict:
    """The settings of `op` for these shape variables on `device`."""
    return lookup(op, device_key(device), **shape)


# what `memoized` functions derived from the tables, dropped whenever the tables change
_memoized: list = []


def memoized(fn):
    """fn (hashable arguments: a device key and shape variables) cached until the tables change
    (`trying`, `save_rules`): a launch's code derives its settings from a table once a shape,
    not at every launch. What it returns is shared between calls, so never changed."""
    cached = functools.lru_cache(maxsize=1024)(fn)
    _memoized.append(cached)
    return cached


@memoized
def shared_lookup(op: str, device: str, **shape) -> dict:
    """lookup's settings, one dict per (op, device key, shape) shared between calls until the
    tables change: for launch code that reads them at every call and never changes them."""
    return lookup(op, device, **shape)


def tables_changed() -> None:
    """Forget every setting read from the tables (after a table file or a trial changed)."""
    table.cache_clear()
    _resolve.cache_clear()
    for cached in _memoized:
        cached.cache_clear()


@contextlib.contextmanager
def trying(op: str, rules: list[dict]) -> Iterator[None]:
    """Append `rules` to `op`'s table inside the block: how sweeps time candidate settings
    and tests reach settings the tables do not pick on this machine."""
    previous = _trials.get(op)
    _trials[op] = list(previous or ()) + list(rules)
    tables_changed()
    try:
        yield
    finally:
        if previous is None:
            _trials.pop(op, None)
        else:
            _trials[op] = previous
        tables_changed()


def range_conditions(var: str, points: list[float], below: Optional[float] = None) -> list[dict]:
    """Conditions on shape variable `var` that share its axis among measured points (positive,
    ascending): point i holds from the geometric mean with point i-1 (exclusive) to the one with
    point i+1 (inclusive); the first from the axis' start, the last up to `below` (exclusive; no
    bound when None). How a sweep measured at a few sizes writes rules for the sizes between."""
    if not points or points[0] <= 0 or any(a >= b for a, b in zip(points, points[1:])):
        raise ValueError(f"range_conditions needs positive ascending points, got {points}")
    if below is not None and points[-1] >= below:
        raise ValueError(f"range_conditions: point {points[-1]} is not below {below}")
    bounds = []
    for a, b in zip(points, points[1:]):
        mid = math.sqrt(a * b)
        bounds.append(round(mid, 3) if a < round(mid, 3) < b else mid)   # short in the JSON where it can be
    conditions = []
    for i in range(len(points)):
        cond = {f"{var}_gt": bounds[i - 1]} if i else {}
        if i < len(bounds):
            cond[f"{var}_le"] = bounds[i]
        elif below is not None:
            cond[f"{var}_lt"] = below
        conditions.append(cond)
    return conditions


def save_rules(op: str, device: str, rules: list[dict], folder: Optional[Path] = None) -> Path:
    """Write `rules` into `op`'s table for the device of key `device` (a sweep's result): each
    replaces a rule with the same conditions there, or is appended. Returns the file."""
    path = (folder or CONFIG_DIR) / op / f"{device.replace(' ', '_') or DEFAULT}.json"
    current = _read(path) if path.is_file() else []
    for rule in rules:
        current = [r for r in current if r.get("if", {}) != rule.get("if", {})] + [rule]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(current))
    tables_changed()
    return path
