"""DuckDB over the log, with no Python loop over events.

Sealed segments are Parquet files DuckDB scans itself; the unsealed tail is handed
over as an Arrow table (zero-copy). The view `events` has the columns of
`events.schema.RECORD_SCHEMA`.

Segments sealed with typed payload columns (:mod:`events.typed`) are also offered
per event type: :func:`typed_sources` gives, for the connection a view was attached
to, each type's typed files and the view ``<view>_json`` of the events no typed file
holds (segments sealed without them, and the unsealed tail), so a reader parses JSON
only for those.

:func:`attach_log` reads the folder afresh on every call. A reader that polls (the
projection runner) keeps a :class:`LogView` instead: it remembers, per write-ahead
file, how many bytes it has already decoded, so each poll reads only the frames
appended since, and it leaves out of the view the sealed segments that end at or
before the position the caller has already seen.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from events.reader import SegmentInfo, list_partitions
from events.schema import RECORD_SCHEMA
from events.typed import TypedFile, TypedIndex, read_index
from events.wal import decode_frames, scan

__all__ = ["LogView", "TypedSources", "attach_log", "forget_typed", "read_frames", "typed_sources"]


@dataclass(frozen=True)
class TypedSources:
    """What a view's sealed segments offer as typed columns (see :mod:`events.typed`).

    ``files``: per event type, its typed files. ``json_view``: the events of segments
    without typed files plus the unsealed tail. ``untyped``: per event type, segments
    that have typed files but none for this type (its payloads are read from them).
    """

    view: str
    json_view: str
    files: dict[str, list[TypedFile]]
    untyped: dict[str, list[str]]


# Per connection (held weakly: a closed connection's entry goes with it): the typed
# sources of the view last attached to it.
_TYPED: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, TypedSources] = (
    weakref.WeakKeyDictionary()
)


def typed_sources(con: duckdb.DuckDBPyConnection) -> TypedSources | None:
    """The typed sources of the view last attached to ``con`` by this module."""
    return _TYPED.get(con)


def forget_typed(con: duckdb.DuckDBPyConnection) -> None:
    """Drop what :func:`typed_sources` knows of ``con``."""
    _TYPED.pop(con, None)


def attach_log(con: duckdb.DuckDBPyConnection, root: str, view: str = "events") -> None:
    """Create (or replace) the view `view` over the log folder `root` as it is now."""
    segments: list[tuple[SegmentInfo, TypedIndex | None]] = []
    tail: list[pa.RecordBatch] = []
    for part in list_partitions(root):
        segments.extend((s, _index(s)) for s in part.segments)
        sealed = part.segments[-1].last_position if part.segments else 0
        for path in part.wal_paths:
            for batch in scan(path).batches:
                kept = batch.filter(pc.greater(batch.column("position"), sealed))
                if kept.num_rows:
                    tail.append(kept)
    _create_view(con, view, segments, tail)


def _index(segment: SegmentInfo) -> TypedIndex | None:
    return read_index(segment.path, segment.first_position, segment.last_position)


def _parquet(paths: list[str]) -> str:
    return "read_parquet([" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "])"


def _create_view(
    con: duckdb.DuckDBPyConnection,
    view: str,
    segments: list[tuple[SegmentInfo, TypedIndex | None]],
    tail: list[pa.RecordBatch],
) -> None:
    tail_table = pa.Table.from_batches(tail, RECORD_SCHEMA)
    con.register(f"{view}_tail", tail_table)
    tail_select = f"SELECT * FROM {view}_tail"
    every = [s.path for s, _ in segments]
    plain = [s.path for s, index in segments if index is None]
    files: dict[str, list[TypedFile]] = {}
    untyped: dict[str, list[str]] = {}
    for seg, index in segments:
        if index is None:
            continue
        for typ, tf in index.files.items():
            files.setdefault(typ, []).append(tf)
        for typ in index.untyped:
            untyped.setdefault(typ, []).append(seg.path)
    for name, paths in ((view, every), (f"{view}_json", plain)):
        selects = [tail_select]
        if paths:
            selects.insert(0, f"SELECT * FROM {_parquet(paths)}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS " + " UNION ALL BY NAME ".join(selects))
    _TYPED[con] = TypedSources(view, f"{view}_json", files, untyped)


def read_frames(
    path: str, offset: int, inode: int | None = None
) -> tuple[list[pa.RecordBatch], int, int, int]:
    """Decode the whole frames of a write-ahead file from byte ``offset`` on.

    Returns the batches, the offset just after the last whole frame, the file's size
    and its inode. A frame still being written (short, or its CRC not yet matching)
    ends the read; the next call starts again at that frame. A file that is not the
    one ``inode`` names (the folder was recreated) is read from its start.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if inode is not None and st.st_ino != inode:
            offset = 0
        if size <= offset:
            return [], offset, size, st.st_ino
        f.seek(offset)
        data = f.read()
    batches, at = decode_frames(data)
    return batches, offset + at, size, st.st_ino


