"""The degradation projection prices wear in the fleet from each battery's history.

The story: a 60 kWh van, lossless conversion (battery kWh = metered kWh), joins the
fleet two years old with 15,000 kWh through its battery, and runs one week: readings
at 20 degC with SoC 0.4 and 0.7 on the first day and 0.55 a week later (mean SoC 0.55,
depth of discharge 0.3), 60 kWh charged and 60 kWh discharged in between.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pytest

import events.typed
from events.base import Event
from events.log import EventLog
from events.schema import PendingBatchBuilder
from events.typed import read_index
from events.vehicle import VehicleEnergyRecorded, VehicleRegistered, VehicleTelemetryReported
from projections.degradation import SCHMALSTIEG_2014, FleetUsage, assess_fleet
from projections.replay import replay

T0 = datetime(2024, 11, 4, 10, 0, tzinfo=UTC)
CAPACITY_KWH = 60.0
PACK_EUR = CAPACITY_KWH * 150.0  # the projection's default 150 EUR/kWh
HISTORY_DAYS, HISTORY_KWH = 730.0, 15_000.0
WEEK_KWH = 120.0


def _spec(vehicle_id: str) -> dict[str, Any]:
    return {
        "vehicle_id": vehicle_id,
        "at": T0.isoformat(),
        "model": None,
        "site_id": "depot-a",
        "battery_capacity_kwh": CAPACITY_KWH,
        "max_charge_kw": 11.0,
        "max_discharge_kw": 11.0,
        "soc_floor": 0.2,
        "derate_above_c": 45.0,
        "refuse_discharge_above_c": 65.0,
        "min_soh_for_discharge": 0.7,
        "discharge_throughput_budget_kwh": None,
        "charge_efficiency": 1.0,
        "discharge_efficiency": 1.0,
    }


def _week(vehicle_id: str) -> list[Event]:
    def reading(at: datetime, soc: float) -> VehicleTelemetryReported:
        return VehicleTelemetryReported(
            vehicle_id=vehicle_id,
            at=at,
            measured_at=at,
            soc=soc,
            battery_temp_c=20.0,
            soh=0.95,
            source="simulator",
        )

    def metered(hour: int, charged: float, discharged: float) -> VehicleEnergyRecorded:
        start = T0 + timedelta(days=3, hours=hour)
        return VehicleEnergyRecorded(
            vehicle_id=vehicle_id,
            at=start + timedelta(hours=1),
            interval_start=start,
            interval_end=start + timedelta(hours=1),
            charged_kwh=charged,
            discharged_kwh=discharged,
        )

    return [
        reading(T0, 0.4),
        reading(T0 + timedelta(hours=2), 0.7),
        metered(0, WEEK_KWH / 2, 0.0),
        metered(1, 0.0, WEEK_KWH / 2),
        reading(T0 + timedelta(days=7), 0.55),
    ]


class _Log:
    def __init__(self, root: str, seal_events: int = 100_000) -> None:
        self.log = EventLog(root, partitions=1, seal_events=seal_events)
        self.versions: dict[str, int] = {}

    def add(self, stream: str, event: Event) -> None:
        version = self.versions.get(stream, 0)
        self.log.append(stream, [event], version, f"{stream}/{version}", T0)
        self.versions[stream] = version + 1

    def add_v1_registration(self, vehicle_id: str) -> None:
        """A registration as schema version 1 wrote it: no battery history in the payload."""
        stream = f"vehicle-{vehicle_id}"
        builder = PendingBatchBuilder()
        builder.add(
            stream, 1, f"{stream}/0", "VehicleRegistered", 1, T0, f"{stream}/reg", "",
            json.dumps(_spec(vehicle_id)),
        )  # fmt: skip
        self.log.append_batch(builder.build())
        self.versions[stream] = 1

    def add_week(self, vehicle_id: str) -> None:
        for event in _week(vehicle_id):
            self.add(f"vehicle-{vehicle_id}", event)


def _rows(tmp_path: Any, build: Callable[[_Log], None], seal_events: int = 100_000) -> dict:
    root = os.path.join(str(tmp_path), "log")
    log = _Log(root, seal_events)
    try:
        build(log)
        log.log.flush_seals()
    finally:
        log.log.close()
    db = os.path.join(str(tmp_path), "p.duckdb")
    replay(root, db)
    with duckdb.connect(db, read_only=True) as con:
        cur = con.execute("SELECT * FROM degradation ORDER BY vehicle_id")
        names = [d[0] for d in cur.description]
        return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


def _registered(vehicle_id: str, **history: float) -> VehicleRegistered:
    return VehicleRegistered.model_validate({**_spec(vehicle_id), **history})


def _published_fade(days: float, battery_kwh: float) -> tuple[float, float]:
    """Schmalstieg 2014 from its equations: (calendar, cycle) fade of the story's pack.

    V = OCV at SoC 0.55 on the transcribed curve, midway between 3.697 V (0.5) and
    3.775 V (0.6); T = 293.15 K; DOD 0.3; Q = per-cell Ah = EFC x 2 x 2.05 Ah with
    EFC = kWh / (2 x 60 kWh).
    """
    v = (3.697 + 3.775) / 2
    alpha = (7.543 * v - 23.75) * 1e6 * math.exp(-6976 / 293.15)
    beta = 7.348e-3 * (v - 3.667) ** 2 + 7.6e-4 + 4.081e-3 * 0.3
    q_ah = battery_kwh / (2 * CAPACITY_KWH) * 2 * 2.05
    return alpha * days**0.75, beta * math.sqrt(q_ah)


def test_a_week_of_a_two_year_old_pack_costs_the_fade_between_the_two_points(tmp_path) -> None:
    def build(log: _Log) -> None:
        reg = _registered(
            "van-1", battery_age_days=HISTORY_DAYS, battery_throughput_kwh=HISTORY_KWH
        )
        log.add("vehicle-van-1", reg)
        log.add_week("van-1")

    row = _rows(tmp_path, build)["van-1"]

    assert (row["age_days"], row["age_at_registration_days"]) == (7.0, HISTORY_DAYS)
    assert (row["throughput_kwh"], row["throughput_at_registration_kwh"]) == (
        WEEK_KWH,
        HISTORY_KWH,
    )
    assert row["equivalent_full_cycles"] == pytest.approx(1.0)  # 120 kWh / (2 x 60 kWh)
    cal_then, cyc_then = _published_fade(HISTORY_DAYS, HISTORY_KWH)
    cal_now, cyc_now = _published_fade(HISTORY_DAYS + 7, HISTORY_KWH + WEEK_KWH)
    per_fade = PACK_EUR / 0.2  # written off linearly to 20 % fade
    assert row["calendar_cost_eur"] == pytest.approx(per_fade * (cal_now - cal_then), rel=1e-9)
    assert row["cycle_cost_eur"] == pytest.approx(per_fade * (cyc_now - cyc_then), rel=1e-9)
    assert row["degradation_cost_eur"] == pytest.approx(
        row["calendar_cost_eur"] + row["cycle_cost_eur"], rel=1e-12
    )
    assert row["soh"] == pytest.approx(1 - cal_now - cyc_now, rel=1e-9)
    assert (row["calendar_fade"], row["cycle_fade"]) == pytest.approx((cal_now, cyc_now))
    # the figures an operator sees: a few euros a week, not a new pack's first week
    assert row["degradation_cost_eur"] < PACK_EUR / 100
    new_pack = assess_fleet(
        FleetUsage.of(
            capacity_kwh=CAPACITY_KWH,
            throughput_kwh=WEEK_KWH,
            dod=0.3,
            c_rate=1.0,
            temperature_c=20.0,
            elapsed_days=7.0,
            mean_soc=0.55,
            replacement_cost_eur=PACK_EUR,
            warranty_throughput_kwh=1.0,
            warranty_years=1.0,
        ),
        SCHMALSTIEG_2014,
    )
    assert row["degradation_cost_eur"] < float(new_pack.degradation_cost_eur) / 5


def test_registrations_sealed_before_the_history_existed_read_as_new_packs(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A v1 registration in a segment whose typed file predates the new columns (as the
    log sealed it then), next to a v2 registration in the unsealed tail."""
    current = events.typed.model_columns

    def as_sealed_then(type_name: str) -> dict[str, str]:
        columns = dict(current(type_name))
        if type_name == "VehicleRegistered":
            del columns["battery_age_days"], columns["battery_throughput_kwh"]
        return columns

    def build(log: _Log) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(events.typed, "model_columns", as_sealed_then)
            log.add_v1_registration("van-old")
            log.add_week("van-old")  # 6 events: the segment seals
            log.log.flush_seals()
        [index_file] = [
            f for f in os.listdir(os.path.join(log.log.root, "partition-00"))
            if f.startswith("typ-") and f.endswith(".json")
        ]  # fmt: skip
        first, last = (int(x) for x in index_file[4:-5].split("-"))
        seg = os.path.join(log.log.root, "partition-00", f"seg-{first:020d}-{last:020d}.parquet")
        index = read_index(seg, first, last)
        assert index is not None and "VehicleRegistered" in index.files
        assert "battery_age_days" not in index.files["VehicleRegistered"].columns
        log.add("vehicle-van-new", _registered("van-new", battery_age_days=HISTORY_DAYS))
        log.add_week("van-new")

    rows = _rows(tmp_path, build, seal_events=6)

    old, new = rows["van-old"], rows["van-new"]
    assert (old["age_at_registration_days"], old["throughput_at_registration_kwh"]) == (0, 0)
    assert (new["age_at_registration_days"], new["throughput_at_registration_kwh"]) == (730, 0)
    cal, cyc = _published_fade(7.0, WEEK_KWH)  # a new pack: the fade since new is the cost
    assert old["degradation_cost_eur"] == pytest.approx(PACK_EUR / 0.2 * (cal + cyc), rel=1e-9)
    cal_then, _ = _published_fade(HISTORY_DAYS, 0.0)
    cal_now, _ = _published_fade(HISTORY_DAYS + 7, 0.0)
    assert new["calendar_cost_eur"] == pytest.approx(PACK_EUR / 0.2 * (cal_now - cal_then))
    assert new["cycle_cost_eur"] == pytest.approx(old["cycle_cost_eur"], rel=1e-12)


