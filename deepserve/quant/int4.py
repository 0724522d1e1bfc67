"""4-bit weight checkpoints: AutoAWQ GEMM, GPTQ and compressed-tensors pack-quantized (or int-quantized).

Every format stores eight 4-bit values per int32, with its own axis and nibble order:

| format             | packed weight           | nibble i of an int32 holds          | zero points                |
|--------------------|-------------------------|-------------------------------------|----------------------------|
| AutoAWQ GEMM       | `qweight` [K, N/8]      | column 8c + (0,2,4,6,1,3,5,7)[i]    | `qzeros` [K/G, N/8], AWQ order, as is |
| GPTQ               | `qweight` [K/8, N]      | row 8r + i                          | `qzeros` [K/G, N/8], in order; v1 stores z - 1 |
| compressed-tensors | `weight_packed` [N, K/8]| column 8c + i, value q + 8          | `weight_zero_point` [N/8, K/G] (rows packed), zp + 8 |

(AutoAWQ's `WQLinear_GEMM.from_linear`, AutoGPTQ's `QuantLinear.pack`, compressed-tensors'
`pack_to_int32`.) Scales are [K/G, N] (AWQ, GPTQ) or [N, K/G] (compressed-tensors; [N, 1] for
the channel strategy), and w = (u - z) * s with u the unsigned nibble.

In memory every format becomes one layout, the one the kernels read: `qweight` int32
[N, K/8] with nibble i of column c holding input feature 8c + i (unsigned, 0..15), scales
[N, K/G], zero points uint8 [N, K/G] (absent for symmetric weights: z = 8) and, with
activation reordering, `g_idx` [K] (input feature -> group). The conversion runs once per
checkpoint tensor at load; the weight stays 4-bit.

compressed-tensors' `int-quantized` format (what the library writes for int4 weights with int8
activations, W4A8, unless told pack-quantized) keeps one signed value a byte: `weight` int8 [N, K]
in -8..7 and, asymmetric, `weight_zero_point` int8 [N, K/G]; `int8_to_packed` packs them as
pack-quantized stores them (value + 8) as they stream in, so they stay 4-bit from there on.

GPTQ v1 (`checkpoint_format` "gptq", AutoGPTQ's default) stores each zero point minus one
(the packer subtracts 1, every kernel adds it back), so z = nibble + 1, up to 16; "gptq_v2"
(GPTQModel) stores z itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

from deepserve.ops.int4 import PACK, SEQUENTIAL, dequant_int4, pack_int4, unpack_int4
from deepserve.quant.fp8 import first_bad_value
from deepserve.quant.ignore import Ignore, checkpoint_ignore
from deepserve.quant.qconfig_fields import describe_schemes, distinct_schemes, group_format

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # AWQ: nibble i holds column AWQ_ORDER[i] of its 8
FORMATS = ("awq", "gptq", "compressed-tensors")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Int4Spec:
    """A 4-bit checkpoint's quantization_config, read once."""
    fmt: str                      # "awq" | "gptq" | "compressed-tensors"
    group_size: int               # -1: one group over all input features (channel)
    symmetric: bool               # no stored zero points (z = 8)
    act_order: bool               # g_idx maps input features to groups
    zero_plus_one: bool = False   # GPTQ v1: stored zero = z - 1
    activations: Optional[str] = None  # None (W4A16) | "int8-token" (W4A8)
    ignore: Ignore = Ignore()     # the modules the checkpoint leaves unquantized (quant/ignore.py)
    scale_dtype: torch.dtype = torch.float16
    names: dict = field(default_factory=dict)   # role -> checkpoint suffix
    packed: bool = True           # compressed-tensors "int-quantized": one int8 a value (int8_to_packed)

    @property
    def method(self) -> str:
        if self.fmt == "compressed-tensors":
            return "w4a8-int8" if self.activations else "w4a16"
        return self.fmt

    def skipped(self, module: str) -> bool:
        """Whether checkpoint module `module` is left unquantized by the checkpoint."""
        return self.ignore(module)

    def role(self, name: str) -> Optional[tuple[str, str]]:
        """(module, role) when checkpoint tensor `name` is part of a 4-bit weight, else None."""
        for role, suffix in self.names.items():
            if name.endswith("." + suffix):
                return name[: -len(suffix) - 1], role
        return None

    def required(self) -> set[str]:
        """Roles every 4-bit module must provide."""
        need = {"qweight", "scales"}
        if not self.symmetric or self.fmt != "compressed-tensors":
            need.add("qzeros")
        if self.act_order:
            need.add("g_idx")
        if self.fmt == "compressed-tensors":
            need.add("shape")
        return need