@dataclass
class _WalTail:
    offset: int = 0
    inode: int | None = None
    # (first position, last position, batch), in the order the frames were written
    batches: list[tuple[int, int, pa.RecordBatch]] = field(default_factory=list)

    @property
    def last_position(self) -> int:
        return max((hi for _, hi, _ in self.batches), default=0)


class LogView:
    """The view ``events`` over a log folder, kept current by reading only what is new.

    Example::

        view = LogView("var/log")
        view.attach(con)                 # first call: reads every write-ahead file
        view.attach(con, after=1_000)    # later: only new frames; segments past 1,000
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._wals: dict[str, _WalTail] = {}
        # sealed segments never change (the hash names the content, should the folder be
        # recreated under the same paths)
        self._indexes: dict[tuple[str, bytes], TypedIndex | None] = {}
        self._lock = threading.Lock()  # one view may serve several connections

    def attach(self, con: duckdb.DuckDBPyConnection, view: str = "events", after: int = 0) -> None:
        """Create (or replace) ``view``; it holds at least every event with position > ``after``.

        Sealed segments whose last position is <= ``after`` are left out (their events
        are older than what the caller asks for); so are decoded write-ahead batches
        that end at or before ``after``.
        """
        with self._lock:
            segments, tail = self._current(after)
        _create_view(con, view, segments, tail)

    def _current(
        self, after: int
    ) -> tuple[list[tuple[SegmentInfo, TypedIndex | None]], list[pa.RecordBatch]]:
        segments: list[tuple[SegmentInfo, TypedIndex | None]] = []
        tail: list[pa.RecordBatch] = []
        for part in list_partitions(self.root):
            folder = os.path.join(self.root, f"partition-{part.index:02d}")
            sealed = part.segments[-1].last_position if part.segments else 0
            for s in part.segments:
                if s.last_position > after:
                    key = (s.path, s.last_hash)
                    if key not in self._indexes:
                        self._indexes[key] = _index(s)
                    segments.append((s, self._indexes[key]))
            for path in part.wal_paths:
                tail.extend(self._read(path, sealed, after))
            # A write-ahead file sealed after the manifest was read is already gone
            # from the folder: its events stay in memory until a manifest lists them.
            for path, cached in list(self._wals.items()):
                if os.path.dirname(path) != folder or path in part.wal_paths:
                    continue
                if cached.last_position <= sealed:
                    del self._wals[path]
                else:
                    tail.extend(_keep(cached.batches, max(sealed, after)))
        return segments, tail

    def _read(self, path: str, sealed: int, after: int) -> list[pa.RecordBatch]:
        cached = self._wals.setdefault(path, _WalTail())
        start = cached.offset
        try:
            batches, offset, size, inode = read_frames(path, start, cached.inode)
            if inode != cached.inode:  # first read, or another file: read from its start
                cached = self._wals[path] = _WalTail(inode=inode)
            elif size < start:  # truncated (the writer cut a torn tail): start over
                cached = self._wals[path] = _WalTail(inode=inode)
                batches, offset, _, _ = read_frames(path, 0)
        except FileNotFoundError:  # sealed and removed since the folder was listed
            batches, offset = [], cached.offset
        cached.offset = offset
        for b in batches:
            if b.num_rows:
                lo, hi = pc.min_max(b.column("position")).values()
                cached.batches.append((lo.as_py(), hi.as_py(), b))
        # rows a sealed segment holds are read from the segment
        cached.batches = [(lo, hi, b) for lo, hi, b in cached.batches if hi > sealed]
        return _keep(cached.batches, max(sealed, after))


def _keep(batches: list[tuple[int, int, pa.RecordBatch]], after: int) -> list[pa.RecordBatch]:
    """The rows with position > ``after``."""
    out = []
    for lo, hi, b in batches:
        if hi <= after:
            continue
        out.append(b if lo > after else b.filter(pc.greater(b.column("position"), after)))
    return out
