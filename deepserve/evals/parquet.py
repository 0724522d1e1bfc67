"""Read small Parquet files (MMLU-Pro's release) without pyarrow.

pyarrow is used when installed. Otherwise this pure-Python reader covers what dataset
exports from Hugging Face `datasets`/pyarrow contain: the Thrift compact footer, data pages
v1 and v2, PLAIN and dictionary (RLE_DICTIONARY / PLAIN_DICTIONARY) encodings, the RLE /
bit-packed hybrid for levels, UNCOMPRESSED, SNAPPY (own decoder) and GZIP pages, flat columns
and one level of LIST nesting. Anything else raises ValueError naming what it met.
Format: https://github.com/apache/parquet-format (parquet.thrift, Encodings.md).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from deepserve.evals.snappy import snappy_decompress

# Thrift compact protocol type ids.
_BOOL_TRUE, _BOOL_FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)


class _Thrift:
    """Decode Thrift compact structs into {field_id: value} dicts."""

    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, ttype: int):
        if ttype in (_BOOL_TRUE, _BOOL_FALSE):  # only reached inside lists: one byte each
            b = self.buf[self.pos]
            self.pos += 1
            return b == 1
        if ttype == _BYTE:
            self.pos += 1
            return self.buf[self.pos - 1]
        if ttype in (_I16, _I32, _I64):
            return self.zigzag()
        if ttype == _DOUBLE:
            self.pos += 8
            return struct.unpack_from("<d", self.buf, self.pos - 8)[0]
        if ttype == _BINARY:
            n = self.varint()
            self.pos += n
            return bytes(self.buf[self.pos - n:self.pos])
        if ttype in (_LIST, _SET):
            head = self.buf[self.pos]
            self.pos += 1
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self.value(etype) for _ in range(size)]
        if ttype == _MAP:
            size = self.varint()
            if size == 0:
                return {}
            kv = self.buf[self.pos]
            self.pos += 1
            return {self.value(kv >> 4): self.value(kv & 0x0F) for _ in range(size)}
        if ttype == _STRUCT:
            return self.struct()
        raise ValueError(f"parquet footer: unknown thrift type {ttype}")

    def struct(self) -> dict:
        fields, last = {}, 0
        while True:
            head = self.buf[self.pos]
            self.pos += 1
            if head == 0:
                return fields
            delta, ttype = head >> 4, head & 0x0F
            fid = last + delta if delta else self.zigzag()
            last = fid
            if ttype == _BOOL_TRUE:
                fields[fid] = True
            elif ttype == _BOOL_FALSE:
                fields[fid] = False
            else:
                fields[fid] = self.value(ttype)


def _rle_hybrid(buf: bytes, pos: int, end: int, bit_width: int, count: int) -> list[int]:
    """Decode `count` values of the RLE / bit-packed hybrid encoding from buf[pos:end]."""
    out: list[int] = []
    byte_width = (bit_width + 7) // 8
    reader = _Thrift(buf, pos)
    while len(out) < count and reader.pos < end:
        header = reader.varint()
        if header & 1:  # bit-packed groups of 8 values, least significant bit first
            n_bytes = (header >> 1) * bit_width
            chunk = int.from_bytes(buf[reader.pos:reader.pos + n_bytes], "little")
            reader.pos += n_bytes
            mask = (1 << bit_width) - 1
            out.extend((chunk >> (i * bit_width)) & mask for i in range((header >> 1) * 8))
        else:
            value = int.from_bytes(buf[reader.pos:reader.pos + byte_width], "little")
            reader.pos += byte_width
            out.extend([value] * (header >> 1))
    return out[:count]


def _plain(buf: bytes, pos: int, ptype: int, count: int) -> list:
    if ptype == 6:  # BYTE_ARRAY: 4-byte length + bytes
        out = []
        for _ in range(count):
            n = struct.unpack_from("<I", buf, pos)[0]
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        return out
    fmt = {1: "i", 2: "q", 4: "f", 5: "d"}.get(ptype)
    if fmt is None:
        raise ValueError(f"parquet: PLAIN values of physical type {ptype} are not supported")
    return list(struct.unpack_from(f"<{count}{fmt}", buf, pos))


def _decompress(data: bytes, codec: int, size: int) -> bytes:
    if codec == 0:
        return data
    if codec == 1:
        return snappy_decompress(data)
    if codec == 2:
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    raise ValueError(f"parquet: compression codec {codec} is not supported without pyarrow "
                     "(install pyarrow, or re-export the file with snappy/gzip)")


def _bit_width(max_level: int) -> int:
    return max_level.bit_length()


def _read_column(buf: bytes, meta: dict, max_def: int, max_rep: int):
    """All (rep_levels, def_levels, values) of one column chunk."""
    ptype, codec, n_total = meta[1], meta[4], meta[5]
    pos = meta.get(11) or meta[9]
    dictionary, reps, defs, values = None, [], [], []
    seen = 0
    while seen < n_total:
        reader = _Thrift(buf, pos)
        header = reader.struct()
        start, comp_size, raw_size = reader.pos, header[3], header[2]
        pos = start + comp_size
        page_type = header[1]
        if page_type == 2:  # dictionary page
            data = _decompress(buf[start:pos], codec, raw_size)
            dictionary = _plain(data, 0, ptype, header[7][1])
            continue
        if page_type == 0:
            h = header[5]
            n, encoding = h[1], h[2]
            data = _decompress(buf[start:pos], codec, raw_size)
            p = 0
            page_reps, page_defs = [0] * n, [max_def] * n
            for level, max_level in ((0, max_rep), (1, max_def)):
                if max_level:
                    length = struct.unpack_from("<I", data, p)[0]
                    decoded = _rle_hybrid(data, p + 4, p + 4 + length, _bit_width(max_level), n)
                    if level == 0:
                        page_reps = decoded
                    else:
                        page_defs = decoded
                    p += 4 + length
        elif page_type == 3:
            h = header[8]
            n, encoding = h[1], h[4]
            rep_len, def_len = h[6], h[5]
            p0 = start
            page_reps = (_rle_hybrid(buf, p0, p0 + rep_len, _bit_width(max_rep), n)
                         if max_rep else [0] * n)
            page_defs = (_rle_hybrid(buf, p0 + rep_len, p0 + rep_len + def_len,
                                     _bit_width(max_def), n) if max_def else [max_def] * n)
            body = buf[p0 + rep_len + def_len:pos]
            data = (_decompress(body, codec, raw_size - rep_len - def_len)
                    if h.get(7, True) else body)
            p = 0
        else:
            raise ValueError(f"parquet: page type {page_type} is not supported")
        n_present = sum(1 for d in page_defs if d == max_def)
        if encoding == 0:
            page_values = _plain(data, p, ptype, n_present)
        elif encoding in (2, 8):
            if dictionary is None:
                raise ValueError("parquet: dictionary-encoded page without a dictionary page")
            width = data[p]
            idx = _rle_hybrid(data, p + 1, len(data), width, n_present)
            page_values = [dictionary[i] for i in idx]
        else:
            raise ValueError(f"parquet: value encoding {encoding} is not supported without pyarrow")
        reps += page_reps
        defs += page_defs
        values += page_values
        seen += n
    return reps, defs, values


def _assemble(reps, defs, values, max_def: int, max_rep: int, convert) -> list:
    """Rows of a flat column (max_rep 0) or a one-level list column (max_rep 1)."""
    it = iter(values)
    if max_rep == 0:
        return [convert(next(it)) if d == max_def else None for d in defs]
    if max_rep > 1:
        raise ValueError("parquet: nested lists deeper than one level are not supported")
    rows: list = []
    for r, d in zip(reps, defs):
        if r == 0:
            rows.append(None if d == 0 else [])
        if d == max_def:
            rows[-1].append(convert(next(it)))
        elif d == max_def - 1 and d >= 2:
            rows[-1].append(None)
    return rows


def _schema_columns(schema: list[dict]) -> list[tuple[str, int, int, bool]]:
    """(top-level name, max definition level, max repetition level, is_string) per leaf."""
    leaves = []

    def walk(i: int, top: str | None, max_def: int, max_rep: int) -> int:
        el = schema[i]
        rep = el.get(3, 0)
        max_def += rep != 0
        max_rep += rep == 2
        name = el[4].decode()
        top = top or name
        children = el.get(5, 0)
        i += 1
        if not children:
            is_string = el.get(6) == 0 or el.get(1) == 6
            leaves.append((top, max_def, max_rep, is_string))
            return i
        for _ in range(children):
            i = walk(i, top, max_def, max_rep)
        return i

    i = 1
    while i < len(schema):
        i = walk(i, None, 0, 0)
    return leaves


def _read_pure(path: Path, columns: tuple[str, ...] | None = None) -> list[dict]:
    buf = path.read_bytes()
    if buf[:4] != b"PAR1" or buf[-4:] != b"PAR1":
        raise ValueError(f"{path}: not a parquet file (missing PAR1 magic)")
    footer_len = struct.unpack("<I", buf[-8:-4])[0]
    meta = _Thrift(buf, len(buf) - 8 - footer_len).struct()
    leaves = _schema_columns(meta[2])
    rows: list[dict] = []
    for group in meta.get(4, []):
        data: dict[str, list] = {}
        for (name, max_def, max_rep, is_string), chunk in zip(leaves, group[1]):
            if columns is not None and name not in columns:
                continue
            convert = (lambda b: b.decode("utf-8")) if is_string else (lambda v: v)
            reps, defs, values = _read_column(buf, chunk[3], max_def, max_rep)
            data[name] = _assemble(reps, defs, values, max_def, max_rep, convert)
        n = group[3]
        rows.extend({k: v[i] for k, v in data.items()} for i in range(n))
    return rows


def read_parquet(path: str | Path, columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of a parquet file as dicts (lists for LIST columns), via pyarrow when installed.

    `columns` limits the read to those top-level columns (all when None).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parquet file {path} does not exist")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return _read_pure(path, columns)
    return pq.read_table(path, columns=list(columns) if columns else None).to_pylist()