AWQ_NAMES = {"qweight": "qweight", "qzeros": "qzeros", "scales": "scales"}
GPTQ_NAMES = {**AWQ_NAMES, "g_idx": "g_idx"}
CT_NAMES = {"qweight": "weight_packed", "scales": "weight_scale", "qzeros": "weight_zero_point",
            "g_idx": "weight_g_idx", "shape": "weight_shape"}


def _bits(value, where: str) -> None:
    if value != 4 or isinstance(value, bool):
        what = f"{value}-bit weights are" if isinstance(value, int) else f"bits {value!r} is"
        raise ValueError(f"{where}: {what} not supported; deepserve serves 4-bit "
                         f"AWQ / GPTQ / compressed-tensors and 8-bit W8A8")


def _flag(value, default: bool, name: str, where: str) -> bool:
    """A true / false field of a quantization config; a string such as "false" is refused (it
    would read as true)."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {name} {value!r} must be true or false")
    return value


def _group(value, where: str) -> int:
    if value not in (None, -1) and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: group_size {value!r} must be -1 or a positive multiple of {PACK}")
    g = -1 if value in (None, -1) else value
    if g != -1 and (g <= 0 or g % PACK):
        raise ValueError(f"{where}: group_size {value} must be -1 or a positive multiple of {PACK}")
    return g


def _ct_spec(qc: dict, scale_dtype: torch.dtype, ignore: Ignore) -> Optional[Int4Spec]:
    groups = distinct_schemes(qc)
    weights = [(n, g.get("weights") or {}, g.get("input_activations")) for n, g in groups.items()]
    if not weights or all((w.get("num_bits") == 8) for _, w, _ in weights):
        return None   # the int8 W8A8 scheme: models/loader.py
    if len(weights) != 1:
        raise ValueError(f"compressed-tensors config_groups {sorted(groups)}: deepserve serves one "
                         f"4-bit scheme per checkpoint, not a mix ({describe_schemes(groups)})")
    gname, w, a = weights[0]
    fmt = group_format(qc, groups[gname]) or "pack-quantized"
    if fmt not in ("pack-quantized", "int-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} with 4-bit weights is not "
                         f"supported; deepserve serves pack-quantized and int-quantized")
    where = f"compressed-tensors group {gname}"
    _bits(w.get("num_bits"), where)
    if w.get("type", "int") != "int":
        raise ValueError(f"{where}: weight type {w.get('type')!r} is not supported (int only)")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise ValueError(f"{where}: weight strategy {strategy!r} is not supported (group or channel)")
    if strategy == "group" and w.get("group_size") in (None, -1):
        raise ValueError(f"{where}: weight strategy 'group' with group_size {w.get('group_size')!r}; "
                         f"a group strategy needs a positive group_size")
    act = None
    if a:
        got = (a.get("num_bits"), a.get("type", "int"), a.get("strategy"), a.get("dynamic"))
        if got != (8, "int", "token", True):
            raise ValueError(f"{where}: activations {got[0]}-bit {got[1]} {got[2]} (dynamic={got[3]}): "
                             f"4-bit weights run with 16-bit or dynamic per-token int8 activations")
        act = "int8-token"
    actorder = w.get("actorder")
    if actorder not in (None, False, "group", "weight", "static", "dynamic"):
        raise ValueError(f"{where}: actorder {actorder!r} is not supported")
    return Int4Spec("compressed-tensors", _group(w.get("group_size") if strategy == "group" else -1, where),
                    symmetric=_flag(w.get("symmetric"), True, "symmetric", where), act_order=actorder in ("group", "dynamic"),
                    activations=act, ignore=ignore, scale_dtype=scale_dtype,
                    names=CT_NAMES, packed=fmt == "pack-quantized")


# `--quantization NAME --load-format dummy` on a config without quantization_config: random
# 4-bit weights in groups of 128 (llm-compressor's and AutoAWQ's default group size)
DUMMY_SPECS = {"awq": dict(fmt="awq", symmetric=False, names=AWQ_NAMES),
               "gptq": dict(fmt="gptq", symmetric=True, zero_plus_one=True, names=GPTQ_NAMES),
               "compressed-tensors": dict(fmt="compressed-tensors", symmetric=True, names=CT_NAMES)}


def scale_dtype_of(hf_config, default: str = "float16") -> torch.dtype:
    """The dtype 4-bit scales are held in: the checkpoint's torch_dtype."""
    return _DTYPES.get(str(hf_config.get("torch_dtype") or default).replace("torch.", ""), _DTYPES[default])


