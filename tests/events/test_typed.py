"""Sealed segments carry typed payload columns, derived from (and checked against) the JSON."""

from __future__ import annotations

import glob
import json
import os

import duckdb
import pyarrow.compute as pc
import pyarrow.parquet as pq

from events.log import EventLog
from events.schema import PendingBatchBuilder
from events.typed import check_typed, model_columns, read_index
from events.verify import verify_log
from tests.events.conftest import T0, Pinged


def _segments(root: str) -> list[tuple[str, int, int]]:
    out = []
    for path in sorted(glob.glob(os.path.join(root, "partition-*", "seg-*.parquet"))):
        first, last = os.path.basename(path)[4:-8].split("-")
        out.append((path, int(first), int(last)))
    return out


def test_the_schema_comes_from_the_event_model() -> None:
    assert model_columns("Pinged") == {"n": "BIGINT"}
    assert model_columns("VehicleEnergyRecorded") == {
        "vehicle_id": "VARCHAR",
        "at": "TIMESTAMPTZ",
        "interval_start": "TIMESTAMPTZ",
        "interval_end": "TIMESTAMPTZ",
        "charged_kwh": "DOUBLE",
        "discharged_kwh": "DOUBLE",
    }
    # lists are left to the JSON; optional numbers stay numbers
    assert "limited_by" not in model_columns("VehicleSetpointAccepted")
    assert model_columns("ChargerMeterValuesRecorded")["energy_import_kwh"] == "DOUBLE"
    assert model_columns("NoSuchEvent") == {}


def test_sealing_writes_typed_files_equal_to_the_payloads(tmp_path) -> None:
    root = str(tmp_path / "log")
    with EventLog(root, partitions=1, seal_events=10) as log:
        for i in range(25):
            log.append("vehicle-1", [Pinged(n=i * 7)], i, f"cmd-{i}", T0)
        log.flush_seals()
    segments = _segments(root)
    assert len(segments) == 2
    for path, first, last in segments:
        index = read_index(path, first, last)
        assert index is not None and set(index.files) == {"Pinged"}
        typed = pq.read_table(index.files["Pinged"].path)
        assert typed.column_names == ["position", "stream_id", "occurred_at", "p_n"]
        assert typed.column("p_n").to_pylist() == [
            (p - 1) * 7 for p in typed.column("position").to_pylist()
        ]
        assert check_typed(path, first, last) is None
    assert verify_log(root).ok


def test_a_type_without_a_model_is_listed_untyped(tmp_path) -> None:
    root = str(tmp_path / "log")
    with EventLog(root, partitions=1, seal_events=4) as log:
        b = PendingBatchBuilder()
        for i in range(4):
            b.add("thing-1", i + 1, f"c{i}/0", "Mystery", 1, T0, f"c{i}", "", '{"x": 1}')
        log.append_batch(b.build())
        log.append("vehicle-1", [Pinged(n=1)], 0, "p", T0)
        log.flush_seals()
    [(path, first, last)] = _segments(root)
    index = read_index(path, first, last)
    assert index is not None
    assert index.untyped == {"Mystery"} and set(index.files) == set()
    assert check_typed(path, first, last) is None


def test_recovery_seals_an_interrupted_write_ahead_file_with_its_typed_files(
    tmp_path, monkeypatch
) -> None:
    root = str(tmp_path / "log")
    monkeypatch.setattr(EventLog, "_seal", lambda self, part, wal: None)  # the crash
    log = EventLog(root, partitions=1, seal_events=5)
    for i in range(8):
        log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
    log.flush_seals()
    log.close()
    assert _segments(root) == []
    # a half-written typed file of the interrupted seal, never named by a manifest
    stray = os.path.join(root, "partition-00", f"typ-{1:020d}-{5:020d}-Pinged.parquet")
    with open(stray, "wb") as f:
        f.write(b"torn")
    monkeypatch.undo()
    with EventLog(root) as log:
        assert log.read_all().num_rows == 8
    [(path, first, last)] = _segments(root)
    assert (first, last) == (1, 5)
    assert check_typed(path, first, last) is None
    assert pq.read_table(stray).num_rows == 5  # written again by the seal


def test_typed_files_of_an_unlisted_segment_are_dropped_on_open(tmp_path) -> None:
    root = str(tmp_path / "log")
    EventLog(root, partitions=1).close()
    stray = os.path.join(root, "partition-00", f"typ-{1:020d}-{9:020d}.json")
    with open(stray, "w") as f:
        json.dump({"format": 1, "types": {}, "untyped": []}, f)
    EventLog(root).close()
    assert not os.path.exists(stray)


def test_verify_names_a_typed_file_that_disagrees_with_the_json(tmp_path) -> None:
    root = str(tmp_path / "log")
    with EventLog(root, partitions=1, seal_events=10) as log:
        for i in range(12):
            log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
        log.flush_seals()
    [(path, first, last)] = _segments(root)
    index = read_index(path, first, last)
    assert index is not None
    typed_path = index.files["Pinged"].path
    table = pq.read_table(typed_path)
    n = table.schema.get_field_index("p_n")
    pq.write_table(table.set_column(n, "p_n", pc.add(table.column("p_n"), 1)), typed_path)

    assert "differ from the JSON" in (check_typed(path, first, last) or "")
    report = verify_log(root)
    assert not report.ok and report.problem is not None
    assert report.problem.kind == "typed mismatch"


def test_duckdb_reads_the_typed_file_as_typed(tmp_path) -> None:
    root = str(tmp_path / "log")
    with EventLog(root, partitions=1, seal_events=3) as log:
        for i in range(3):
            log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
        log.flush_seals()
    [(path, first, last)] = _segments(root)
    index = read_index(path, first, last)
    assert index is not None
    con = duckdb.connect()
    rows = con.execute(
        "SELECT typeof(p_n), typeof(occurred_at), sum(p_n) FROM read_parquet(?) GROUP BY ALL",
        [index.files["Pinged"].path],
    ).fetchall()
    assert rows == [("BIGINT", "TIMESTAMP WITH TIME ZONE", 3)]
