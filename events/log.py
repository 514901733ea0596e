"""The event log: durable, idempotent, partitioned, tamper-evident.

Layout under the log's root folder::

    log.json                       partition count (fixed at creation)
    partition-NN/manifest.json     the sealed segments, written atomically
    partition-NN/seg-<first>-<last>.parquet   sealed, immutable, read by DuckDB directly
    partition-NN/wal-<first>.log   write-ahead frames (see `events.wal`), not yet sealed

One `EventLog` object is the single writer of all its partitions. Appends from any
number of threads are queued and group-committed by one writer thread: each round
checks idempotency and expected versions for every request, numbers the accepted
events with global positions, extends each partition's hash chain, writes one frame
per touched partition and fsyncs them in parallel. Only then are the callers
answered, so an acknowledged event is on disk. A commit round writes a command's
events in a single frame, so a crash keeps all of them or none.

Positions are global and increasing in commit order. A crash between the fsyncs of
two partitions can leave a gap (events that were never acknowledged); readers see
positions only up to the last completed round (the watermark), so a subscriber
never skips an event that appears later.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from events.base import Event, RecordedEvent
from events.schema import (
    GENESIS_HASH,
    HASH_BYTES,
    PENDING_SCHEMA,
    RECORD_SCHEMA,
    PendingBatchBuilder,
    pending_bodies,
    stream_hash,
)
from events.threads import lower_this_threads_priority
from events.typed import write_typed
from events.wal import encode_frame, fsync_dir, scan

_FORMAT = 1
_COUNT_BITS = 20  # command index packs (first position, event count) in one int
_POSITION = struct.Struct("<q")  # a position in the hash chain's input (as chained_hash)
# Sealed segments dictionary-encode only the columns with few distinct values: on ids,
# payloads and hashes the dictionary was work thrown away (a 297,000-event segment:
# 0.77 -> 0.45 us of CPU an event to write, 23 -> 21 MiB).
_DICTIONARY_COLUMNS = ["partition", "type", "schema_version", "correlation_id", "metadata"]


class LogError(Exception):
    """Base of the log's own errors."""


class ConcurrencyError(LogError):
    """Another writer appended to the stream first: the caller's view is stale."""

    def __init__(self, stream_id: str, expected_version: int, actual_version: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual_version}, "
            f"but the append expected version {expected_version}: another writer got there first"
        )
        self.stream_id = stream_id
        self.expected_version = expected_version
        self.actual_version = actual_version

    def __reduce__(self) -> tuple[type, tuple[str, int, int]]:  # crosses process boundaries
        return (ConcurrencyError, (self.stream_id, self.expected_version, self.actual_version))


class LogCorrupted(LogError):
    """The log cannot be opened as it is: a sealed part is damaged or missing."""


class LogClosed(LogError):
    pass


@dataclass(frozen=True, slots=True)
class Appended:
    """What the log acknowledged for one command: durable events at these positions."""

    command_id: str
    stream_id: str
    first_position: int
    count: int
    duplicate: bool = False

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(range(self.first_position, self.first_position + self.count))

    def __reduce__(self) -> tuple[type, tuple[str, str, int, int, bool]]:
        # Positional rebuild: the default pickling of a frozen slotted dataclass is
        # ~3x slower, and the log answers a thousand of these per batch.
        return (
            Appended,
            (self.command_id, self.stream_id, self.first_position, self.count, self.duplicate),
        )


AppendOutcome = Appended | ConcurrencyError