def int4_spec_for(hf_config, requested: Optional[str] = None) -> Optional[Int4Spec]:
    """The checkpoint's 4-bit format, else (random weights) the default of `--quantization
    awq | gptq | compressed-tensors`, else None."""
    spec = int4_spec(hf_config)
    if spec is not None or requested not in DUMMY_SPECS:
        return spec
    scale_dtype = scale_dtype_of(hf_config, "bfloat16")
    return Int4Spec(group_size=128, act_order=False, scale_dtype=scale_dtype, **DUMMY_SPECS[requested])


def int4_spec(hf_config) -> Optional[Int4Spec]:
    """The checkpoint's 4-bit format, or None when it is not a 4-bit checkpoint."""
    qc = hf_config.get("quantization_config") or {}
    method = qc.get("quant_method")
    scale_dtype = scale_dtype_of(hf_config)
    if method == "awq":
        where = "quantization_config (awq)"
        _bits(qc.get("bits", qc.get("w_bit")), where)
        if not qc.get("zero_point", True):
            raise ValueError(f"{where}: zero_point false is not supported (AutoAWQ GEMM stores zero points)")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{where}: AutoAWQ version {version!r} is not supported (gemm only)")
        return Int4Spec("awq", _group(qc.get("group_size", qc.get("q_group_size")), where),
                        symmetric=False, act_order=False,
                        ignore=checkpoint_ignore(hf_config), scale_dtype=scale_dtype,
                        names=AWQ_NAMES)
    if method == "gptq":
        where = "quantization_config (gptq)"
        _bits(qc.get("bits"), where)
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{where}: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        return Int4Spec("gptq", _group(qc.get("group_size"), where), symmetric=_flag(qc.get("sym"), True, "sym", where),
                        act_order=_flag(qc.get("desc_act"), False, "desc_act", where), zero_plus_one=fmt == "gptq",
                        ignore=checkpoint_ignore(hf_config), scale_dtype=scale_dtype,
                        names=GPTQ_NAMES)
    if method == "compressed-tensors":
        return _ct_spec(qc, scale_dtype, checkpoint_ignore(hf_config))
    return None