def test_a_database_from_before_the_history_gets_the_columns_and_goes_on(tmp_path) -> None:
    """A live store on a file whose degradation tables have the old shape."""
    from projections.store import ProjectionStore

    root = os.path.join(str(tmp_path), "log")
    db = os.path.join(str(tmp_path), "p.duckdb")
    log = _Log(root)
    try:
        log.add_v1_registration("van-old")
        with ProjectionStore(db) as store:
            store.apply(root)
        with duckdb.connect(db) as con:  # back to the tables as they were
            for column in ("age_at_registration_days", "throughput_at_registration_kwh"):
                con.execute(f"ALTER TABLE degradation_vehicles DROP COLUMN {column}")
                con.execute(f"ALTER TABLE degradation DROP COLUMN {column}")
            for column in ("calendar_cost_eur", "cycle_cost_eur"):
                con.execute(f"ALTER TABLE degradation DROP COLUMN {column}")
        log.add_week("van-old")
        log.add("vehicle-van-new", _registered("van-new", battery_age_days=HISTORY_DAYS))
        log.add_week("van-new")
        with ProjectionStore(db) as store:
            store.apply(root)
    finally:
        log.log.close()
    with duckdb.connect(db, read_only=True) as con:
        rows = dict(
            con.execute(
                "SELECT vehicle_id, (age_at_registration_days, calendar_cost_eur) FROM degradation"
            ).fetchall()
        )
    cal_then, _ = _published_fade(HISTORY_DAYS, 0.0)
    cal_now, _ = _published_fade(HISTORY_DAYS + 7, 0.0)
    cal_new, _ = _published_fade(7.0, 0.0)
    assert rows["van-old"] == (0.0, pytest.approx(PACK_EUR / 0.2 * cal_new))
    assert rows["van-new"] == (HISTORY_DAYS, pytest.approx(PACK_EUR / 0.2 * (cal_now - cal_then)))


