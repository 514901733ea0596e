"""The log's columnar record layout, the stream hash and the canonical bytes that are hashed.

Every recorded event is one row of `RECORD_SCHEMA`. Writers (entity hosts) build
`PENDING_SCHEMA` batches: the same fields less those only the log can assign
(position, partition, hash, prev_hash). The canonical body the hash chain covers
is the stored fields joined in a fixed order: the log's writer joins a whole
round's bodies in one Arrow kernel (`pending_bodies`), and the verifier recomputes
them row by row in Python (`body_column`), so the two are independent and the body
is never stored or sent.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

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
PENDING_SCHEMA = pa.schema([f for f in RECORD_SCHEMA if f.name not in _LOG_ASSIGNED])
# The fields of the canonical body, in order; integers are written in decimal.
_BODY_FIELDS = (
    "stream_id",
    "stream_version",
    "event_id",
    "type",
    "schema_version",
    "occurred_at",
    "command_id",
    "correlation_id",
    "payload",
    "metadata",
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


# Up to this many rows, `canonical_body` per row costs less than the kernels' fixed
# cost (measured: kernels ~65 µs at 1-16 rows; Python ~26 µs for one row, ~33 for 8,
# ~55 for 32). Kept low: most rounds of a busy log are far larger.
_FEW_ROWS = 8


def _few_bodies(pending: pa.Table | pa.RecordBatch) -> pa.Array:
    columns = [
        (
            pending.column(name).cast(pa.int64()) if name == "occurred_at" else pending.column(name)
        ).to_pylist()
        for name in _BODY_FIELDS
    ]
    bodies = []
    for fields in zip(*columns, strict=True):
        if None in fields:
            raise ValueError("a pending event has a null field")
        bodies.append(canonical_body(*fields))
    return pa.array(bodies, pa.binary())


def pending_bodies(pending: pa.Table | pa.RecordBatch) -> pa.Array:
    """The canonical body of every row of a pending (or recorded) table, as binary.

    `canonical_body` for a whole table in one Arrow kernel (~0.2 µs an event, the
    GIL released), which is what the log's single writer runs per commit round.
    """
    if pending.num_rows <= _FEW_ROWS:
        return _few_bodies(pending)
    text = pa.string()
    columns = []
    for name in _BODY_FIELDS:
        column = pending.column(name)
        if name == "occurred_at":
            column = column.cast(pa.int64())
        if not pa.types.is_string(column.type):
            column = column.cast(text)
        columns.append(column)
    joined = pc.binary_join_element_wise(*columns, _SEP)
    if joined.null_count:  # a null field would hash as nothing: refuse rather than guess
        raise ValueError("a pending event has a null field")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    return joined.cast(pa.binary())


# Pending batches cross Ray compressed: telemetry compresses about five times, which
# keeps a 1,000-event batch under Ray's inline limit (100 KiB), so it travels inside
# the call instead of through the object store (~0.75 ms a put and ~0.2 ms a get
# per batch, against ~0.15 ms to compress and decompress it).
_WIRE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def encode_pending(batch: pa.RecordBatch) -> bytes:
    """A pending batch as one LZ4-compressed Arrow IPC stream: what a host sends the log."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, PENDING_SCHEMA, options=_WIRE_OPTIONS) as writer:
        writer.write_batch(batch)
    encoded: bytes = sink.getvalue().to_pybytes()
    return encoded


def decode_pending(data: bytes) -> pa.RecordBatch:
    """The batch `encode_pending` encoded."""
    return pa.ipc.open_stream(data).read_next_batch()


class PendingBatchBuilder:
    """Accumulates events column by column; `build()` gives one `PENDING_SCHEMA` batch.

    Hosts build these in their own process. `add` runs once per event on the
    command path: one list per column, held in slots.
    """

    __slots__ = (
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
        self._stream_id.append(stream_id)
        self._stream_hash.append(
            stream_hash(stream_id) if stream_hash_value is None else stream_hash_value
        )
        self._stream_version.append(stream_version)
        self._event_id.append(event_id)
        self._type.append(type_name)
        self._schema_version.append(schema_version)
        self._occurred_at.append(micros(occurred_at))
        self._command_id.append(command_id)
        self._correlation_id.append(correlation_id)
        self._payload.append(payload)
        self._metadata.append(metadata)

    def add_many(
        self,
        stream_ids: Sequence[str],
        stream_hashes: Sequence[int],
        stream_versions: Sequence[int],
        command_ids: Sequence[str],
        occurred_at: Sequence[datetime],
        payloads: Sequence[str],
        *,
        type_name: str,
        schema_version: int,
        correlation_id: str = "",
        metadata: str = "{}",
    ) -> None:
        """Many commands of one event each, of one type (event ids `<command_id>/0`)."""
        n = len(stream_ids)
        self._stream_id.extend(stream_ids)
        self._stream_hash.extend(stream_hashes)
        self._stream_version.extend(stream_versions)
        self._event_id.extend([c + "/0" for c in command_ids])
        self._type.extend([type_name] * n)
        self._schema_version.extend([schema_version] * n)
        self._occurred_at.extend(map(micros, occurred_at))
        self._command_id.extend(command_ids)
        self._correlation_id.extend([correlation_id] * n)
        self._payload.extend(payloads)
        self._metadata.extend([metadata] * n)

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
