"""A pure-Python Snappy block decompressor (for Parquet pages when pyarrow is absent).

Format: https://github.com/google/snappy/blob/main/format_description.txt — a varint
uncompressed length, then elements whose tag's low two bits say literal (0) or a copy with a
1-, 2- or 4-byte offset (1, 2, 3). Copies may overlap their own output (offset < length),
which is how runs are encoded, so those are expanded by repeating the period.
"""
from __future__ import annotations


def snappy_decompress(data: bytes) -> bytes:
    """Decompress one raw Snappy block; ValueError on corrupt input."""
    pos = shift = length = 0
    while True:
        if pos >= len(data):
            raise ValueError("snappy: truncated length header")
        b = data[pos]
        pos += 1
        length |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    out = bytearray()
    olen = 0  # len(out), kept by hand: this loop runs once per element and len() shows up
    n = len(data)
    from_bytes = int.from_bytes
    while pos < n:
        tag = data[pos]
        kind = tag & 3
        if kind == 0:
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = from_bytes(data[pos + 1:pos + 1 + extra], "little")
                pos += extra
            size += 1
            out += data[pos + 1:pos + 1 + size]
            pos += 1 + size
            olen += size
            continue
        if kind == 1:
            size = ((tag >> 2) & 7) + 4
            offset = ((tag >> 5) << 8) | data[pos + 1]
            pos += 2
        elif kind == 2:
            size = (tag >> 2) + 1
            offset = data[pos + 1] | (data[pos + 2] << 8)
            pos += 3
        else:
            size = (tag >> 2) + 1
            offset = from_bytes(data[pos + 1:pos + 5], "little")
            pos += 5
        if offset == 0 or offset > olen:
            raise ValueError(f"snappy: copy offset {offset} outside the {olen} bytes so far")
        start = olen - offset
        if offset >= size:
            out += out[start:start + size]
        else:  # overlapping copy: the last `offset` bytes repeat
            out += (out[start:] * (size // offset + 1))[:size]
        olen += size
    if len(out) != length:
        raise ValueError(f"snappy: got {len(out)} bytes, header says {length}")
    return bytes(out)