def test_after_an_upgrade_a_vehicle_without_new_events_is_assessed_again(tmp_path) -> None:
    """A live round re-assesses only the vehicles it has events of, except after the
    assessment's table gained columns: then every vehicle is, or the quiet ones would
    keep the new columns' defaults."""
    from projections.store import ProjectionStore

    root = os.path.join(str(tmp_path), "log")
    db = os.path.join(str(tmp_path), "p.duckdb")
    log = _Log(root)
    try:
        log.add("vehicle-van-quiet", _registered("van-quiet"))
        log.add_week("van-quiet")
        log.add("vehicle-van-busy", _registered("van-busy"))
        with ProjectionStore(db) as store:
            store.apply(root)
        with duckdb.connect(db) as con:  # back to the assessment as it was
            for column in ("calendar_cost_eur", "cycle_cost_eur"):
                con.execute(f"ALTER TABLE degradation DROP COLUMN {column}")
        log.add_week("van-busy")
        with ProjectionStore(db) as store:
            store.apply(root)
    finally:
        log.log.close()
    with duckdb.connect(db, read_only=True) as con:
        rows = dict(con.execute("SELECT vehicle_id, calendar_cost_eur FROM degradation").fetchall())
    cal_week, _ = _published_fade(7.0, 0.0)
    assert rows == {
        "van-quiet": pytest.approx(PACK_EUR / 0.2 * cal_week),
        "van-busy": pytest.approx(PACK_EUR / 0.2 * cal_week),
    }
