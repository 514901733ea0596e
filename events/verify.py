"""Prove a log unaltered: recompute every partition's hash chain.

Each stored event carries `prev_hash` (the hash of the event before it in its
partition) and `hash = sha256(prev_hash | position | canonical body)`. Walking a
partition in order:

- a `prev_hash` that is not the previous event's hash, or a position that does not
  increase, means an event before this one is missing or the order was changed;
- a `hash` that does not match the recomputed one means this event was altered;
- a sealed segment whose last hash or count differs from the manifest means a
  segment was replaced or cut;
- a segment's typed payload columns (:mod:`events.typed`) that differ from what its
  JSON payloads say mean a typed file was altered (readers would see other values
  than the chain covers).

The report names the first such event. Deleting the newest, unsealed events
cannot be told from a crash by the chain alone; auditors record the head hashes
this report prints and compare them next time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from events.reader import PartitionFiles, list_partitions, read_partition
from events.schema import GENESIS_HASH, body_column, chained_hash
from events.typed import check_typed


@dataclass(frozen=True)
class Problem:
    partition: int
    position: int
    stream_id: str
    stream_version: int
    kind: str  # "altered" | "missing or reordered" | "segment mismatch" | "typed mismatch"
    detail: str

    def __str__(self) -> str:
        return (
            f"partition {self.partition}, position {self.position} "
            f"({self.stream_id} v{self.stream_version}): {self.kind}: {self.detail}"
        )


@dataclass
class VerifyReport:
    events_checked: int = 0
    heads: dict[int, str] = field(default_factory=dict)  # partition -> last hash (hex)
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_log(root: str) -> VerifyReport:
    report = VerifyReport()
    for part in list_partitions(root):
        table = read_partition(part)
        problem = _check_chain(part.index, table)
        if problem is None:
            problem = _check_segments(part, table)
        if problem is None:
            problem = _check_typed(part)
        report.events_checked += table.num_rows
        if table.num_rows:
            report.heads[part.index] = table.column("hash")[-1].as_py().hex()
        if problem is not None and (
            report.problem is None or problem.position < report.problem.position
        ):
            report.problem = problem
    return report


def _check_chain(partition: int, table: pa.Table) -> Problem | None:
    positions = table.column("position").to_pylist()
    prevs = table.column("prev_hash").to_pylist()
    hashes = table.column("hash").to_pylist()
    streams = table.column("stream_id").to_pylist()
    versions = table.column("stream_version").to_pylist()
    bodies = body_column(table)
    expected_prev = GENESIS_HASH
    last_position = 0
    for i, position in enumerate(positions):

        def problem(kind: str, detail: str, i: int = i, position: int = position) -> Problem:
            return Problem(partition, position, streams[i], versions[i], kind, detail)

        if position <= last_position:
            return problem("missing or reordered", f"position follows {last_position}")
        if prevs[i] != expected_prev:
            return problem(
                "missing or reordered", "its previous hash is not the hash of the event before it"
            )
        if chained_hash(prevs[i], position, bodies[i]) != hashes[i]:
            return problem("altered", "its content does not match its hash")
        expected_prev = hashes[i]
        last_position = position
    return None


def _check_segments(part: PartitionFiles, table: pa.Table) -> Problem | None:
    positions = table.column("position")
    for seg in part.segments:
        rows = table.filter(
            pc.and_(
                pc.greater_equal(positions, seg.first_position),
                pc.less_equal(positions, seg.last_position),
            )
        )
        last_hash = rows.column("hash")[-1].as_py() if rows.num_rows else b""
        if rows.num_rows != seg.count or last_hash != seg.last_hash:
            return Problem(
                part.index,
                seg.first_position,
                "",
                0,
                "segment mismatch",
                f"{seg.path.rsplit('/', 1)[-1]} holds {rows.num_rows} events "
                f"(manifest: {seg.count}) or ends on another hash",
            )
    return None


def _check_typed(part: PartitionFiles) -> Problem | None:
    for seg in part.segments:
        try:
            detail = check_typed(seg.path, seg.first_position, seg.last_position)
        except (duckdb.Error, OSError, ValueError, KeyError) as exc:  # unreadable, torn
            detail = f"typed files unreadable: {exc}"
        if detail is not None:
            name = seg.path.rsplit("/", 1)[-1]
            return Problem(
                part.index, seg.first_position, "", 0, "typed mismatch", f"{name}: {detail}"
            )
    return None