class BatchOutcome(Sequence[AppendOutcome]):
    """The outcome of each command of one batch, in order, kept as plain columns.

    A batch of a thousand commands is answered with five lists rather than a
    thousand objects: cheap to build in the writer thread and to pickle across
    Ray; the `Appended` / `ConcurrencyError` objects are made when read.
    """

    __slots__ = ("_commands", "_conflicts", "_counts", "_duplicate", "_firsts", "_streams")

    def __init__(
        self,
        commands: list[str] | None = None,
        streams: list[str] | None = None,
        firsts: list[int] | None = None,
        counts: list[int] | None = None,
        duplicate: list[bool] | None = None,
        conflicts: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        self._commands = commands if commands is not None else []
        self._streams = streams if streams is not None else []
        self._firsts = firsts if firsts is not None else []
        self._counts = counts if counts is not None else []
        self._duplicate = duplicate if duplicate is not None else []
        self._conflicts = conflicts if conflicts is not None else {}  # index -> versions

    def add(self, command_id: str, stream_id: str, first: int, count: int, dup: bool) -> None:
        self._commands.append(command_id)
        self._streams.append(stream_id)
        self._firsts.append(first)
        self._counts.append(count)
        self._duplicate.append(dup)

    def add_conflict(self, command_id: str, stream_id: str, expected: int, actual: int) -> None:
        self._conflicts[len(self._commands)] = (expected, actual)
        self.add(command_id, stream_id, 0, 0, False)

    def __len__(self) -> int:
        return len(self._commands)

    def columns(self) -> Iterator[tuple[int, int, bool, tuple[int, int] | None]]:
        """(first position, count, duplicate, conflict versions or None) per command,
        without building an object per command (hosts settle a thousand at a time)."""
        conflicts = self._conflicts
        for i, (first, count, dup) in enumerate(
            zip(self._firsts, self._counts, self._duplicate, strict=True)
        ):
            yield first, count, dup, conflicts.get(i) if conflicts else None

    def __getitem__(self, i: int) -> AppendOutcome:  # type: ignore[override]
        if i < 0:  # conflicts are keyed by the non-negative index
            i += len(self._commands)
        conflict = self._conflicts.get(i)
        if conflict is not None:
            return ConcurrencyError(self._streams[i], *conflict)
        return Appended(
            self._commands[i],
            self._streams[i],
            self._firsts[i],
            self._counts[i],
            self._duplicate[i],
        )

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (
            BatchOutcome,
            (
                self._commands,
                self._streams,
                self._firsts,
                self._counts,
                self._duplicate,
                self._conflicts,
            ),
        )


@dataclass(slots=True)
class _Segment:
    file: str
    first_position: int
    last_position: int
    count: int
    last_hash: bytes


@dataclass(slots=True)
class _Wal:
    """One write-ahead file and the batches it holds (kept in memory until sealed)."""

    path: str
    first_position: int
    batches: list[pa.RecordBatch] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # last position of each batch, ascending
    rows: int = 0
    last_position: int = 0


class _Partition:
    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.segments: list[_Segment] = []
        self.wals: list[_Wal] = []
        self.last_hash = GENESIS_HASH
        self.file: int | None = None  # fd of the newest WAL, opened for appending

    @property
    def sealed_through(self) -> int:
        return self.segments[-1].last_position if self.segments else 0

    @property
    def active(self) -> _Wal:
        return self.wals[-1]


class EventLog:
    """Append and read events.

    Args:
        root: folder of the log (created if missing).
        partitions: how many hash chains and write-ahead files; fixed when created.
        seal_events: a write-ahead file holding this many events is sealed to Parquet.
        filesystem: pyarrow filesystem used to read sealed segments (local by default).

    Example::

        log = EventLog("var/log")
        builder = PendingBatchBuilder()
        builder.add("vehicle-7", 1, "c1/0", "VehicleRegistered", 1, now, "c1", "", "{...}")
        [appended] = log.append_batch(builder.build())
    """

    def __init__(
        self,
        root: str,
        partitions: int = 4,
        seal_events: int = 100_000,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.root = root
        self.seal_events = seal_events
        self._fs = filesystem or pafs.LocalFileSystem()
        os.makedirs(root, exist_ok=True)
        self.partition_count = self._load_or_create_meta(partitions)
        self._parts = [
            _Partition(i, os.path.join(root, f"partition-{i:02d}"))
            for i in range(self.partition_count)
        ]
        self._versions: dict[str, int] = {}
        self._commands: dict[str, int] = {}
        self._watermark = 0
        self._state = threading.Condition()
        self._recover()
        self._next_position = self._watermark + 1
        self._queue: queue.SimpleQueue[tuple[pa.RecordBatch, Future[BatchOutcome]] | None]
        self._queue = queue.SimpleQueue()
        self._io = ThreadPoolExecutor(max_workers=self.partition_count, thread_name_prefix="fsync")
        # Sealing a 100,000-event segment (Parquet, typed files) takes a core for a
        # while; at a lower priority it yields it to the appends (over 1,500 frequency
        # events, 1.5M log events, the response p99 went from 58 to 52 ms in one pair
        # of runs).
        self._sealer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="seal", initializer=lower_this_threads_priority
        )
        self._failed: BaseException | None = None
        self._closed = False
        # called from the writer thread after each commit round with the new watermark
        self.on_commit: list[Callable[[int], None]] = []
        self._writer = threading.Thread(target=self._commit_loop, name="log-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ appends

    def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        expected_version: int,
        command_id: str,
        occurred_at: datetime,
        correlation_id: str = "",
        metadata: str = "{}",
    ) -> Appended:
        """Append one command's events to one stream; raises `ConcurrencyError` if stale.

        A `command_id` the log has seen returns the first acknowledgement
        (`duplicate=True`) and writes nothing, whatever the events.
        """
        if not events:
            raise ValueError("append needs at least one event")
        builder = PendingBatchBuilder()
        for i, event in enumerate(events):
            builder.add(
                stream_id,
                expected_version + 1 + i,
                f"{command_id}/{i}",
                event.type_name(),
                event.schema_version,
                occurred_at,
                command_id,
                correlation_id,
                event.model_dump_json(),
                metadata,
            )
        [outcome] = self.append_batch(builder.build())
        if isinstance(outcome, ConcurrencyError):
            raise outcome
        return outcome

    def append_batch(self, batch: pa.RecordBatch) -> BatchOutcome:
        """Group-commit a batch of pending events (`PENDING_SCHEMA`), one outcome per command.

        Rows of one command are contiguous and number their stream's versions
        consecutively; the first row's version minus one is the expected version.
        Blocks until every accepted event is durable.
        """
        return self.submit_batch(batch).result()

    def submit_batch(self, batch: pa.RecordBatch) -> Future[BatchOutcome]:
        """Like `append_batch`, but returns at once with a future of the outcomes."""
        if batch.schema != PENDING_SCHEMA:
            raise ValueError(f"batch schema must be PENDING_SCHEMA, got {batch.schema}")
        if self._closed:
            raise LogClosed("the log is closed")
        if self._failed is not None:
            raise LogError(f"the log stopped accepting appends: {self._failed}")
        _check_commands_are_contiguous(batch)
        future: Future[BatchOutcome] = Future()
        self._queue.put((batch, future))
        return future

    def lookup_commands(self, command_ids: Sequence[str]) -> dict[str, Appended]:
        """The first acknowledgement of each command the log has recorded (others are absent)."""
        found: dict[str, Appended] = {}
        with self._state:
            for cmd in command_ids:
                packed = self._commands.get(cmd)
                if packed is not None:
                    found[cmd] = self._duplicate(cmd, packed, "")
        return found

    def version(self, stream_id: str) -> int:
        with self._state:
            return self._versions.get(stream_id, 0)

    @property
    def watermark(self) -> int:
        """The highest position readers may see; every position up to it is settled."""
        with self._state:
            return self._watermark

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join()
        self._sealer.shutdown(wait=True)
        self._io.shutdown(wait=True)
        for part in self._parts:
            if part.file is not None:
                os.close(part.file)
                part.file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commit

    def _commit_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = [first]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                items.append(nxt)
            try:
                outcomes = self._commit(items)
            except BaseException as exc:  # disk full, I/O error: nobody gets a false ack
                self._failed = exc
                for _, fut in items:
                    fut.set_exception(LogError(f"append failed, nothing acknowledged: {exc}"))
            else:
                for (_, fut), result in zip(items, outcomes, strict=True):
                    fut.set_result(result)
                for notify in self.on_commit:
                    notify(self._watermark)
            if stop:
                return

    def _commit(
        self, items: list[tuple[pa.RecordBatch, Future[BatchOutcome]]]
    ) -> list[BatchOutcome]:
        versions: dict[str, int] = {}
        new_commands: dict[str, int] = {}
        outcomes: list[BatchOutcome] = []
        accepted_tables: list[pa.Table] = []
        accepted_positions: list[np.ndarray] = []
        position = self._next_position
        for batch, _ in items:
            stream_ids = batch.column("stream_id").to_pylist()
            cmd_ids = batch.column("command_id").to_pylist()
            stream_versions = batch.column("stream_version").to_pylist()
            n = len(stream_ids)
            fast = self._all_new_singles(
                cmd_ids, stream_ids, stream_versions, versions, new_commands
            )
            if fast:
                # every row is a new one-event command on its own stream, each stream
                # at the version it expects: the common case, judged without a loop
                numbered = np.arange(position, position + n, dtype=np.int64)
                packed = ((numbered << _COUNT_BITS) | 1).tolist()
                new_commands.update(zip(cmd_ids, packed, strict=True))
                versions.update(zip(stream_ids, stream_versions, strict=True))
                outcomes.append(
                    BatchOutcome(cmd_ids, stream_ids, numbered.tolist(), [1] * n, [False] * n)
                )
                accepted_tables.append(pa.Table.from_batches([batch]))
                accepted_positions.append(numbered)
                position += n
                continue
            results = BatchOutcome()
            take: list[int] = []
            taken_positions: list[int] = []
            i = 0
            while i < n:
                cmd, sid = cmd_ids[i], stream_ids[i]
                j = i + 1
                while j < n and cmd_ids[j] == cmd:
                    j += 1
                prior = new_commands.get(cmd)
                if prior is None:
                    prior = self._commands.get(cmd)
                if prior is not None:
                    dup = self._duplicate(cmd, prior, sid)
                    results.add(cmd, sid, dup.first_position, dup.count, True)
                    i = j
                    continue
                current = versions.get(sid)
                if current is None:
                    current = self._versions.get(sid, 0)
                expected = stream_versions[i] - 1
                if expected != current:
                    results.add_conflict(cmd, sid, expected, current)
                    i = j
                    continue
                count = j - i
                take.extend(range(i, j))
                taken_positions.extend(range(position, position + count))
                new_commands[cmd] = (position << _COUNT_BITS) | count
                versions[sid] = current + count
                results.add(cmd, sid, position, count, False)
                position += count
                i = j
            outcomes.append(results)
            if take:
                table = pa.Table.from_batches([batch])
                if len(take) != n:
                    table = table.take(pa.array(take, pa.int64()))
                accepted_tables.append(table)
                accepted_positions.append(np.asarray(taken_positions, dtype=np.int64))
        if accepted_tables:
            self._write(accepted_tables, accepted_positions)
        with self._state:
            self._versions.update(versions)
            self._commands.update(new_commands)
            self._next_position = position
            self._watermark = position - 1
            self._state.notify_all()
        return outcomes

    def _all_new_singles(
        self,
        cmd_ids: list[str],
        stream_ids: list[str],
        stream_versions: list[int],
        round_versions: dict[str, int],
        round_commands: dict[str, int],
    ) -> bool:
        """True when each row is a new command with one event on a stream of its own,
        and every stream is at the version its row expects (set and map operations,
        which run in C).

        A stream may have had events earlier in the same round: a sender that keeps
        two batches of the same vehicles in flight puts both in one round, and the
        second must expect the version the first leaves.
        """
        n = len(cmd_ids)
        cmd_set = set(cmd_ids)
        if len(cmd_set) != n or len(set(stream_ids)) != n:
            return False
        if self._commands.keys() & cmd_set or round_commands.keys() & cmd_set:
            return False
        current = list(map(self._versions.get, stream_ids, [0] * n))
        if round_versions:
            current = list(map(round_versions.get, stream_ids, current))
        return all(map(int.__eq__, current, [v - 1 for v in stream_versions]))

    @staticmethod
    def _duplicate(cmd: str, packed: int, stream_id: str) -> Appended:
        # The index keeps positions only (memory: one int per command); the stream
        # is the one the repeated request names.
        return Appended(
            cmd,
            stream_id,
            packed >> _COUNT_BITS,
            packed & ((1 << _COUNT_BITS) - 1),
            duplicate=True,
        )

    def _write(self, tables: list[pa.Table], positions: list[np.ndarray]) -> None:
        pending = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if pending.num_rows == 0:
            return
        pos = np.concatenate(positions)
        bodies = pending_bodies(pending)  # one Arrow kernel for the round
        part_of_row = pending.column("stream_hash").to_numpy() % self.partition_count
        # One stable reordering by partition, then zero-copy slices: rather than one
        # gather per partition. Stable, so each partition keeps position order. Not
        # needed when the rows are in partition order already (a round of a few
        # events, often one: two gathers, ~45 µs of a ~0.6 ms round).
        if self.partition_count > 1 and (part_of_row[1:] < part_of_row[:-1]).any():
            order = np.argsort(part_of_row, kind="stable")
            indices = pa.array(order)
            pending = pending.take(indices)
            bodies = bodies.take(indices)
            pos = pos[order]
        rows = pending.combine_chunks().to_batches()[0]
        counts = np.bincount(part_of_row, minlength=self.partition_count).tolist()
        frames: list[tuple[_Partition, pa.RecordBatch]] = []
        start = 0
        for part, count in zip(self._parts, counts, strict=True):
            if count:
                end = start + count
                records = self._records(
                    part, rows.slice(start, count), bodies.slice(start, count), pos[start:end]
                )
                frames.append((part, records))
                start = end
        if len(frames) == 1:  # one file to write: no hand-off to the I/O threads
            self._append_frame(*frames[0])
        else:
            writes = [self._io.submit(self._append_frame, part, batch) for part, batch in frames]
            for w in writes:
                w.result()
        for part, batch in frames:
            wal = part.active
            last_position = batch.column("position")[-1].as_py()
            wal.batches.append(batch)
            wal.ends.append(last_position)
            wal.rows += batch.num_rows
            wal.last_position = last_position
            part.last_hash = batch.column("hash")[-1].as_py()
            if wal.rows >= self.seal_events:
                self._rotate(part)

    def _records(
        self, part: _Partition, pending: pa.RecordBatch, bodies: pa.Array, positions: np.ndarray
    ) -> pa.RecordBatch:
        # The hash chain is sequential by nature (~0.6 µs an event): the loop keeps
        # to local names and packs positions with a prepared struct, computing
        # what `chained_hash` computes (the verifier uses that one).
        sha256 = hashlib.sha256
        pack = _POSITION.pack
        hashes: list[bytes] = []
        append = hashes.append
        h = part.last_hash
        for p, body in zip(positions.tolist(), bodies.to_pylist(), strict=True):
            h = sha256(h + pack(p) + body).digest()
            append(h)
        n = len(hashes)
        prev_hashes = [part.last_hash, *hashes[:-1]]
        columns = {
            "position": pa.array(positions, pa.int64()),
            "partition": pa.array(np.full(n, part.index, dtype=np.int32)),
            "prev_hash": pa.array(prev_hashes, pa.binary(HASH_BYTES)),
            "hash": pa.array(hashes, pa.binary(HASH_BYTES)),
        }
        arrays = [
            columns[f.name] if f.name in columns else pending.column(f.name) for f in RECORD_SCHEMA
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=RECORD_SCHEMA)

    @staticmethod
    def _append_frame(part: _Partition, batch: pa.RecordBatch) -> None:
        assert part.file is not None
        os.write(part.file, encode_frame(batch))
        os.fsync(part.file)

    # ------------------------------------------------------------------ sealing

    def _rotate(self, part: _Partition) -> None:
        """Start a new write-ahead file and seal the full one to Parquet in the background."""
        full = part.active
        self._open_wal(part, full.last_position + 1)
        self._sealer.submit(self._seal, part, full)

    def _seal(self, part: _Partition, wal: _Wal) -> None:
        table = pa.Table.from_batches(wal.batches, schema=RECORD_SCHEMA)
        first = int(table.column("position")[0].as_py())
        last = int(table.column("position")[-1].as_py())
        name = f"seg-{first:020d}-{last:020d}.parquet"
        tmp = os.path.join(part.path, name + ".tmp")
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=128 * 1024,
            use_dictionary=_DICTIONARY_COLUMNS,
        )
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, os.path.join(part.path, name))
        # typed payload columns (events.typed), durable before the manifest names the segment
        write_typed(table, part.path, first, last)
        segment = _Segment(name, first, last, table.num_rows, table.column("hash")[-1].as_py())
        with self._state:
            segments = [*part.segments, segment]
            self._write_manifest(part, segments)
            part.segments = segments
            part.wals.remove(wal)
        os.remove(wal.path)
        fsync_dir(part.path)

    def _write_manifest(self, part: _Partition, segments: list[_Segment]) -> None:
        doc = {
            "format": _FORMAT,
            "segments": [
                {
                    "file": s.file,
                    "first_position": s.first_position,
                    "last_position": s.last_position,
                    "count": s.count,
                    "last_hash": s.last_hash.hex(),
                }
                for s in segments
            ],
        }
        path = os.path.join(part.path, "manifest.json")
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fsync_dir(part.path)

    def _open_wal(self, part: _Partition, first_position: int) -> None:
        path = os.path.join(part.path, f"wal-{first_position:020d}.log")
        if part.file is not None:
            os.close(part.file)
        part.file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_dir(part.path)
        part.wals.append(_Wal(path, first_position))

    # ------------------------------------------------------------------ recovery

    def _load_or_create_meta(self, partitions: int) -> int:
        path = os.path.join(self.root, "log.json")
        if os.path.exists(path):
            with open(path) as f:
                meta = json.load(f)
            if meta.get("format") != _FORMAT:
                raise LogCorrupted(f"{path}: unknown log format {meta.get('format')!r}")
            return int(meta["partitions"])
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        with open(path + ".tmp", "w") as f:
            json.dump({"format": _FORMAT, "partitions": partitions}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fsync_dir(self.root)
        return partitions

    def _recover(self) -> None:
        index_parts: list[pa.Table] = []
        for part in self._parts:
            os.makedirs(part.path, exist_ok=True)
            self._recover_partition(part)
            index_parts.append(self._index_columns(part))
        index = pa.concat_tables(index_parts) if index_parts else None
        if index is None or index.num_rows == 0:
            self._watermark = 0
            return
        self._watermark = int(pc.max(index.column("position")).as_py())
        # Rows of one partition are in position order, so the last row of a stream
        # holds its version, and a command's events are adjacent rows: both indexes
        # come from one pass without hashing a million strings twice.
        streams = pc.dictionary_encode(index.column("stream_id").combine_chunks())
        codes = streams.indices.to_numpy(False)
        latest = np.zeros(len(streams.dictionary), dtype=np.int64)
        np.maximum.at(latest, codes, index.column("stream_version").to_numpy())
        self._versions = dict(zip(streams.dictionary.to_pylist(), latest.tolist(), strict=True))
        cmds = index.column("command_id").combine_chunks()
        n = len(cmds)
        starts = np.flatnonzero(
            np.concatenate(
                [[True], pc.not_equal(cmds.slice(1), cmds.slice(0, n - 1)).to_numpy(False)]
            )
        )
        counts = np.diff(np.append(starts, n))
        first = index.column("position").to_numpy()[starts]
        packed = (first << _COUNT_BITS) | counts
        self._commands = dict(
            zip(cmds.take(pa.array(starts)).to_pylist(), packed.tolist(), strict=True)
        )

    def _recover_partition(self, part: _Partition) -> None:
        manifest = os.path.join(part.path, "manifest.json")
        listed: set[str] = set()
        if os.path.exists(manifest):
            with open(manifest) as f:
                doc = json.load(f)
            for s in doc["segments"]:
                seg = _Segment(
                    s["file"],
                    s["first_position"],
                    s["last_position"],
                    s["count"],
                    bytes.fromhex(s["last_hash"]),
                )
                if not os.path.exists(os.path.join(part.path, seg.file)):
                    raise LogCorrupted(f"{part.path}: sealed segment {seg.file} is missing")
                part.segments.append(seg)
                listed.add(seg.file)
        ranges = {seg_file[4:45] for seg_file in listed}  # "<first>-<last>" of each
        for name in sorted(os.listdir(part.path)):
            # A crash while sealing leaves a temporary or unlisted segment (and its typed
            # files) whose events are still in the write-ahead file: drop them, the next
            # seal writes them again.
            if (
                name.endswith(".tmp")
                or (name.startswith("seg-") and name not in listed)
                or (name.startswith("typ-") and name[4:45] not in ranges)
            ):
                os.remove(os.path.join(part.path, name))
        wal_names = sorted(n for n in os.listdir(part.path) if n.startswith("wal-"))
        sealed = part.sealed_through
        part.last_hash = part.segments[-1].last_hash if part.segments else GENESIS_HASH
        for k, name in enumerate(wal_names):
            path = os.path.join(part.path, name)
            result = scan(path)
            if result.torn:
                if k != len(wal_names) - 1:
                    raise LogCorrupted(f"{path}: damaged frame in a write-ahead file that was full")
                with open(path, "r+b") as f:  # the torn tail was never acknowledged
                    f.truncate(result.good_bytes)
                    f.flush()
                    os.fsync(f.fileno())
            batches = [b for b in result.batches if b.num_rows]
            kept = []
            for b in batches:
                mask = pc.greater(b.column("position"), sealed)
                b = b.filter(mask)
                if b.num_rows:
                    kept.append(b)
            first = int(name[4:-4])
            wal = _Wal(
                path,
                first,
                kept,
                [b.column("position")[-1].as_py() for b in kept],
                sum(b.num_rows for b in kept),
            )
            if kept:
                wal.last_position = int(kept[-1].column("position")[-1].as_py())
                part.last_hash = kept[-1].column("hash")[-1].as_py()
            if not kept and k != len(wal_names) - 1:
                os.remove(path)  # fully sealed before the crash
                continue
            part.wals.append(wal)
        # A write-ahead file that was rotated but whose sealing the crash interrupted
        # is sealed now, in order, before anything newer: the invariant "only the
        # newest write-ahead file is unsealed" is what lets `sealed_through` decide
        # which write-ahead rows a segment already holds.
        for wal in part.wals[:-1]:
            self._seal(part, wal)
        if part.wals:
            part.file = os.open(part.wals[-1].path, os.O_WRONLY | os.O_APPEND)
        else:
            self._open_wal(part, sealed + 1)
        # a fully sealed but undeleted WAL at the end just continues to be written

    def _index_columns(self, part: _Partition) -> pa.Table:
        cols = ["position", "stream_id", "stream_version", "command_id"]
        tables = [
            pq.read_table(self._segment_path(part, s), columns=cols, filesystem=self._fs)
            for s in part.segments
        ]
        tables += [pa.Table.from_batches(w.batches, RECORD_SCHEMA).select(cols) for w in part.wals]
        if not tables:
            return RECORD_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(tables)

    def _segment_path(self, part: _Partition, seg: _Segment) -> str:
        return os.path.join(part.path, seg.file)

    # ------------------------------------------------------------------ reads

    def read_all(
        self,
        from_position: int = 1,
        to_position: int | None = None,
        columns: Sequence[str] | None = None,
        shard: tuple[int, int] | None = None,
        partition: int | None = None,
        stream_id: str | None = None,
        types: Sequence[str] | None = None,
    ) -> pa.Table:
        """Events with from_position <= position <= to_position (default: the watermark).

        `shard=(index, count)` keeps streams with `stream_hash % count == index`,
        which is how entity hosts load the streams they own; `stream_id` keeps one
        stream (reading only its partition); `types` keeps the events of those types
        (a follower that needs a few types does not receive the telemetry it skips).
        """
        if stream_id is not None:
            partition = stream_hash(stream_id) % self.partition_count
        with self._state:
            upper = self._watermark if to_position is None else min(to_position, self._watermark)
            # Only the write-ahead batches that reach from_position: a follower reading
            # the newest events must not pay for the whole unsealed tail.
            plan = [
                (
                    part,
                    list(part.segments),
                    [w.batches[bisect.bisect_left(w.ends, from_position) :] for w in part.wals],
                )
                for part in self._parts
            ]
        # Only the columns asked for, and those the filters need, are read and carried
        # through the filters: followers ask for a few columns of the newest events.
        needed = _needed_columns(columns, stream_id, shard, types)
        tables: list[pa.Table] = []
        if upper >= from_position:
            for part, segments, wals in plan:
                if partition is not None and part.index != partition:
                    continue
                for seg in segments:
                    if seg.last_position < from_position or seg.first_position > upper:
                        continue
                    t = pq.read_table(
                        self._segment_path(part, seg),
                        columns=needed,
                        filesystem=self._fs,
                        filters=[("position", ">=", from_position), ("position", "<=", upper)],
                    )
                    tables.append(t.cast(_schema_of(needed)))
                for batches in wals:
                    if batches:
                        t = pa.Table.from_batches(batches, RECORD_SCHEMA)
                        tables.append(t if needed is None else t.select(needed))
        if not tables:
            table = _schema_of(needed).empty_table()
        else:
            table = pa.concat_tables(tables)
            pos = table.column("position").to_numpy()
            keep = (pos >= from_position) & (pos <= upper)
            if not keep.all():
                table = table.filter(pa.array(keep))
        if stream_id is not None:
            table = table.filter(pc.equal(table.column("stream_id"), stream_id))
        if shard is not None:
            index, count = shard
            hashes = table.column("stream_hash").to_numpy()
            table = table.filter(pa.array(hashes % count == index))
        if types is not None:
            table = table.filter(pc.is_in(table.column("type"), pa.array(list(types), pa.string())))
        pos = table.column("position").to_numpy()
        if pos.size > 1 and not (pos[1:] > pos[:-1]).all():  # partitions interleave
            table = table.take(pa.array(np.argsort(pos, kind="stable")))
        return table.select(list(columns)) if columns else table

    def in_memory(self, from_position: int) -> bool:
        """Whether every event from `from_position` on is in the write-ahead tail, so that
        reading them touches no sealed segment (a follower's read, ~0.1 ms)."""
        with self._state:
            return all(
                not part.segments or part.segments[-1].last_position < from_position
                for part in self._parts
            )

    def read_stream(self, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
        table = self.read_all(stream_id=stream_id)
        return to_recorded(
            table.filter(pc.greater_equal(table.column("stream_version"), from_version))
        )

    def wait_for(self, after_position: int, timeout_s: float) -> int:
        """Block until the watermark passes `after_position` or time is up; return the watermark."""
        with self._state:
            self._state.wait_for(lambda: self._watermark > after_position, timeout=timeout_s)
            return self._watermark

    def subscribe(
        self, from_position: int = 1, poll_s: float = 0.5, stop: threading.Event | None = None
    ) -> Iterator[pa.Table]:
        """Yield tables of new events in order, forever (or until `stop` is set)."""
        nxt = from_position
        while stop is None or not stop.is_set():
            mark = self.wait_for(nxt - 1, poll_s)
            if mark >= nxt:
                table = self.read_all(nxt, mark)
                nxt = mark + 1
                if table.num_rows:
                    yield table

    def sealed_segment_paths(self) -> list[str]:
        with self._state:
            return [self._segment_path(p, s) for p in self._parts for s in p.segments]

    def flush_seals(self) -> None:
        """Wait until every full write-ahead file has been sealed (tests, benchmarks, shutdown)."""
        self._sealer.submit(lambda: None).result()


def _check_commands_are_contiguous(batch: pa.RecordBatch) -> None:
    """Refuse, before it is queued, a batch whose commands the commit round could not judge.

    Adjacent rows of one command must be one stream with consecutive versions
    (vectorised: this runs on every append). A command id that comes back later in
    the same batch is simply a repeat, answered like any other.
    """
    n = batch.num_rows
    if n == 0:
        return
    versions = batch.column("stream_version")
    if pc.min(versions).as_py() < 1:
        raise ValueError("stream versions start at 1")
    if n == 1:
        return
    cmd, sid = batch.column("command_id"), batch.column("stream_id")
    same_command = pc.equal(cmd.slice(1), cmd.slice(0, n - 1))
    broken = pc.or_(
        pc.not_equal(sid.slice(1), sid.slice(0, n - 1)),
        pc.not_equal(versions.slice(1), pc.add(versions.slice(0, n - 1), 1)),
    )
    bad = pc.and_(same_command, broken)
    if pc.any(bad).as_py():
        k = pc.index(bad, True).as_py() + 1
        raise ValueError(
            f"command {cmd[k].as_py()!r}: its events must be on one stream, "
            "with consecutive versions"
        )


def _needed_columns(
    columns: Sequence[str] | None,
    stream_id: str | None,
    shard: tuple[int, int] | None,
    types: Sequence[str] | None,
) -> list[str] | None:
    """The record columns a read carries: those asked for plus those its filters use,
    in record order (None: all of them)."""
    if not columns:
        return None
    wanted = {"position", *columns}
    if stream_id is not None:
        wanted.add("stream_id")
    if shard is not None:
        wanted.add("stream_hash")
    if types is not None:
        wanted.add("type")
    unknown = wanted - set(RECORD_SCHEMA.names)
    if unknown:
        raise KeyError(f"no such record columns: {sorted(unknown)}")
    return [name for name in RECORD_SCHEMA.names if name in wanted]


def _schema_of(names: list[str] | None) -> pa.Schema:
    if names is None:
        return RECORD_SCHEMA
    return pa.schema([RECORD_SCHEMA.field(name) for name in names])


def to_recorded(table: pa.Table) -> list[RecordedEvent]:
    rows = table.to_pylist()
    return [RecordedEvent.model_validate(r) for r in rows]
