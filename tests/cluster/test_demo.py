"""`v2g demo`: the depot week end to end at a reduced size, checked on its outputs.

One run per module (6 vans on 3 dual-outlet OCPP 2.1 stations, 1 Modbus inverter,
mosquitto, one simulated day) on the module's Ray session; the tests read what it
left behind: the log, the projections' CSV export, the charts and the summary.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from cluster.mosquitto import find_mosquitto
from events.log import EventLog

pytestmark = [pytest.mark.ray, pytest.mark.network]


@dataclass
class DemoRun:
    rc: int
    out: str
    data: Path
    output: Path
    summary: dict[str, Any]
    events: list[tuple[int, str, dict[str, Any]]]  # position, type, payload

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [p for _, t, p in self.events if t == kind]


@pytest.fixture(scope="module")
def demo(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run scripts/install-mosquitto (CI installs it)")
    import io

    from rich.console import Console

    from cluster.demo import run_demo

    data = tmp_path_factory.mktemp("demo") / "var"
    buffer = io.StringIO()
    console = Console(file=buffer, width=120)
    rc = run_demo(str(data), vehicles=6, chargers=3, inverters=1, days=1, console=console)
    output = data / "demo-output"
    with EventLog(str(data / "log")) as log:
        table = log.read_all()
    events = [
        (pos, kind, json.loads(payload))
        for pos, kind, payload in zip(
            table.column("position").to_pylist(),
            table.column("type").to_pylist(),
            table.column("payload").to_pylist(),
            strict=True,
        )
    ]
    summary = json.loads((output / "summary.json").read_text())
    return DemoRun(rc, buffer.getvalue(), data, output, summary, events)


def test_the_demo_succeeds_without_violations_and_the_log_verifies(demo: DemoRun, capsys):
    assert demo.rc == 0, demo.out[-3000:]
    assert demo.summary["violations"] == 0
    assert demo.summary["sessions"] >= 6
    assert demo.summary["energy_charged_kwh"] > 0
    assert demo.summary["log_verified"] is True
    assert "demo OK" in demo.out
    assert main(["--data-dir", str(demo.data), "log", "verify"]) == 0
    assert "log verified: unaltered" in capsys.readouterr().out


def test_violations_are_recounted_from_the_events_alone(demo: DemoRun):
    """SoC floor after a discharge and trip energy at departure, folded here independently."""
    floor = {p["vehicle_id"]: p["soc_floor"] for p in demo.of_type("VehicleRegistered")}
    capacity = {
        p["vehicle_id"]: p["battery_capacity_kwh"] for p in demo.of_type("VehicleRegistered")
    }
    discharged: dict[str, float] = {}
    soc: dict[str, float] = {}
    trip: dict[str, float] = {}
    bad = []
    for _, kind, p in demo.events:
        vid = p.get("vehicle_id")
        if kind == "VehicleEnergyRecorded":
            discharged[vid] = p["discharged_kwh"]
        elif kind == "VehicleTelemetryReported":
            soc[vid] = p["soc"]
            if discharged.pop(vid, 0.0) > 0 and p["soc"] < floor[vid] - 1e-6:
                bad.append(("floor", vid, p["measured_at"]))
        elif kind == "VehicleTripPlanned":
            trip[vid] = p["energy_needed_kwh"]
        elif kind == "VehicleUnplugged" and soc[vid] * capacity[vid] < trip.pop(vid, 0) - 1e-3:
            bad.append(("trip", vid, p["at"]))
    assert bad == []


def test_charts_and_csv_exports_exist_and_are_not_empty(demo: DemoRun):
    for chart in ("cash_flows", "npv_distribution", "revenue_by_stream", "fleet_soh"):
        png = demo.output / "charts" / f"{chart}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
    for name in ("telemetry", "energy", "revenue", "degradation"):
        with open(demo.output / "export" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, name
    assert (demo.output / "charts" / "summary.txt").read_text().count("P10 / P50 / P90") == 1


def test_the_vans_join_with_used_packs_and_their_wear_is_a_small_part_of_a_pack(demo: DemoRun):
    """The ageing model prices the run's wear of 1-4-year-old packs, not of new ones."""
    history = {
        p["vehicle_id"]: (p["battery_age_days"], p["battery_throughput_kwh"])
        for p in demo.of_type("VehicleRegistered")
    }
    with open(demo.output / "export" / "degradation.csv", newline="") as f:
        rows = {r["vehicle_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(history)
    for vid, (age_days, throughput_kwh) in history.items():
        row = rows[vid]
        assert 365 <= age_days <= 4 * 365.25 and throughput_kwh > 0, vid
        assert float(row["age_at_registration_days"]) == age_days
        assert float(row["throughput_at_registration_kwh"]) == throughput_kwh
        calendar, cycle = float(row["calendar_cost_eur"]), float(row["cycle_cost_eur"])
        assert calendar > 0 and cycle >= 0, vid
        assert float(row["degradation_cost_eur"]) == pytest.approx(calendar + cycle)
        pack_eur = float(row["capacity_kwh"]) * 150.0  # the projection's default price
        assert calendar + cycle < pack_eur / 100, vid
        assert 0 < float(row["soh"]) < 1
    s = demo.summary
    assert s["degradation_cost_model_eur"] == pytest.approx(
        s["degradation_calendar_cost_model_eur"] + s["degradation_cycle_cost_model_eur"]
    )
    assert s["degradation_cost_model_eur"] == pytest.approx(
        sum(float(r["degradation_cost_eur"]) for r in rows.values())
    )
    assert "of it cycle wear (driving and V2G)" in demo.out


def test_every_arbitrage_line_traces_to_a_published_price(demo: DemoRun):
    by_position = {pos: (kind, p) for pos, kind, p in demo.events}
    with open(demo.output / "export" / "revenue.csv", newline="") as f:
        lines = [r for r in csv.DictReader(f) if r["stream"] == "arbitrage"]
    assert lines
    for line in lines:
        kind, price = by_position[int(line["price_position"])]
        assert kind in ("PricePublished", "PriceRevised")
        assert float(price["price_eur_per_mwh"]) == pytest.approx(float(line["price"]))
        assert price["interval_start"][:13] == line["interval_start"][:13]  # the same hour
        assert by_position[int(line["energy_position"])][0] == "VehicleEnergyRecorded"
    assert demo.summary["arbitrage_lines_traced_to_price_events"] == len(lines)


def test_a_discharge_setpoint_reached_a_station_and_mqtt_telemetry_landed(demo: DemoRun):
    sent = demo.of_type("ChargerSetpointSent")
    assert any(p["power_kw"] < 0 for p in sent), [p["power_kw"] for p in sent]
    mqtt = [p for p in demo.of_type("VehicleTelemetryReported") if p["source"] == "mqtt"]
    assert len(mqtt) >= 6
    assert demo.of_type("ChargingTransactionStarted")
    assert demo.of_type("ChargerMeterValuesRecorded")
    assert demo.of_type("InverterSetpointConfirmed")
    signals = {p["frequency_hz"] for p in demo.of_type("GridSignalRecorded")}
    assert {49.85, 50.25} <= signals  # the frequency events reached the dispatcher


def test_the_vehicle_rules_story_still_refuses_what_it_must(tmp_path):
    """The scripted story (`demo_commands`): the vehicles' own safety rules, without Ray."""
    from actors.host import EntityHost
    from actors.vehicle import VEHICLE
    from cluster.demo import demo_commands

    with EventLog(str(tmp_path / "log")) as log:
        host = EntityHost(VEHICLE, log)
        results = [r for batch in demo_commands(6) for r in host.handle(batch)]
        reasons = {
            json.loads(p)["vehicle_id"]: json.loads(p)["reason"]
            for p, t in zip(
                log.read_all().column("payload").to_pylist(),
                log.read_all().column("type").to_pylist(),
                strict=True,
            )
            if t == "VehicleSetpointRejected"
        }
    assert len(results) == 37
    assert sum("VehicleSetpointRejected" in r.event_types for r in results) == 4
    assert "battery_temp_c 68.0 is at or above refuse_discharge_above_c 65.0" in reasons["van-04"]
    assert "soh 0.620 is below min_soh_for_discharge 0.700" in reasons["van-06"]
