"""Energy and revenue projections on the story log: every figure worked out by hand."""

from __future__ import annotations

import os
from datetime import datetime
from decimal import Decimal

import pytest

import projections.revenue
from events.market import PricePublished
from events.vehicle import (
    VehicleEnergyRecorded,
    VehiclePluggedIn,
    VehicleSetpointAccepted,
    VehicleSetpointCurtailed,
    VehicleUnplugged,
)
from projections.sql_guard import query
from projections.store import ProjectionStore
from tests.projections.test_store import (
    T0,
    LogBuilder,
    at,
    build_story,
    registered,
    story_steps,
    table_hashes,
)


@pytest.fixture
def db(tmp_path: object) -> str:
    root = os.path.join(str(tmp_path), "log")
    build_story(root)
    path = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(path) as store:
        store.apply(root)
    return path


def rows(db: str, sql: str) -> list[dict[str, object]]:
    return query(db, sql).to_pylist()


def energy(db: str, source: str) -> dict[int, tuple[Decimal, Decimal]]:
    """minute of the interval after 10:00 -> (charged, discharged)."""
    out = {}
    for r in rows(db, f"SELECT * FROM energy WHERE source = '{source}' ORDER BY interval_start"):
        start = r["interval_start"]
        assert isinstance(start, datetime)
        out[(start.hour - 10) * 60 + start.minute] = (r["charged_kwh"], r["discharged_kwh"])
    return out


def test_commanded_energy_is_power_times_overlap_until_the_next_setpoint_or_safe_state(
    db: str,
) -> None:
    # +11 kW from 10:00, replaced at 10:20 by -7 kW (valid to 11:00), safe state at 10:50.
    assert energy(db, "setpoint") == {
        0: (Decimal("2.750000"), Decimal("0")),
        15: (Decimal("0.916667"), Decimal("1.166667")),
        30: (Decimal("0"), Decimal("1.750000")),
        45: (Decimal("0"), Decimal("0.583333")),
    }


def test_vehicle_meter_records_are_split_over_the_intervals_they_span(db: str) -> None:
    assert energy(db, "vehicle_meter") == {
        0: (Decimal("2.75"), Decimal("0")),
        15: (Decimal("0.458334"), Decimal("1.458333")),  # half of 0.916667 / 2.916667, rounded
        30: (Decimal("0.458334"), Decimal("1.458333")),
        60: (Decimal("0"), Decimal("1")),
    }


def test_charger_meter_counts_register_increases_in_the_interval_they_close(db: str) -> None:
    # registers 100 -> 102.75 (10:15) -> 103.666667 import, 50 -> 53.5 export (11:00)
    assert energy(db, "charger_meter") == {
        0: (Decimal("2.75"), Decimal("0")),
        45: (Decimal("0.916667"), Decimal("3.5")),
    }
    [r] = rows(db, "SELECT DISTINCT site_id, charger_id FROM energy WHERE source = 'charger_meter'")
    assert r == {"site_id": "depot-a", "charger_id": "cp-1"}


def test_arbitrage_uses_the_latest_price_version_and_names_its_events(db: str) -> None:
    lines = rows(
        db,
        "SELECT interval_start, quantity, price, revenue_eur, energy_position, price_position, "
        "market_id FROM revenue_lines WHERE stream = 'arbitrage' ORDER BY interval_start",
    )
    assert [(r["quantity"], r["price"], r["revenue_eur"]) for r in lines] == [
        (Decimal("-2.75"), Decimal("120"), Decimal("-0.33")),  # charged: costs, revised price
        (Decimal("0.999999"), Decimal("120"), Decimal("0.12")),
        (Decimal("0.999999"), Decimal("120"), Decimal("0.12")),
        (Decimal("1"), Decimal("250"), Decimal("0.25")),  # 11:00 hour, first version
    ]
    assert {r["market_id"] for r in lines} == {"nl"}  # the real-time market does not settle
    # every euro traces to its events: positions are the story's steps (one event each)
    positions = {(r["interval_start"].hour, r["price_position"]) for r in lines}  # type: ignore[union-attr]
    steps = story_steps()
    revision = next(i for i, s in enumerate(steps) if type(s[1][0]).__name__ == "PriceRevised")
    eleven = next(
        i
        for i, s in enumerate(steps)
        if type(s[1][0]).__name__ == "PricePublished" and s[1][0].interval_start.hour == 11  # type: ignore[attr-defined]
    )
    assert positions == {(10, revision + 1), (11, eleven + 1)}


