"""Write-ahead segment framing: what makes an append durable and a torn tail detectable.

A WAL file is a sequence of frames, one per group commit and partition:

    magic "V2GF" | payload length (u32 LE) | CRC-32 of payload (u32 LE) | payload

The payload is one Arrow IPC stream holding one `RECORD_SCHEMA` record batch. A
crash can leave only a prefix of the last frame on disk; `scan` stops at the first
frame that is short, has a wrong magic or a wrong CRC and tells where the good
prefix ends, so the writer truncates there on open. Readers that are not the
writer use the same scan and simply ignore the tail.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import pyarrow as pa

from events.schema import RECORD_SCHEMA

MAGIC = b"V2GF"
_HEADER = struct.Struct("<4sII")


def encode_frame(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, RECORD_SCHEMA) as writer:
        writer.write_batch(batch)
    payload: bytes = sink.getvalue().to_pybytes()
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class ScanResult:
    batches: list[pa.RecordBatch]
    good_bytes: int  # length of the intact prefix
    file_bytes: int

    @property
    def torn(self) -> bool:
        return self.good_bytes < self.file_bytes


def decode_frames(data: bytes) -> tuple[list[pa.RecordBatch], int]:
    """The record batches of the whole frames at the start of `data`, and where they end."""
    batches: list[pa.RecordBatch] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        batches.extend(pa.ipc.open_stream(payload))
        offset = end
    return batches, offset


def scan(path: str) -> ScanResult:
    with open(path, "rb") as f:
        data = f.read()
    batches, good_bytes = decode_frames(data)
    return ScanResult(batches, good_bytes, len(data))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
