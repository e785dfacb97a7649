#!/usr/bin/env python3
"""Writes the seed corpus of the store_chunk and sink_buffer targets from valid inputs
built by the formats' rules (src/store/chunk.rs, src/sink/buffer/disk.rs). The proto
targets' seeds are copies of proto/testdata. Run from fuzz/: python3 seeds.py"""
import struct
import zlib

KIND = {"f64": 0, "i64": 1, "bool": 2, "str": 3}


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def chunk(start, points):
    out = bytearray(struct.pack("<q", start))
    prev = start
    for ts, kind, v in points:
        out += varint((ts - prev) & 0xFFFFFFFFFFFFFFFF)
        prev = ts
        out.append(KIND[kind])
        if kind == "f64":
            out += struct.pack("<d", v)
        elif kind == "i64":
            out += varint(((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF)
        elif kind == "bool":
            out.append(1 if v else 0)
        else:
            b = v.encode()
            out += varint(len(b)) + b
    return bytes(out)


def record(payload):
    n = struct.pack("<I", len(payload))
    return n + struct.pack("<I", zlib.crc32(n + payload)) + payload


def cursor(seg, off):
    head = struct.pack("<QQ", seg, off)
    return head + struct.pack("<I", zlib.crc32(head))


seeds = {
    "store_chunk/one_of_each": chunk(
        1_700_000_000_000,
        [(1_700_000_000_000, "f64", 21.5), (1_700_000_000_250, "i64", -7),
         (1_700_000_001_000, "bool", True), (1_700_000_002_000, "str", "idle")],
    ),
    "store_chunk/ints": chunk(0, [(i * 1000, "i64", i * i) for i in range(20)]),
    "store_chunk/empty": chunk(5, []),
}
lines = [b"telemetry,device=d-1 temp=21.5 1700000000000",
         b"telemetry,device=d-1 mode=\"idle\",n=3i 1700000001000",
         b"telemetry,device=d-2 ok=true 1700000002000"]
segment = b"".join(record(l) for l in lines)
seeds["sink_buffer/no_cursor"] = b"\x00" + segment
seeds["sink_buffer/cursor_after_first"] = b"\x01" + cursor(0, len(record(lines[0]))) + segment
seeds["sink_buffer/torn_tail"] = b"\x00" + segment[:-5]
for name, data in seeds.items():
    with open(f"corpus/{name}", "wb") as f:
        f.write(data)