def test_grid_service_streams(db: str) -> None:
    got = {
        r["stream"]: (r["quantity"], r["revenue_eur"])
        for r in rows(db, "SELECT * FROM revenue_lines WHERE stream <> 'arbitrage'")
    }
    assert got == {
        "regulation_capacity": (Decimal("0.1"), Decimal("1.25")),  # 100 kW x 1 h x 12.5 EUR/MW/h
        "regulation_energy": (Decimal("4"), Decimal("0.8")),  # 4 kWh x 200 EUR/MWh
        "peak_shaving": (Decimal("30"), Decimal("150")),  # the month's best: 30 kW x 5 EUR/kW
    }
    daily = rows(db, "SELECT stream, revenue_eur FROM revenue_daily ORDER BY stream")
    assert [r["revenue_eur"] for r in daily] == [
        Decimal("0.16"),
        Decimal("150"),
        Decimal("1.25"),
        Decimal("0.8"),
    ]


def test_energy_without_a_price_is_shown_then_priced_when_the_price_arrives(
    tmp_path: object,
) -> None:
    root = os.path.join(str(tmp_path), "log")
    steps = [s for s in story_steps()[:4]]  # registrations only, no prices
    b = LogBuilder(root)
    for stream, events, when in steps:
        b.add(stream, *events, when=when)
    b.add(
        "vehicle-van-1",
        VehicleEnergyRecorded(
            vehicle_id="van-1",
            at=at(15),
            interval_start=at(0),
            interval_end=at(15),
            charged_kwh=0,
            discharged_kwh=4.0,
        ),
    )
    db = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(db) as store:
        store.apply(root)
        b.add(
            "market-nl",
            PricePublished(
                market_id="nl",
                interval_start=T0,
                interval_minutes=60,
                price_eur_per_mwh=80.0,
                version=1,
                received_at=T0,
            ),
        )
        before = store.con.sql("SELECT price, revenue_eur FROM revenue_lines").fetchall()
        store.apply(root)
    b.close()
    assert before == [(None, None)]
    assert rows(db, "SELECT price, revenue_eur FROM revenue_lines") == [
        {"price": Decimal("80"), "revenue_eur": Decimal("0.32")}
    ]


def test_a_curtailment_runs_at_its_power_until_the_setpoint_would_have_ended(
    tmp_path: object,
) -> None:
    root = os.path.join(str(tmp_path), "log")
    b = LogBuilder(root)
    for stream, events, when in story_steps()[:4]:
        b.add(stream, *events, when=when)
    b.add(
        "vehicle-van-1",
        VehicleSetpointAccepted(
            vehicle_id="van-1",
            at=at(0),
            controller_id="d",
            requested_power_kw=-10,
            power_kw=-10,
            valid_until=at(30),
        ),
    )
    b.add(
        "vehicle-van-1",
        VehicleSetpointCurtailed(
            vehicle_id="van-1",
            at=at(6),
            controller_id="d",
            previous_power_kw=-10,
            power_kw=-4,
            reason="soc reserve",
        ),
    )
    b.close()
    db = os.path.join(str(tmp_path), "p.duckdb")
    with ProjectionStore(db) as store:
        store.apply(root)
    # 10:00-10:06 at 10 kW = 1 kWh, 10:06-10:15 at 4 kW = 0.6 kWh, 10:15-10:30 at 4 kW = 1 kWh
    assert energy(db, "setpoint") == {
        0: (Decimal("0"), Decimal("1.6")),
        15: (Decimal("0"), Decimal("1")),
    }


