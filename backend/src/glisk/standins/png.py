"""A deterministic PNG drawn from a seed: the images the stand-ins and the demo hand out."""

from __future__ import annotations

import hashlib
import struct
import zlib


def render_png(seed: bytes, size: int) -> bytes:
    """A deterministic ``size`` x ``size`` RGB PNG drawn from ``seed``."""
    digest = hashlib.sha256(seed).digest()
    rows = bytearray()
    for y in range(size):
        rows.append(0)  # filter: none
        for x in range(size):
            on = (digest[(x * 7 + y * 3) % 32] >> ((x + y) % 8)) & 1
            rows += digest[0:3] if on else digest[3:6]

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows)))
        + chunk(b"IEND", b"")
    )
