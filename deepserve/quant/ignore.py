"""The modules a quantized checkpoint leaves in 16-bit, read from its quantization_config.

Each format names them its own way (vLLM's matching rules; a parent module's name also covers
its modules):

| format                         | field                              | an entry matches module m when        |
|--------------------------------|------------------------------------|---------------------------------------|
| DeepSeek / vLLM fp8            | `ignored_layers`                   | it is m or a parent of m (`a.b` covers `a.b.c`) |
| Hugging Face fp8               | `modules_to_not_convert`           | it is a substring of m                |
| compressed-tensors             | `ignore`                           | it is m or a parent, or `re:` + a regex that `re.match`es m |
| compressed-tensors             | `config_groups.*.targets`          | no target matches m ("Linear": every Linear; else as `ignore`) |
| AutoAWQ, GPTQ                  | `modules_to_not_convert`           | it is a substring of m                |
| GPTQ (transformers)            | `modules_in_block_to_quantize`     | none of its entries is a substring of m |
| GPTQModel (GPTQ and AWQ)       | `dynamic` keys `-:regex`           | the regex `re.match`es m              |

Names are the checkpoint's (Hugging Face) module names. A model layer that fuses several
checkpoint modules (q/k/v into qkv_proj, gate/up into gate_up_proj) is left in 16-bit when all
its parts are and quantized when none is; a checkpoint whose parts disagree is refused naming
them (vLLM does the same). The routed experts of one MoE layer share one tensor: all of them or
none (layers/quantization.py, `experts_quantized`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ignore:
    """Which checkpoint modules stay unquantized; `ignore(module)` tells."""

    names: tuple[str, ...] = ()        # a module, a parent module, or "re:" + a regex
    substrings: tuple[str, ...] = ()   # any module whose name contains one
    targets: tuple[str, ...] = ("Linear",)   # the modules quantized (names as `names`), "Linear": all
    # `names` and `targets` made ready to match (a model's build asks about every expert matrix
    # of every layer: R1's 45,000 names)
    _names: _Entries = field(init=False, repr=False, compare=False)
    _targets: _Entries = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_names", _Entries(self.names))
        object.__setattr__(self, "_targets", _Entries(self.targets))

    def __call__(self, module: str) -> bool:
        if any(s in module for s in self.substrings) or self._names.name(module):
            return True
        return "Linear" not in self.targets and not self._targets.name(module)

    def __bool__(self) -> bool:
        return bool(self.names or self.substrings or "Linear" not in self.targets)


class _Entries:
    """Entries that name modules (a module, a parent module, or "re:" + a regex), compiled."""

    def __init__(self, entries: tuple[str, ...]):
        self.modules = frozenset(e for e in entries if not e.startswith("re:"))
        self.parents = tuple(e + "." for e in self.modules)   # a parent's name covers its modules
        self.patterns = tuple(_regex(e[3:]) for e in entries if e.startswith("re:"))

    def name(self, module: str) -> bool:
        """Whether one of the entries names `module`."""
        return module in self.modules or module.startswith(self.parents) or any(p.match(module) for p in self.patterns)


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{'re:' + pattern!r} is not a valid regular expression ({exc})") from None


def _entries(qc: dict, field: str) -> tuple[str, ...]:
    value = qc.get(field) or ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field} must be a list of module names, got {value!r}")
    return tuple(value)


def _gptq_dynamic(qc: dict) -> tuple[str, ...]:
    """GPTQModel's per-module overrides: `-:regex` keys leave the modules they match unquantized
    (kept, as "re:" entries); `+:regex` (or bare) keys whose overrides differ from the config's
    own values would quantize those modules differently, which deepserve does not serve."""
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"dynamic must map module regexes to overrides, got {dynamic!r}")
    out = []
    for key, override in dynamic.items():
        if key.startswith("-:"):
            out.append("re:" + key[2:])
        elif any(qc.get(k) != v for k, v in (override or {}).items()):
            raise ValueError(f"dynamic {key!r}: {override!r} quantizes those modules with other settings, "
                             f"which deepserve does not serve (only '-:' entries, which leave modules "
                             f"unquantized)")
    return tuple(out)


def checkpoint_ignore(hf_config) -> Ignore:
    """The modules `hf_config`'s quantization_config leaves unquantized (none without one)."""
    qc = hf_config.get("quantization_config") or {}
    try:
        return _read(qc)
    except ValueError as exc:
        raise ValueError(f"quantization_config ({qc.get('quant_method')}): {exc}") from None


def _read(qc: dict) -> Ignore:
    method = qc.get("quant_method")
    if method == "fp8":
        return Ignore(_entries(qc, "ignored_layers"), _entries(qc, "modules_to_not_convert"))
    if method == "compressed-tensors":
        targets = [t for group in (qc.get("config_groups") or {}).values() for t in _entries(group, "targets")]
        return Ignore(_entries(qc, "ignore"), targets=tuple(targets) or ("Linear",))
    if method == "awq":      # GPTQModel writes AWQ checkpoints with its `dynamic` too
        return Ignore(_gptq_dynamic(qc), _entries(qc, "modules_to_not_convert"))
    if method == "gptq":
        # the modules quantized in each block, as substrings of module names
        groups = qc.get("modules_in_block_to_quantize") or ()
        blocks = ([e for group in groups for e in ((group,) if isinstance(group, str) else group)]
                  if isinstance(groups, (list, tuple)) and all(isinstance(g, (str, list)) for g in groups) else [None])
        if not all(isinstance(e, str) for e in blocks):
            raise ValueError(f"modules_in_block_to_quantize must list module names, got "
                             f"{qc.get('modules_in_block_to_quantize')!r}")
        return Ignore(_gptq_dynamic(qc), _entries(qc, "modules_to_not_convert"),
                      tuple("re:.*" + re.escape(e) for e in blocks) or ("Linear",))
    return Ignore()