@pytest.mark.parametrize("one_event_per_round", [False, True])
def test_energy_names_the_site_and_charger_the_vehicle_had_at_the_time(
    tmp_path: object, one_event_per_round: bool
) -> None:
    """Each lookup is as of the event: unplugging clears the charger, a new registration
    moves the vehicle to its new site, the next plug-in names the new charger."""
    root = os.path.join(str(tmp_path), "log")
    path = os.path.join(str(tmp_path), "p.duckdb")
    v = "van-1"

    def record(minute: int) -> VehicleEnergyRecorded:
        return VehicleEnergyRecorded(
            vehicle_id=v,
            at=at(minute + 15),
            interval_start=at(minute),
            interval_end=at(minute + 15),
            charged_kwh=1.0,
            discharged_kwh=0.0,
        )

    def setpoint(minute: int) -> VehicleSetpointAccepted:
        return VehicleSetpointAccepted(
            vehicle_id=v,
            at=at(minute),
            controller_id="d",
            requested_power_kw=4.0,
            power_kw=4.0,
            valid_until=at(minute + 15),
        )

    def plug(minute: int, charger: str) -> VehiclePluggedIn:
        return VehiclePluggedIn(
            vehicle_id=v,
            at=at(minute),
            charger_id=charger,
            charger_max_charge_kw=11.0,
            charger_max_discharge_kw=11.0,
        )

    events = [
        registered(v, "depot-a"),
        plug(0, "cp-1"),
        record(0),
        setpoint(0),
        VehicleUnplugged(vehicle_id=v, at=at(20), charger_id="cp-1"),
        record(30),
        registered(v, "depot-b"),
        record(60),
        plug(75, "cp-9"),
        record(90),
        setpoint(90),
    ]
    builder = LogBuilder(root)
    with ProjectionStore(path) as store:
        for event in events:
            builder.add(f"vehicle-{v}", event, when=T0)
            if one_event_per_round:
                store.apply(root)
        builder.close()
        store.apply(root)
    metered = rows(
        path,
        "SELECT interval_start, site_id, charger_id FROM energy_vehicle_metered ORDER BY ALL",
    )
    assert [(r["site_id"], r["charger_id"]) for r in metered] == [
        ("depot-a", "cp-1"),
        ("depot-a", None),
        ("depot-b", None),
        ("depot-b", "cp-9"),
    ]
    commanded = rows(
        path, "SELECT interval_start, site_id, charger_id FROM energy_commanded ORDER BY ALL"
    )
    assert [(r["site_id"], r["charger_id"]) for r in commanded] == [
        ("depot-a", "cp-1"),
        ("depot-b", "cp-9"),
    ]


def test_a_rebuild_ranking_every_price_slot_gives_the_same_lines(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large windows rank every slot's prices instead of only the window's slots."""
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    builder = LogBuilder(root)
    dbs = {"window": os.path.join(tmp, "w.duckdb"), "all": os.path.join(tmp, "a.duckdb")}
    stores = {name: ProjectionStore(path) for name, path in dbs.items()}
    for stream, events, when in story_steps():
        builder.add(stream, *events, when=when)
        for name, store in stores.items():  # one event per round, repricing as prices come
            monkeypatch.setattr(
                projections.revenue, "_RANK_ALL_SLOTS_FROM", 0 if name == "all" else 10**9
            )
            store.apply(root)
    builder.close()
    for store in stores.values():
        store.close()
    hashes = {name: table_hashes(path, os.path.join(tmp, name)) for name, path in dbs.items()}
    assert hashes["window"] == hashes["all"]
    assert rows(dbs["all"], "SELECT count(*) AS n FROM revenue_lines WHERE price IS NOT NULL")[0][
        "n"
    ]


def test_a_database_from_before_the_vehicle_context_gets_it_derived(tmp_path: object) -> None:
    tmp = str(tmp_path)
    root = os.path.join(tmp, "log")
    steps = story_steps()
    half = len(steps) // 2
    build_story(root, steps[:half])
    old = os.path.join(tmp, "old.duckdb")
    with ProjectionStore(old) as store:
        store.apply(root)
        store.con.execute("DROP TABLE energy_vehicle_context")  # as written before it existed
    builder = LogBuilder(root)
    builder.versions = {}
    for stream, _events, _when in steps[:half]:
        builder.versions[stream] = builder.log.version(stream)
    builder.commands = half
    for stream, events, when in steps[half:]:
        builder.add(stream, *events, when=when)
    builder.close()
    with ProjectionStore(old) as store:
        store.apply(root)
    fresh = os.path.join(tmp, "fresh.duckdb")
    with ProjectionStore(fresh) as store:
        store.apply(root)
    assert table_hashes(old, os.path.join(tmp, "a")) == table_hashes(fresh, os.path.join(tmp, "b"))
