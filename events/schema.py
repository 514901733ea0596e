"""The log's columnar record layout, the stream hash and the canonical bytes that are hashed.

Every recorded event is one row of `RECORD_SCHEMA`. Writers (entity hosts) build
`PENDING_SCHEMA` batches: the same fields less those only the log can assign
(position, partition, hash, prev_hash), plus `body`, the canonical bytes the hash
chain covers. The body is recomputed from the stored columns by the verifier, so it
is never stored twice.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime

import pyarrow as pa

HASH_BYTES = 32
GENESIS_HASH = b"\x00" * HASH_BYTES
_SEP = "\x1f"  # unit separator: ids refuse control characters and JSON escapes them

RECORD_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("partition", pa.int32()),
        ("stream_id", pa.string()),
        ("stream_hash", pa.uint32()),
        ("stream_version", pa.int64()),
        ("event_id", pa.string()),
        ("type", pa.string()),
        ("schema_version", pa.int32()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        ("command_id", pa.string()),
        ("correlation_id", pa.string()),
        ("payload", pa.string()),
        ("metadata", pa.string()),
        ("prev_hash", pa.binary(HASH_BYTES)),
        ("hash", pa.binary(HASH_BYTES)),
    ]
)

_LOG_ASSIGNED = {"position", "partition", "prev_hash", "hash"}
PENDING_SCHEMA = pa.schema(
    [f for f in RECORD_SCHEMA if f.name not in _LOG_ASSIGNED] + [pa.field("body", pa.binary())]
)


def stream_hash(stream_id: str) -> int:
    """Stable across processes and runs, unlike `hash()`: places streams in partitions, shards."""
    return zlib.crc32(stream_id.encode())


def micros(dt: datetime) -> int:
    delta = dt.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def canonical_body(
    stream_id: str,
    stream_version: int,
    event_id: str,
    type_name: str,
    schema_version: int,
    occurred_at_us: int,
    command_id: str,
    correlation_id: str,
    payload: str,
    metadata: str,
) -> bytes:
    return _SEP.join(
        (
            stream_id,
            str(stream_version),
            event_id,
            type_name,
            str(schema_version),
            str(occurred_at_us),
            command_id,
            correlation_id,
            payload,
            metadata,
        )
    ).encode()


def chained_hash(prev_hash: bytes, position: int, body: bytes) -> bytes:
    return hashlib.sha256(prev_hash + position.to_bytes(8, "little", signed=True) + body).digest()


class PendingBatchBuilder:
    """Accumulates events column by column; `build()` gives one `PENDING_SCHEMA` batch.

    Hosts build these in their own process, so the log's single writer only
    validates, numbers, hashes and writes.
    """

    __slots__ = ("_cols",)

    def __init__(self) -> None:
        self._cols: dict[str, list[object]] = {f.name: [] for f in PENDING_SCHEMA}

    def __len__(self) -> int:
        return len(self._cols["stream_id"])

    def add(
        self,
        stream_id: str,
        stream_version: int,
        event_id: str,
        type_name: str,
        schema_version: int,
        occurred_at: datetime,
        command_id: str,
        correlation_id: str,
        payload: str,
        metadata: str = "{}",
    ) -> None:
        occurred_at_us = micros(occurred_at)
        c = self._cols
        c["stream_id"].append(stream_id)
        c["stream_hash"].append(stream_hash(stream_id))
        c["stream_version"].append(stream_version)
        c["event_id"].append(event_id)
        c["type"].append(type_name)
        c["schema_version"].append(schema_version)
        c["occurred_at"].append(occurred_at_us)
        c["command_id"].append(command_id)
        c["correlation_id"].append(correlation_id)
        c["payload"].append(payload)
        c["metadata"].append(metadata)
        c["body"].append(
            canonical_body(
                stream_id,
                stream_version,
                event_id,
                type_name,
                schema_version,
                occurred_at_us,
                command_id,
                correlation_id,
                payload,
                metadata,
            )
        )

    def build(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays(
            [pa.array(self._cols[f.name], f.type) for f in PENDING_SCHEMA], schema=PENDING_SCHEMA
        )


def body_column(table: pa.Table) -> Sequence[bytes]:
    """Recompute the canonical body of each stored row (what the verifier hashes)."""
    cols = [
        table.column(name).to_pylist()
        for name in (
            "stream_id",
            "stream_version",
            "event_id",
            "type",
            "schema_version",
            "command_id",
            "correlation_id",
            "payload",
            "metadata",
        )
    ]
    occurred = table.column("occurred_at").cast(pa.int64()).to_pylist()
    sid, ver, eid, typ, sv, cid, corr, payload, meta = cols
    return [
        canonical_body(
            sid[i], ver[i], eid[i], typ[i], sv[i], occurred[i], cid[i], corr[i], payload[i], meta[i]
        )
        for i in range(table.num_rows)
    ]
