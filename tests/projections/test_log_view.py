"""The runner's incremental view of the log: only new write-ahead frames are decoded."""

from __future__ import annotations

import os

import duckdb

from events.sql import LogView, attach_log, read_frames
from events.vehicle import VehicleControlReleased, VehicleSetpointAccepted, VehicleUnplugged
from projections.store import ProjectionStore
from tests.projections.test_energy_revenue import energy
from tests.projections.test_store import LogBuilder, at, story_steps, table_hashes


def _positions(con: duckdb.DuckDBPyConnection, after: int = 0) -> list[int]:
    rows = con.execute(f"SELECT position FROM events WHERE position > {after} ORDER BY 1")
    return [int(p) for (p,) in rows.fetchall()]


def test_the_view_reads_new_frames_only_and_follows_sealing(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "log")
    builder = LogBuilder(root, seal_events=6)
    view = LogView(root)
    con = duckdb.connect()
    steps = story_steps()
    for k, (stream, events, when) in enumerate(steps, start=1):
        builder.add(stream, *events, when=when)
        if k % 3 == 0:
            builder.log.flush_seals()
        view.attach(con)
        assert _positions(con) == list(range(1, k + 1))  # nothing lost or doubled
        after = max(k - 2, 0)
        view.attach(con, after=after)
        assert _positions(con, after) == list(range(after + 1, k + 1))
    builder.close()
    fresh = duckdb.connect()
    attach_log(fresh, root)
    view.attach(con)
    assert _positions(fresh) == _positions(con) == list(range(1, len(steps) + 1))
    offsets = {path: tail.offset for path, tail in view._wals.items()}
    for path, offset in offsets.items():  # nothing left to read past the remembered offset
        assert read_frames(path, offset)[0] == []


def test_several_event_types_end_a_setpoint_through_one_struct(tmp_path: object) -> None:
    root = os.path.join(str(tmp_path), "log")
    b = LogBuilder(root)
    for stream, events, when in story_steps()[:4]:
        b.add(stream, *events, when=when)
    for minutes, end in (
        (15, VehicleUnplugged(vehicle_id="van-1", at=at(15), charger_id="cp-1")),
        (30, VehicleControlReleased(vehicle_id="van-1", at=at(30), controller_id="d")),
    ):
        b.add(
            "vehicle-van-1",
            VehicleSetpointAccepted(
                vehicle_id="van-1",
                at=at(minutes - 15),
                controller_id="d",
                requested_power_kw=-4,
                power_kw=-4,
                valid_until=at(minutes + 60),
            ),
        )
        b.add("vehicle-van-1", end)
    b.close()
    tmp = str(tmp_path)
    db = os.path.join(tmp, "p.duckdb")
    with ProjectionStore(db) as store:
        store.apply(root)
    # 4 kW out for 15 minutes twice: each stretch ends at the unplug / the release
    assert {m: str(v[1]) for m, v in energy(db, "setpoint").items()} == {
        0: "1.000000",
        15: "1.000000",
    }
    steps_db = os.path.join(tmp, "steps.duckdb")
    with ProjectionStore(steps_db) as store:
        for through in range(1, b.log.watermark + 1):
            store.apply(root, through=through)
    assert table_hashes(db, os.path.join(tmp, "a")) == table_hashes(
        steps_db, os.path.join(tmp, "b")
    )