# ---------------------------------------------------------------- checkpoint -> memory layout
def weight_to_memory(spec: Int4Spec, t: torch.Tensor, n: int, k: int, name: str) -> torch.Tensor:
    """A checkpoint's packed weight of an [n, k] layer -> int32 [n, k/8] (input features packed)."""
    want = {"awq": (k, n // PACK), "gptq": (k // PACK, n), "compressed-tensors": (n, k // PACK)}[spec.fmt]
    if t.dtype != torch.int32 or tuple(t.shape) != want:
        raise ValueError(f"tensor {name}: packed 4-bit weight {t.dtype} {tuple(t.shape)} does not match "
                         f"the model's [{n}, {k}] layer ({spec.fmt} stores int32 {want})")
    if spec.fmt == "awq":
        return pack_int4(unpack_int4(t, 1, AWQ_ORDER).t(), 1)
    if spec.fmt == "gptq":
        return t.t().contiguous()     # K/8 packed rows of N = N rows of K/8, same nibble order
    return t.contiguous()


def scales_to_memory(spec: Int4Spec, t: torch.Tensor, n: int, groups: int, name: str) -> torch.Tensor:
    """Scales -> [n, groups] in the spec's scale dtype."""
    want = (n, groups) if spec.fmt == "compressed-tensors" else (groups, n)
    if tuple(t.shape) != want or not t.is_floating_point():
        raise ValueError(f"tensor {name}: scales {t.dtype} {tuple(t.shape)} do not match the model's "
                         f"{n} outputs x {groups} groups ({spec.fmt} stores {want})")
    out = (t if spec.fmt == "compressed-tensors" else t.t()).to(spec.scale_dtype).contiguous()
    # a NaN / inf scale (or one past the scale dtype's range) would make its group's outputs
    # NaN and the text empty without a word
    if out.device.type != "meta" and not bool(torch.isfinite(out).all()):
        bad = first_bad_value(t.to(spec.scale_dtype), positive=False, stored=t)     # where the checkpoint holds it
        raise ValueError(f"tensor {name}: scales have non-finite values (in {spec.scale_dtype}: {bad})")
    return out


def zeros_to_memory(spec: Int4Spec, t: torch.Tensor, n: int, groups: int, name: str) -> torch.Tensor:
    """Packed zero points -> uint8 [n, groups] holding z (w = (u - z) * s)."""
    packed_n = -(-n // PACK)
    want = (packed_n, groups) if spec.fmt == "compressed-tensors" else (groups, packed_n)
    if t.dtype != torch.int32 or tuple(t.shape) != want:
        raise ValueError(f"tensor {name}: packed zero points {t.dtype} {tuple(t.shape)} do not match the "
                         f"model's {n} outputs x {groups} groups ({spec.fmt} stores int32 {want})")
    if spec.fmt == "compressed-tensors":
        return unpack_int4(t, 0)[:n].contiguous()
    z = unpack_int4(t, 1, AWQ_ORDER if spec.fmt == "awq" else SEQUENTIAL)[:, :n]
    if spec.zero_plus_one:
        z = z + 1
    return z.t().contiguous()


def dequant_checkpoint(spec: Int4Spec, parts: dict[str, torch.Tensor], module: str,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """One module's checkpoint tensors (role -> tensor) -> its float weight [N, K]."""
    q = parts["qweight"]
    if q.dim() != 2:
        raise ValueError(f"tensor {module}.{spec.names['qweight']}: a packed 4-bit weight is 2-D, got shape "
                         f"{tuple(q.shape)}")
    if spec.fmt == "compressed-tensors":
        n, k = (int(v) for v in parts["shape"].reshape(-1).tolist())
    elif spec.fmt == "awq":
        k, n = q.shape[0], q.shape[1] * PACK
    else:
        k, n = q.shape[0] * PACK, q.shape[1]
    g = k if spec.group_size == -1 else spec.group_size
    if k % g:
        raise ValueError(f"tensor {module}: group size {g} does not divide the {k} input features")
    qweight = weight_to_memory(spec, q, n, k, f"{module}.{spec.names['qweight']}")
    scales = scales_to_memory(spec, parts["scales"], n, k // g, f"{module}.{spec.names['scales']}")
    zeros = (zeros_to_memory(spec, parts["qzeros"], n, k // g, f"{module}.{spec.names['qzeros']}")
             if "qzeros" in parts else None)
    g_idx = parts.get("g_idx") if spec.act_order else None
    if g_idx is not None:
        bad = (f"shape {tuple(g_idx.shape)}" if tuple(g_idx.shape) != (k,) else
               f"values in [{int(g_idx.min())}, {int(g_idx.max())}]" if not 0 <= int(g_idx.min()) <= int(g_idx.max()) < k // g
               else None)
        if bad:
            raise ValueError(f"tensor {module}.{spec.names['g_idx']}: g_idx of {bad} does not map the {k} input "
                             f"features to {k // g} groups")
    return dequant_int4(qweight, scales, zeros, g_idx, g, out_dtype)


def _check_trivial_g_idx(spec: Int4Spec, name: str, g_idx: torch.Tensor) -> None:
    k = g_idx.numel()
    g = k if spec.group_size == -1 else spec.group_size
    if not torch.equal(g_idx.long(), torch.arange(k) // g):
        raise ValueError(f"tensor {name}: g_idx reorders the input features but the quantization_config "
                         f"does not enable activation reordering (desc_act / actorder)")


def _check_shape(spec: Int4Spec, module: str, shape: list, packed: list) -> None:
    n, k = (int(v) for v in shape)
    if packed != [n, -(-k // PACK)]:
        raise ValueError(f"tensor {module}.weight_shape: {shape} does not match {module}.weight_packed "
                         f"{packed} (a [{n}, {k}] weight packs to [{n}, {-(-k // PACK)}])")


def _signed_nibbles(t: torch.Tensor, name: str) -> torch.Tensor:
    """int8 values in -8..7 -> uint8 nibbles (value + 8), refusing anything else by name."""
    if t.dim() != 2 or t.dtype != torch.int8:
        raise ValueError(f"tensor {name}: an int-quantized 4-bit tensor is 2-D int8, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if t.numel() and not -8 <= int(t.min()) <= int(t.max()) <= 7:
        raise ValueError(f"tensor {name}: int-quantized 4-bit values must lie in [-8, 7], got "
                         f"[{int(t.min())}, {int(t.max())}]")
    return (t.to(torch.int16) + 8).to(torch.uint8)


def _pack_padded(u: torch.Tensor, dim: int) -> torch.Tensor:
    """Nibbles -> int32 along `dim`, padded with 8 (a signed 0) to a whole int32, as
    compressed-tensors' pack_to_int32 pads."""
    pad = -u.shape[dim] % PACK
    if pad:
        shape = list(u.shape)
        shape[dim] = pad
        u = torch.cat([u, torch.full(shape, 8, dtype=u.dtype)], dim)
    return pack_int4(u, dim)


def int8_to_packed(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A compressed-tensors int-quantized 4-bit checkpoint's tensors as pack-quantized ones: each
    int8 `<m>.weight` [N, K] -> `<m>.weight_packed` int32 [N, ceil(K/8)] and `<m>.weight_shape`,
    each int8 `<m>.weight_zero_point` [N, G] -> int32 [ceil(N/8), G] (rows packed); every other
    tensor passes as it is."""
    for name, t in weights:
        if name.endswith(".weight") and t.dtype == torch.int8:
            base = name[: -len("weight")]
            yield base + "weight_packed", _pack_padded(_signed_nibbles(t, name), 1)
            yield base + "weight_shape", torch.tensor(list(t.shape), dtype=torch.int64)
        elif name.endswith(".weight_zero_point") and not t.is_floating_point():
            yield name, _pack_padded(_signed_nibbles(t, name), 0)
        else:
            yield name, t


def int4_stream(weights: Iterable[tuple[str, torch.Tensor]], spec: Int4Spec, keep: Callable[[str], bool],
                out_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A 4-bit checkpoint's tensors for the model: the parts of modules for which `keep(module)`
    holds pass as stored (a 4-bit layer loads them); every other 4-bit module is dequantized
    to `<module>.weight` in `out_dtype` once all its parts have come; a g_idx without
    activation reordering (GPTQ writes it always) is checked to be the identity and dropped, as
    is compressed-tensors' `weight_shape` once checked against the packed weight (the layer
    checks the packed weight's shape against the model)."""
    if not spec.packed:
        weights = int8_to_packed(weights)
    need = spec.required()
    pending: dict[str, dict[str, torch.Tensor]] = {}
    shapes: dict[str, list] = {}      # kept module -> [weight_shape, packed shape], as they come
    for name, t in weights:
        found = spec.role(name)
        if found is None:
            yield name, t
            continue
        module, role = found
        if role == "shape" and t.numel() != 2:
            raise ValueError(f"tensor {name}: weight_shape holds [rows, columns], got shape {tuple(t.shape)}")
        if role == "g_idx" and (t.is_floating_point() or t.dtype == torch.bool):
            raise ValueError(f"tensor {name}: g_idx must hold integer group indices, got {t.dtype}")
        if role == "g_idx" and not spec.act_order:
            _check_trivial_g_idx(spec, name, t)
            continue
        if keep(module):
            if role in ("shape", "qweight") and spec.fmt == "compressed-tensors":
                seen = shapes.setdefault(module, [None, None])
                seen[role == "qweight"] = t.reshape(-1).tolist() if role == "shape" else list(t.shape)
                if None not in seen:
                    _check_shape(spec, module, *shapes.pop(module))
            if role != "shape":
                yield name, t
            continue
        parts = pending.setdefault(module, {})
        parts[role] = t
        if need <= parts.keys():
            yield module + ".weight", dequant_checkpoint(spec, pending.pop(module), module, out_dtype)
    for module, (shape, packed) in sorted(shapes.items()):
        raise ValueError(f"4-bit module {module} lacks {'weight_shape' if shape is None else 'weight_packed'} "
                         f"in the checkpoint")
    for module, parts in sorted(pending.items()):
        missing = sorted(spec.names[r] for r in need - parts.keys())
        raise ValueError(f"4-bit module {module} lacks {', '.join(missing)} in the checkpoint")
