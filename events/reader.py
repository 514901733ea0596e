"""Read a log folder without being its writer: auditors, projections, `v2g log verify`.

Never modifies anything; a torn write-ahead tail (a crash the writer has not yet
recovered from) is simply not read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from events.schema import RECORD_SCHEMA
from events.wal import scan


@dataclass(frozen=True)
class SegmentInfo:
    path: str
    first_position: int
    last_position: int
    count: int
    last_hash: bytes


@dataclass(frozen=True)
class PartitionFiles:
    index: int
    segments: list[SegmentInfo]
    wal_paths: list[str]


def partition_count(root: str) -> int:
    path = os.path.join(root, "log.json")
    try:
        with open(path) as f:
            return int(json.load(f)["partitions"])
    except FileNotFoundError:
        raise FileNotFoundError(f"no event log at {root!r} (log.json missing)") from None


def list_partitions(root: str) -> list[PartitionFiles]:
    parts = []
    for i in range(partition_count(root)):
        folder = os.path.join(root, f"partition-{i:02d}")
        segments = []
        manifest = os.path.join(folder, "manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                for s in json.load(f)["segments"]:
                    segments.append(
                        SegmentInfo(
                            os.path.join(folder, s["file"]),
                            s["first_position"],
                            s["last_position"],
                            s["count"],
                            bytes.fromhex(s["last_hash"]),
                        )
                    )
        wals = (
            sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("wal-"))
            if os.path.isdir(folder)
            else []
        )
        parts.append(PartitionFiles(i, segments, wals))
    return parts


def read_partition(part: PartitionFiles, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """Every event of one partition in position order (sealed segments, then the WAL)."""
    fs = filesystem or pafs.LocalFileSystem()
    tables = [pq.read_table(s.path, filesystem=fs).cast(RECORD_SCHEMA) for s in part.segments]
    sealed_through = part.segments[-1].last_position if part.segments else 0
    for path in part.wal_paths:
        batches = [b for b in scan(path).batches if b.num_rows]
        if batches:
            t = pa.Table.from_batches(batches, RECORD_SCHEMA)
            tables.append(t.filter(pc.greater(t.column("position"), sealed_through)))
    if not tables:
        return RECORD_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def read_log(root: str, filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """The whole log as one table in global position order."""
    tables = [read_partition(p, filesystem) for p in list_partitions(root)]
    return pa.concat_tables(tables).sort_by("position")
