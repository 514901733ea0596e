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
from datetime import UTC, datetime, timedelta

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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


def micros(dt: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact integer arithmetic)."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    return (dt - _EPOCH) // _ONE_US


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
    validates, numbers, hashes and writes. `add` runs once per event on the
    command path: one list per column, held in slots, and the canonical body
    joined in place.
    """

    __slots__ = (
        "_body",
        "_command_id",
        "_correlation_id",
        "_event_id",
        "_metadata",
        "_occurred_at",
        "_payload",
        "_schema_version",
        "_stream_hash",
        "_stream_id",
        "_stream_version",
        "_type",
    )

    def __init__(self) -> None:
        self._stream_id: list[str] = []
        self._stream_hash: list[int] = []
        self._stream_version: list[int] = []
        self._event_id: list[str] = []
        self._type: list[str] = []
        self._schema_version: list[int] = []
        self._occurred_at: list[int] = []
        self._command_id: list[str] = []
        self._correlation_id: list[str] = []
        self._payload: list[str] = []
        self._metadata: list[str] = []
        self._body: list[bytes] = []

    def __len__(self) -> int:
        return len(self._stream_id)

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
        stream_hash_value: int | None = None,
    ) -> None:
        """One event; `stream_hash_value` saves hashing the stream id again if known."""
        occurred_at_us = micros(occurred_at)
        self._stream_id.append(stream_id)
        self._stream_hash.append(
            stream_hash(stream_id) if stream_hash_value is None else stream_hash_value
        )
        self._stream_version.append(stream_version)
        self._event_id.append(event_id)
        self._type.append(type_name)
        self._schema_version.append(schema_version)
        self._occurred_at.append(occurred_at_us)
        self._command_id.append(command_id)
        self._correlation_id.append(correlation_id)
        self._payload.append(payload)
        self._metadata.append(metadata)
        # canonical_body, inlined: the same fields, in the same order
        self._body.append(
            _SEP.join(
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
        )

    def build(self) -> pa.RecordBatch:
        columns = (
            self._stream_id,
            self._stream_hash,
            self._stream_version,
            self._event_id,
            self._type,
            self._schema_version,
            self._occurred_at,
            self._command_id,
            self._correlation_id,
            self._payload,
            self._metadata,
            self._body,
        )
        return pa.RecordBatch.from_arrays(
            [pa.array(values, f.type) for values, f in zip(columns, PENDING_SCHEMA, strict=True)],
            schema=PENDING_SCHEMA,
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
