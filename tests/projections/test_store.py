"""The projection runner, and the story log every projection test builds on.

The grid-service events below stand in for the dispatcher's (same names and fields);
event type names are global, so they are defined here once and imported elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest

from events.base import Event
from events.charger import ChargerMeterValuesRecorded, ChargerRegistered
from events.dispatch import (
    PeakShavingDelivered,
    RegulationCapacityReserved,
    RegulationEnergyDelivered,
)
from events.log import EventLog
from events.market import MarketRegistered, PricePublished, PriceRevised
from events.vehicle import (
    VehicleEnergyRecorded,
    VehiclePluggedIn,
    VehicleRegistered,
    VehicleSafeStateEntered,
    VehicleSetpointAccepted,
    VehicleTelemetryReported,
)
from projections.export import export
from projections.store import PositionAlreadyApplied, ProjectionStore

T0 = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


class LogBuilder:
    """Appends events to a real log, one command per call, keeping stream versions."""

    def __init__(self, root: str, partitions: int = 2, seal_events: int = 500_000) -> None:
        self.root = root
        self.log = EventLog(root, partitions=partitions, seal_events=seal_events)
        self.versions: dict[str, int] = {}
        self.commands = 0

    def add(self, stream_id: str, *events: Event, when: datetime = T0) -> int:
        version = self.versions.get(stream_id, 0)
        self.commands += 1
        appended = self.log.append(stream_id, list(events), version, f"c-{self.commands}", when)
        self.versions[stream_id] = version + len(events)
        return appended.first_position

    def close(self) -> None:
        self.log.close()


def registered(vehicle_id: str = "van-1", site_id: str = "depot-a") -> VehicleRegistered:
    return VehicleRegistered(
        vehicle_id=vehicle_id,
        at=T0 - timedelta(days=100),
        model="Test Van",
        site_id=site_id,
        battery_capacity_kwh=60.0,
        max_charge_kw=11.0,
        max_discharge_kw=11.0,
        soc_floor=0.2,
        derate_above_c=45.0,
        refuse_discharge_above_c=65.0,
        min_soh_for_discharge=0.7,
        discharge_throughput_budget_kwh=None,
        charge_efficiency=0.95,
        discharge_efficiency=0.95,
    )


def story_steps() -> list[tuple[str, list[Event], datetime]]:
    """A van at depot-a: plugged in at 10:00, charges, discharges, prices revised."""
    v, site = "van-1", "depot-a"
    steps: list[tuple[str, list[Event], datetime]] = [
        ("market-nl", [MarketRegistered(market_id="nl", kind="day_ahead", deadline_ms=None)], T0),
        ("market-rt", [MarketRegistered(market_id="rt", kind="real_time", deadline_ms=500)], T0),
        (
            "charger-cp-1",
            [
                ChargerRegistered(
                    charger_id="cp-1",
                    site_id=site,
                    max_charge_kw=11,
                    max_discharge_kw=11,
                    ocpp_version="2.1",
                    divergence_tolerance_kw=1,
                    divergence_tolerance_ratio=0.1,
                    divergence_samples=3,
                )
            ],
            T0,
        ),
        (f"vehicle-{v}", [registered(v, site)], T0),
    ]
    for hour, price in ((10, 100.0), (11, 250.0)):
        steps.append(
            (
                "market-nl",
                [
                    PricePublished(
                        market_id="nl",
                        interval_start=T0.replace(hour=hour),
                        interval_minutes=60,
                        price_eur_per_mwh=price,
                        version=1,
                        received_at=T0 - timedelta(days=1),
                    )
                ],
                T0,
            )
        )
    steps.append(
        (
            "market-rt",
            [
                PricePublished(
                    market_id="rt",
                    interval_start=T0,
                    interval_minutes=15,
                    price_eur_per_mwh=999.0,
                    version=1,
                    received_at=T0,
                )
            ],
            T0,
        )
    )
    steps += [
        (
            f"vehicle-{v}",
            [
                VehiclePluggedIn(
                    vehicle_id=v,
                    at=T0,
                    charger_id="cp-1",
                    charger_max_charge_kw=11,
                    charger_max_discharge_kw=11,
                )
            ],
            T0,
        ),
        (
            f"vehicle-{v}",
            [
                VehicleSetpointAccepted(
                    vehicle_id=v,
                    at=T0,
                    controller_id="d",
                    requested_power_kw=11,
                    power_kw=11,
                    valid_until=at(30),
                )
            ],
            T0,
        ),
        (
            "charger-cp-1",
            [
                ChargerMeterValuesRecorded(
                    evse_id=1,
                    transaction_id="t1",
                    sampled_at=at(0),
                    power_kw=11,
                    energy_import_kwh=100.0,
                    energy_export_kwh=50.0,
                    soc=0.5,
                )
            ],
            at(0),
        ),
        (
            f"vehicle-{v}",
            [
                VehicleTelemetryReported(
                    vehicle_id=v,
                    at=at(1),
                    measured_at=at(1),
                    soc=0.50,
                    battery_temp_c=25.0,
                    soh=0.97,
                    source="simulator",
                )
            ],
            at(1),
        ),
        (
            "charger-cp-1",
            [
                ChargerMeterValuesRecorded(
                    evse_id=1,
                    transaction_id="t1",
                    sampled_at=at(15),
                    power_kw=11,
                    energy_import_kwh=102.75,
                    energy_export_kwh=50.0,
                    soc=0.55,
                )
            ],
            at(15),
        ),
        (
            f"vehicle-{v}",
            [
                VehicleEnergyRecorded(
                    vehicle_id=v,
                    at=at(15),
                    interval_start=at(0),
                    interval_end=at(15),
                    charged_kwh=2.75,
                    discharged_kwh=0.0,
                )
            ],
            at(15),
        ),
        (
            f"vehicle-{v}",
            [
                VehicleSetpointAccepted(
                    vehicle_id=v,
                    at=at(20),
                    controller_id="d",
                    requested_power_kw=-7,
                    power_kw=-7,
                    valid_until=at(60),
                )
            ],
            at(20),
        ),
        (
            f"vehicle-{v}",
            [
                VehicleTelemetryReported(
                    vehicle_id=v,
                    at=at(40),
                    measured_at=at(40),
                    soc=0.46,
                    battery_temp_c=38.0,
                    soh=0.97,
                    source="simulator",
                )
            ],
            at(40),
        ),
        (
            f"vehicle-{v}",
            [VehicleSafeStateEntered(vehicle_id=v, at=at(50), reason="e-stop")],
            at(50),
        ),
        (
            "charger-cp-1",
            [
                ChargerMeterValuesRecorded(
                    evse_id=1,
                    transaction_id="t1",
                    sampled_at=at(60),
                    power_kw=0,
                    energy_import_kwh=103.666667,
                    energy_export_kwh=53.5,
                    soc=0.47,
                )
            ],
            at(60),
        ),
        # 10:15-10:45: 3.5 kWh out, spread over two intervals; the last 15 min in the 11:00 hour.
        (
            f"vehicle-{v}",
            [
                VehicleEnergyRecorded(
                    vehicle_id=v,
                    at=at(45),
                    interval_start=at(15),
                    interval_end=at(45),
                    charged_kwh=0.916667,
                    discharged_kwh=2.916667,
                )
            ],
            at(45),
        ),
        (
            f"vehicle-{v}",
            [
                VehicleEnergyRecorded(
                    vehicle_id=v,
                    at=at(75),
                    interval_start=at(60),
                    interval_end=at(75),
                    charged_kwh=0.0,
                    discharged_kwh=1.0,
                )
            ],
            at(75),
        ),
        (
            "market-nl",
            [
                PriceRevised(
                    market_id="nl",
                    interval_start=T0,
                    interval_minutes=60,
                    old_price_eur_per_mwh=100.0,
                    new_price_eur_per_mwh=120.0,
                    old_version=1,
                    version=2,
                    received_at=at(80),
                )
            ],
            at(80),
        ),
        (
            f"grid-{site}",
            [
                RegulationCapacityReserved(
                    site_id=site,
                    interval_start=T0,
                    interval_minutes=60,
                    up_kw=50,
                    down_kw=50,
                    price_eur_per_mw_per_h=12.5,
                )
            ],
            at(80),
        ),
        (
            f"grid-{site}",
            [
                RegulationEnergyDelivered(
                    site_id=site,
                    vehicle_id=v,
                    interval_start=T0,
                    energy_kwh=4.0,
                    price_eur_per_mwh=200.0,
                )
            ],
            at(80),
        ),
        (
            f"grid-{site}",
            [
                PeakShavingDelivered(
                    site_id=site,
                    interval_start=T0,
                    interval_minutes=15,
                    avoided_peak_kw=20,
                    demand_charge_eur_per_kw_month=5.0,
                )
            ],
            at(80),
        ),
        (
            f"grid-{site}",
            [
                PeakShavingDelivered(
                    site_id=site,
                    interval_start=at(60),
                    interval_minutes=15,
                    avoided_peak_kw=30,
                    demand_charge_eur_per_kw_month=5.0,
                )
            ],
            at(85),
        ),
    ]
    return steps


def build_story(root: str, steps: list[tuple[str, list[Event], datetime]] | None = None) -> int:
    builder = LogBuilder(root)
    try:
        for stream, events, when in steps if steps is not None else story_steps():
            builder.add(stream, *events, when=when)
        return builder.log.watermark
    finally:
        builder.close()


def table_hashes(db_path: str, out_dir: str, fmt: str = "csv") -> dict[str, str]:
    paths = export(db_path, fmt, out_dir)  # type: ignore[arg-type]
    hashes = {}
    for name, path in paths.items():
        with open(path, "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return hashes


@pytest.fixture
def story_log(tmp_path: object) -> str:
    root = os.path.join(str(tmp_path), "log")
    build_story(root)
    return root


def test_apply_catches_up_and_records_positions(story_log: str, tmp_path: object) -> None:
    db = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(db) as store:
        positions = store.apply(story_log)
        top = max(positions.values())
        assert set(positions) == {"energy", "revenue", "degradation"}
        assert all(p == top for p in positions.values())
        assert store.apply(story_log) == positions  # nothing new: nothing applied


def test_a_position_at_or_below_the_current_one_is_refused(
    story_log: str, tmp_path: object
) -> None:
    db = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(db) as store:
        store.apply(story_log, through=10)
        rows = store.con.execute("SELECT count(*) FROM telemetry").fetchall()
        for position in (10, 5):
            with pytest.raises(PositionAlreadyApplied, match="refusing"):
                store.apply_projection("degradation", story_log, position)
        assert store.position("degradation") == 10
        assert store.con.execute("SELECT count(*) FROM telemetry").fetchall() == rows


def test_a_failed_apply_writes_neither_rows_nor_position(story_log: str, tmp_path: object) -> None:
    db = os.path.join(str(tmp_path), "p.duckdb")

    class Boom(RuntimeError):
        pass

    with ProjectionStore(db) as store:
        energy = store.projections[0]
        original = energy.apply

        def failing(con, after, through):  # type: ignore[no-untyped-def]
            original(con, after, through)
            raise Boom("disk full")

        energy.apply = failing  # type: ignore[method-assign]
        with pytest.raises(Boom):
            store.apply(story_log)
        assert store.position("energy") == 0
        assert store.con.execute("SELECT count(*) FROM energy_vehicle_metered").fetchall() == [(0,)]


def test_incremental_catch_up_equals_a_full_rebuild(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    builder = LogBuilder(root)
    step_db = os.path.join(tmp, "steps.duckdb")
    with ProjectionStore(step_db) as store:
        for stream, events, when in story_steps():
            builder.add(stream, *events, when=when)
            store.apply(root)  # one event at a time
    builder.close()
    full_db = os.path.join(tmp, "full.duckdb")
    with ProjectionStore(full_db) as store:
        store.apply(root)
    assert table_hashes(step_db, os.path.join(tmp, "a")) == table_hashes(
        full_db, os.path.join(tmp, "b")
    )


def test_follow_applies_what_is_appended_while_it_runs(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    steps = story_steps()
    builder = LogBuilder(root)
    for stream, events, when in steps[:5]:
        builder.add(stream, *events, when=when)
    stop = threading.Event()
    seen: list[dict[str, int]] = []

    def on_applied(positions: dict[str, int]) -> None:
        seen.append(positions)
        if positions["revenue"] >= target:
            stop.set()

    target = 10**9
    with ProjectionStore(os.path.join(tmp, "p.duckdb")) as store:
        runner = threading.Thread(
            target=store.follow,
            args=(root, stop),
            kwargs={"poll_s": 0.01, "on_applied": on_applied},
        )
        runner.start()
        for stream, events, when in steps[5:]:
            builder.add(stream, *events, when=when)
        target = builder.log.watermark
        runner.join(timeout=30)
        stop.set()
        assert not runner.is_alive()
        assert store.positions()["revenue"] == target
    builder.close()
    assert seen and seen[-1]["energy"] == target


def test_follow_is_bounded_by_max_rounds(tmp_path: object) -> None:
    with ProjectionStore(os.path.join(str(tmp_path), "p.duckdb")) as store:
        store.follow(
            os.path.join(str(tmp_path), "no-log-yet"), threading.Event(), poll_s=0, max_rounds=3
        )
        assert store.positions() == {"degradation": 0, "energy": 0, "revenue": 0}


def test_the_store_writes_small_row_groups_that_a_live_checkpoint_rewrites_quickly(
    tmp_path: object,
) -> None:
    # A checkpoint rewrites each table's last, partly filled row group whole: with
    # DuckDB's 122,880-row groups, 40,000 rows would be one group; the store's are
    # 16,384 rows, so a live round rewrites at most that many.
    import duckdb

    path = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(path) as store:
        store.con.execute(
            "INSERT INTO telemetry SELECT i, 'v' || (i % 7), TIMESTAMP '2024-06-03' "
            "+ to_seconds(i), 0.5, 25.0, 0.97, 'simulator' FROM range(40000) t(i)"
        )
        store.con.execute("CHECKPOINT")
    with duckdb.connect(path, read_only=True) as con:  # a reader opens it as usual
        [(groups,)] = con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('telemetry')"
        ).fetchall()
        [(rows,)] = con.execute("SELECT count(*) FROM telemetry").fetchall()
    assert rows == 40_000
    assert groups == 3
