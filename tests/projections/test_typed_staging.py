"""Sealed events are staged from the segments' typed columns, and give what the JSON gives."""

from __future__ import annotations

import glob
import os
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq

from events.typed import read_index
from projections.replay import replay
from projections.sql_guard import query
from projections.store import ProjectionStore
from tests.projections.test_store import LogBuilder, at, story_steps, table_hashes


def _sealed_story(root: str, seal_events: int = 4) -> int:
    """The story log with small segments: most events sealed (typed), a few in the tail."""
    builder = LogBuilder(root, seal_events=seal_events)
    try:
        for stream, events, when in story_steps():
            builder.add(stream, *events, when=when)
        builder.log.flush_seals()
        return len(builder.log.sealed_segment_paths())
    finally:
        builder.close()


def _drop_typed(root: str, every: int = 1) -> int:
    """Remove the typed files of every ``every``-th segment: a log sealed before them."""
    indexes = sorted(glob.glob(os.path.join(root, "partition-*", "typ-*.json")))[::every]
    for index in indexes:
        for path in glob.glob(index[: -len(".json")] + "*"):
            os.remove(path)
    return len(indexes)


def _copy(root: str, to: str) -> str:
    shutil.copytree(root, to)
    return to


def test_a_replay_from_typed_segments_equals_one_from_the_json(tmp_path: object) -> None:
    tmp = str(tmp_path)
    typed = os.path.join(tmp, "typed")
    assert _sealed_story(typed) >= 5
    plain = _copy(typed, os.path.join(tmp, "plain"))
    mixed = _copy(typed, os.path.join(tmp, "mixed"))
    assert _drop_typed(plain) >= 5
    assert _drop_typed(mixed, every=2) >= 3
    hashes = []
    for root in (typed, plain, mixed):
        db = root + ".duckdb"
        replay(root, db)
        hashes.append(table_hashes(db, root + "-export"))
    assert hashes[0] == hashes[1] == hashes[2]


def test_a_live_runner_over_sealing_segments_equals_a_replay(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    builder = LogBuilder(root, seal_events=3)
    live = os.path.join(tmp, "live.duckdb")
    with ProjectionStore(live) as store:
        for stream, events, when in story_steps():
            builder.add(stream, *events, when=when)
            builder.log.flush_seals()
            store.apply(root)  # each round sees new segments (typed) and the tail
    builder.close()
    plain = _copy(root, os.path.join(tmp, "plain"))
    _drop_typed(plain)
    db = os.path.join(tmp, "replay.duckdb")
    replay(plain, db)
    assert table_hashes(live, os.path.join(tmp, "a")) == table_hashes(db, os.path.join(tmp, "b"))


def test_until_cuts_typed_segments_too(tmp_path: object) -> None:
    tmp = str(tmp_path)
    typed = os.path.join(tmp, "typed")
    _sealed_story(typed)
    plain = _copy(typed, os.path.join(tmp, "plain"))
    _drop_typed(plain)
    hashes = []
    for root in (typed, plain):
        db = root + ".duckdb"
        replay(root, db, until=at(20))
        assert query(db, "SELECT count(*) AS n FROM telemetry").column("n").to_pylist() == [1]
        hashes.append(table_hashes(db, root + "-export"))
    assert hashes[0] == hashes[1]


def test_sealed_events_are_read_from_the_typed_files(tmp_path: object) -> None:
    """The typed file, not the JSON, is what a replay reads for a sealed segment (the
    verifier is what compares them): an edited typed file shows in the projection."""
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    _sealed_story(root, seal_events=2)
    db = os.path.join(tmp, "before.duckdb")
    replay(root, db)
    before = query(
        db, "SELECT sum(charged_kwh + discharged_kwh) AS kwh FROM energy_vehicle_metered"
    )
    edited = 0
    for seg in glob.glob(os.path.join(root, "partition-*", "seg-*.parquet")):
        first, last = (int(x) for x in os.path.basename(seg)[4:-8].split("-"))
        index = read_index(seg, first, last)
        assert index is not None
        tf = index.files.get("VehicleEnergyRecorded")
        if tf is None:
            continue
        table = pq.read_table(tf.path)
        for col in ("p_charged_kwh", "p_discharged_kwh"):
            i = table.schema.get_field_index(col)
            table = table.set_column(i, col, pc.multiply(table.column(col), 2.0))
        pq.write_table(table, tf.path)
        edited += tf.count
    assert edited
    after_db = os.path.join(tmp, "after.duckdb")
    replay(root, after_db)
    after = query(
        after_db, "SELECT sum(charged_kwh + discharged_kwh) AS kwh FROM energy_vehicle_metered"
    )
    assert after.column("kwh")[0].as_py() > before.column("kwh")[0].as_py()
