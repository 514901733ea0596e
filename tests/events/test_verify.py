"""Tamper evidence: an auditor's `verify` names the first altered, missing or reordered event."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from events.log import EventLog
from events.verify import verify_log
from events.wal import encode_frame, scan
from tests.events.conftest import T0, Pinged


@pytest.fixture
def sealed_log(tmp_path):
    """A log with one partition, 30 events sealed in 3 segments and 5 in the write-ahead file."""
    root = str(tmp_path / "log")
    with EventLog(root, partitions=1, seal_events=10) as log:
        for i in range(35):
            log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
        log.flush_seals()
        segments = log.sealed_segment_paths()
    assert len(segments) == 3
    return root, segments


def _rewrite(path: str, change) -> None:
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _set_payload(table: pa.Table, row: int, payload: str) -> pa.Table:
    payloads = table.column("payload").to_pylist()
    payloads[row] = payload
    return table.set_column(table.schema.get_field_index("payload"), "payload", [payloads])


def test_an_untouched_log_verifies(sealed_log):
    root, _ = sealed_log
    report = verify_log(root)
    assert report.ok and report.events_checked == 35
    assert len(report.heads[0]) == 64


def test_an_edited_payload_is_reported_as_altered_at_its_position(sealed_log):
    root, segments = sealed_log
    _rewrite(segments[1], lambda t: _set_payload(t, 3, '{"n":1000}'))  # position 14

    problem = verify_log(root).problem
    assert problem is not None
    assert (problem.position, problem.kind) == (14, "altered")


def test_a_deleted_event_is_reported_as_missing(sealed_log):
    root, segments = sealed_log
    _rewrite(segments[0], lambda t: pa.concat_tables([t.slice(0, 4), t.slice(5)]))

    problem = verify_log(root).problem
    assert problem is not None
    assert (problem.position, problem.kind) == (6, "missing or reordered")


def test_two_swapped_events_are_reported_as_reordered(sealed_log):
    root, segments = sealed_log
    order = [0, 1, 2, 3, 4, 5, 7, 6, 8, 9]
    _rewrite(segments[2], lambda t: t.take(pa.array(order)))

    problem = verify_log(root).problem
    assert problem is not None
    assert (problem.position, problem.kind) == (28, "missing or reordered")


def test_a_forged_write_ahead_frame_with_a_valid_checksum_is_still_caught(sealed_log):
    root, _ = sealed_log
    wal = next(iter(__import__("glob").glob(f"{root}/partition-00/wal-*.log")))
    batches = scan(wal).batches
    forged = [pa.RecordBatch.from_pylist(b.to_pylist(), schema=b.schema) for b in batches]
    rows = forged[2].to_pylist()
    rows[0]["payload"] = '{"n":-1}'
    forged[2] = pa.RecordBatch.from_pylist(rows, schema=forged[2].schema)
    with open(wal, "wb") as f:
        for b in forged:
            f.write(encode_frame(b))

    problem = verify_log(root).problem
    assert problem is not None
    assert problem.kind == "altered" and problem.position == forged[2].column("position")[0].as_py()


def test_a_replaced_segment_count_is_caught_against_the_manifest(sealed_log):
    root, segments = sealed_log
    _rewrite(segments[2], lambda t: t.slice(0, 9))  # the newest sealed event cut off

    problem = verify_log(root).problem
    assert problem is not None
    assert problem.kind in {"segment mismatch", "missing or reordered"}
