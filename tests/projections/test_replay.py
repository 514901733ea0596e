"""The audit replay: from position 0, the same bytes every time; `until` cuts by time."""

from __future__ import annotations

import os
import shutil

from projections.replay import replay, verify
from projections.sql_guard import query
from projections.store import ProjectionStore
from tests.projections.test_store import at, build_story, table_hashes


def test_two_replays_of_the_same_log_export_byte_identical_tables(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    build_story(root)
    hashes = []
    for name in ("one", "two"):
        db = os.path.join(tmp, f"{name}.duckdb")
        positions = replay(root, db)
        assert min(positions.values()) > 0
        for fmt in ("csv", "parquet"):
            hashes.append((fmt, table_hashes(db, os.path.join(tmp, name, fmt), fmt)))
    assert hashes[0] == hashes[2] and hashes[1] == hashes[3]
    assert set(hashes[0][1]) == {"telemetry", "energy", "revenue", "degradation"}


def test_replay_replaces_the_database_and_equals_the_live_runner(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    build_story(root)
    live = os.path.join(tmp, "live.duckdb")
    with ProjectionStore(live) as store:
        store.apply(root)
    db = os.path.join(tmp, "p.duckdb")
    shutil.copy(live, db)
    replay(root, db)
    assert table_hashes(live, os.path.join(tmp, "a")) == table_hashes(db, os.path.join(tmp, "b"))
    assert not [n for n in os.listdir(tmp) if n.startswith(".replay-")]


def test_until_keeps_only_events_that_occurred_by_then(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    build_story(root)
    db = os.path.join(tmp, "p.duckdb")
    replay(root, db, until=at(20))  # before the -7 kW setpoint's successors and the revision
    prices = query(db, "SELECT DISTINCT price FROM revenue_lines WHERE stream = 'arbitrage'")
    assert [float(p) for p in prices.column("price").to_pylist()] == [100.0]  # not yet revised
    assert query(db, "SELECT count(*) AS n FROM telemetry").column("n").to_pylist() == [1]


def test_verify_passes_on_a_faithful_database_and_names_an_edited_table(tmp_path: object) -> None:
    import duckdb

    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    build_story(root)
    db = os.path.join(tmp, "p.duckdb")
    with ProjectionStore(db) as store:
        store.apply(root)
    report = verify(root, db)
    assert report.ok and not report.differing_tables
    with duckdb.connect(db) as con:
        con.execute(
            "UPDATE revenue_lines SET revenue_eur = revenue_eur + 1 WHERE stream = 'arbitrage'"
        )
    report = verify(root, db)
    assert not report.ok and report.differing_tables == ["revenue"]


def test_a_replay_with_progress_runs_in_windows_and_gives_the_same_tables(
    tmp_path: object,
) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    build_story(root)
    whole = os.path.join(tmp, "whole.duckdb")
    positions = replay(root, whole)
    seen: list[tuple[int, int]] = []
    windowed = os.path.join(tmp, "windowed.duckdb")
    # windows of 3 positions: the story's events are applied in several rounds
    assert replay(root, windowed, on_progress=lambda *p: seen.append(p), window_events=3) == (
        positions
    )
    total = seen[-1][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert len(seen) > 3 and [d for d, _ in seen] == sorted({d for d, _ in seen})
    assert table_hashes(whole, os.path.join(tmp, "a")) == table_hashes(
        windowed, os.path.join(tmp, "b")
    )
