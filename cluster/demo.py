"""`v2g demo`: a V2G depot for one simulated week, end to end on the embedded default.

50 vans (preset car models) on 25 dual-outlet bidirectional chargers speaking OCPP 2.1
over loopback, two inverters over Modbus, telemetry through a loopback mosquitto, the
real Netherlands 2024 day-ahead prices, a few frequency events and a site peak, the
site dispatcher and the coordinator steering it (`cluster.depot` says what is
simulated and what is real). Then, from the log alone: the projections (replayed),
a terminal summary (revenue by stream, energy, degradation cost, violations counted
independently by `cluster.backtest.audit`, ROI P10/P50/P90), the PNG charts and a CSV
export in an output folder, and `v2g log verify`.

`demo_commands` is the small scripted story of the vehicle decider's rules (used by
tests as a ready-made log).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from actors.presets import presets
from actors.vehicle import (
    GrantControl,
    PlanTrip,
    PlugIn,
    RegisterVehicle,
    ReportTelemetry,
    RequestSetpoint,
)
from cluster.backtest import BacktestReport, audit
from cluster.depot import HISTORY_YEARS, DepotRun, DepotSpec, run_depot
from events.log import EventLog
from projections.degradation_view import DegradationParams

T0 = datetime(2024, 1, 15, 17, 0, tzinfo=UTC)  # a winter evening at the depot
DISPATCHER = "dispatcher-depot-a"


def demo_commands(vehicles: int) -> list[list[Any]]:
    """The story, as rounds of commands (each round one batch)."""
    models = sorted(presets())
    vans = [f"van-{i + 1:02d}" for i in range(vehicles)]

    def cid(step: str, van: str) -> str:
        return f"demo-{step}-{van}"

    register = [
        RegisterVehicle(
            command_id=cid("register", v),
            issued_at=T0,
            vehicle_id=v,
            model=models[i % len(models)],
            site_id="depot-a",
            discharge_throughput_budget_kwh=30_000,
        )
        for i, v in enumerate(vans)
    ]
    plug = [
        PlugIn(
            command_id=cid("plug", v),
            issued_at=T0 + timedelta(minutes=1),
            vehicle_id=v,
            charger_id=f"cp-{i + 1:02d}",
            charger_max_charge_kw=11.0,
            charger_max_discharge_kw=11.0,
        )
        for i, v in enumerate(vans)
    ]
    at = T0 + timedelta(minutes=2)
    telemetry = [
        ReportTelemetry(
            command_id=cid("telemetry", v),
            issued_at=at,
            vehicle_id=v,
            measured_at=at,
            soc=[0.85, 0.62, 0.35, 0.9, 0.55, 0.7][i % 6],
            battery_temp_c=[24.0, 31.0, 22.0, 68.0, 50.0, 26.0][i % 6],
            soh=[0.97, 0.95, 0.99, 0.93, 0.96, 0.62][i % 6],
        )
        for i, v in enumerate(vans)
    ]
    trips = [
        PlanTrip(
            command_id=cid("trip", v),
            issued_at=at,
            vehicle_id=v,
            departure_at=T0 + timedelta(hours=14),
            energy_needed_kwh=[20.0, 30.0, 25.0, 15.0, 10.0, 20.0][i % 6],
        )
        for i, v in enumerate(vans)
    ]
    lease = [
        GrantControl(
            command_id=cid("lease", v),
            issued_at=at,
            vehicle_id=v,
            controller_id=DISPATCHER,
            lease_until=T0 + timedelta(hours=15),
        )
        for v in vans
    ]
    peak = T0 + timedelta(hours=1)  # 18:00, the evening price peak
    discharge = [
        RequestSetpoint(
            command_id=cid("discharge", v),
            issued_at=peak,
            vehicle_id=v,
            controller_id=DISPATCHER,
            power_kw=-11.0,
            valid_until=peak + timedelta(hours=2),
        )
        for v in vans
    ]
    intruder = [
        RequestSetpoint(
            command_id=cid("intruder", vans[0]),
            issued_at=peak,
            vehicle_id=vans[0],
            controller_id="a-second-scheduler",
            power_kw=-5.0,
            valid_until=peak + timedelta(hours=1),
        )
    ]
    return [register, plug, telemetry + trips, lease, discharge, intruder]


# ------------------------------------------------------------------ the depot week

ROI_EXAMPLE = Path(__file__).resolve().parent.parent / "projections" / "roi_example.toml"
_EXAMPLE_VANS = 20  # the example ROI config is a 20-van depot


@dataclass(frozen=True)
class DemoOutcome:
    """What the demo found in the log and the projections (the summary's figures)."""

    report: BacktestReport
    revenue_by_stream: dict[str, float]
    degradation_cost_eur: float  # the ageing model's wear in the fleet, all vans
    calendar_cost_eur: float  # of which ageing with time (happens whether used or not)
    cycle_cost_eur: float  # of which wear from throughput (driving and V2G)
    pack_cost_eur: float  # the vans' packs at the projection's battery price, summed
    arbitrage_lines: int
    traced_lines: int
    device_facts: dict[str, int]
    roi: dict[str, str]
    verified: bool
    output_dir: str

    @property
    def ok(self) -> bool:
        projected = self.revenue_by_stream.get("arbitrage", 0.0)
        return (
            self.verified
            and self.report.violations == 0
            and self.traced_lines == self.arbitrage_lines
            and abs(projected - self.report.arbitrage_eur) < 0.01
        )


def _roi_config(out: Path, spec: DepotSpec) -> Path:
    """The example ROI config scaled to this depot (counts, and per-van figures linearly)."""
    with open(ROI_EXAMPLE, "rb") as f:
        config: dict[str, dict[str, Any]] = tomllib.load(f)
    scale = spec.vehicles / _EXAMPLE_VANS
    config["capex"]["charger_count"] = spec.chargers
    config["capex"]["inverter_count"] = spec.inverters
    config["battery"]["vehicle_count"] = spec.vehicles
    for stream in ("arbitrage_eur", "regulation_eur", "peak_shaving_eur"):
        config["revenue"][stream] = round(config["revenue"][stream] * scale, 2)
    lines = [
        f"# {ROI_EXAMPLE.name} scaled from {_EXAMPLE_VANS} to {spec.vehicles} vans, "
        f"{spec.chargers} chargers, {spec.inverters} inverters (per-van revenue linearly)."
    ]
    for section, values in config.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = out / "roi_depot.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _device_facts(table: pa.Table) -> dict[str, int]:
    types = table.column("type").to_pylist()
    payloads = table.column("payload").to_pylist()
    facts = {
        "SetChargingProfile accepted by stations": 0,
        "  of them discharging (setpoint < 0)": 0,
        "station transactions started": 0,
        "station meter values": 0,
        "inverter setpoints confirmed (Modbus read-back)": 0,
        "inverter measurements (Modbus polls)": 0,
        "telemetry over MQTT": 0,
        "telemetry from the simulator": 0,
        "setpoint decisions (dispatcher)": 0,
        "frequency responses": 0,
        "peak-shaving intervals": 0,
    }
    for kind, payload in zip(types, payloads, strict=True):
        if kind == "ChargerSetpointSent":
            facts["SetChargingProfile accepted by stations"] += 1
            if json.loads(payload)["power_kw"] < 0:
                facts["  of them discharging (setpoint < 0)"] += 1
        elif kind == "ChargingTransactionStarted":
            facts["station transactions started"] += 1
        elif kind == "ChargerMeterValuesRecorded":
            facts["station meter values"] += 1
        elif kind == "InverterSetpointConfirmed":
            facts["inverter setpoints confirmed (Modbus read-back)"] += 1
        elif kind == "InverterMeasured":
            facts["inverter measurements (Modbus polls)"] += 1
        elif kind == "VehicleTelemetryReported":
            source = json.loads(payload).get("source")
            key = "telemetry over MQTT" if source == "mqtt" else "telemetry from the simulator"
            facts[key] += 1
        elif kind == "SetpointsIssued":
            facts["setpoint decisions (dispatcher)"] += 1
        elif kind == "FrequencyResponseIssued":
            facts["frequency responses"] += 1
        elif kind == "PeakShavingDelivered":
            facts["peak-shaving intervals"] += 1
    return facts


def _traced(db_path: str, table: pa.Table) -> tuple[int, int]:
    """Arbitrage lines, and those whose price is a price event of the line's interval."""
    import duckdb

    prices = {}
    for position, kind, payload in zip(
        table.column("position").to_pylist(),
        table.column("type").to_pylist(),
        table.column("payload").to_pylist(),
        strict=True,
    ):
        if kind in ("PricePublished", "PriceRevised"):
            p = json.loads(payload)
            start = datetime.fromisoformat(p["interval_start"].replace("Z", "+00:00"))
            price = p.get("price_eur_per_mwh", p.get("new_price_eur_per_mwh"))
            prices[position] = (start.astimezone(UTC), float(price), int(p["interval_minutes"]))
    with duckdb.connect(db_path, read_only=True) as con:
        rows = con.execute(
            "SELECT interval_start, CAST(price AS DOUBLE), price_position FROM revenue_lines "
            "WHERE stream = 'arbitrage'"
        ).fetchall()
    traced = 0
    for interval_start, price, position in rows:
        at = interval_start.replace(tzinfo=UTC) if interval_start.tzinfo is None else interval_start
        event = prices.get(position)
        if event is not None and abs(event[1] - price) < 1e-6:
            begin, _, minutes = event
            if begin <= at.astimezone(UTC) < begin + timedelta(minutes=minutes):
                traced += 1
    return len(rows), traced


def run_demo(
    data_dir: str,
    vehicles: int = 50,
    fresh: bool = True,
    *,
    chargers: int = 25,
    inverters: int = 2,
    days: int = 7,
    output: str | None = None,
    console: Console | None = None,
) -> int:
    """The depot week end to end; 0 when the log verifies, nothing is violated and every
    arbitrage euro traces to a price event (1 otherwise)."""
    from cluster.cli import main as v2g
    from projections.export import export
    from projections.replay import replay
    from projections.report import roi_report

    console = console or Console()
    t0 = time.monotonic()
    if fresh and os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    out = Path(output or os.path.join(data_dir, "demo-output"))
    spec = DepotSpec(vehicles=vehicles, chargers=chargers, inverters=inverters, days=days)
    console.print(
        f"[bold]v2gfleet depot demo[/] — {spec.vehicles} vans, {spec.chargers} OCPP 2.1 "
        f"chargers ({spec.evses_per_charger} EVSEs each), {spec.inverters} Modbus inverters, "
        f"MQTT telemetry; {spec.days} simulated day(s) of NL day-ahead prices from "
        f"{spec.start:%a %d %b %Y}; log in {data_dir}/log"
    )
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("starting Ray, gateways, stations, broker", total=days * 96)

        def step(run: DepotRun, now: datetime) -> None:
            progress.update(task, completed=run.steps, description=f"simulated {now:%a %H:%M}")

        run = run_depot(spec, data_dir, step)
        progress.update(task, description="simulated week done")
    for line in run.grid_events:
        console.print(f"  grid: {line}", highlight=False)

    log_root = os.path.join(data_dir, "log")
    with EventLog(log_root) as log:
        table = log.read_all()
    report = audit(table, spec.start, spec.days, spec.vehicles, 1)
    db_path = os.path.join(data_dir, "projections.duckdb")
    replay(log_root, db_path)
    out.mkdir(parents=True, exist_ok=True)
    roi = roi_report(_roi_config(out, spec), db_path, out / "charts", console=console)
    exported = export(db_path, "csv", str(out / "export"))
    import duckdb

    with duckdb.connect(db_path, read_only=True) as con:
        streams = dict(
            con.execute(
                "SELECT stream, CAST(sum(revenue_eur) AS DOUBLE) FROM revenue_lines GROUP BY ALL"
            ).fetchall()
        )
        [(wear, calendar, cycle, packs)] = con.execute(
            "SELECT CAST(coalesce(sum(degradation_cost_eur), 0) AS DOUBLE), "
            "CAST(coalesce(sum(calendar_cost_eur), 0) AS DOUBLE), "
            "CAST(coalesce(sum(cycle_cost_eur), 0) AS DOUBLE), "
            f"CAST(coalesce(sum(capacity_kwh), 0) * {DegradationParams().battery_price_eur_per_kwh}"
            " AS DOUBLE) FROM degradation"
        ).fetchall()
    lines, traced = _traced(db_path, table)
    console.print("[bold]v2g log verify[/]")
    verified = v2g(["--data-dir", data_dir, "log", "verify"]) == 0
    outcome = DemoOutcome(
        report=report,
        revenue_by_stream={s: float(streams.get(s) or 0.0) for s in sorted(streams)},
        degradation_cost_eur=float(wear),
        calendar_cost_eur=float(calendar),
        cycle_cost_eur=float(cycle),
        pack_cost_eur=float(packs),
        arbitrage_lines=lines,
        traced_lines=traced,
        device_facts=_device_facts(table),
        roi={k: v for k, v in roi.summary.items() if k.startswith(("Monte", "NPV", "P(NPV"))},
        verified=verified,
        output_dir=str(out),
    )
    wall = time.monotonic() - t0
    _print_summary(console, spec, run, outcome, wall, exported, roi.charts)
    (out / "summary.json").write_text(
        json.dumps(
            {
                **report.as_dict(),
                "revenue_by_stream_eur": outcome.revenue_by_stream,
                "degradation_cost_model_eur": outcome.degradation_cost_eur,
                "degradation_calendar_cost_model_eur": outcome.calendar_cost_eur,
                "degradation_cycle_cost_model_eur": outcome.cycle_cost_eur,
                "battery_packs_cost_eur": outcome.pack_cost_eur,
                "arbitrage_lines": lines,
                "arbitrage_lines_traced_to_price_events": traced,
                "device_facts": outcome.device_facts,
                "roi": outcome.roi,
                "log_verified": verified,
                "wall_s": round(wall, 1),
            },
            indent=2,
        )
    )
    return 0 if outcome.ok else 1


def _print_summary(
    console: Console,
    spec: DepotSpec,
    run: DepotRun,
    o: DemoOutcome,
    wall: float,
    exported: dict[str, str],
    charts: dict[str, Path],
) -> None:
    r = o.report
    money = Table(title=f"The depot week, from the log ({r.events:,} events)")
    money.add_column("figure")
    money.add_column("value", justify="right")
    for stream, eur in o.revenue_by_stream.items():
        money.add_row(f"revenue: {stream}", f"{eur:,.2f} EUR")
    total = sum(o.revenue_by_stream.values())
    money.add_row("revenue: total (arbitrage includes the vans' charging)", f"{total:,.2f} EUR")
    money.add_row("energy charged", f"{r.energy_charged_kwh:,.1f} kWh")
    money.add_row("energy discharged (V2G)", f"{r.energy_discharged_kwh:,.1f} kWh")
    money.add_row(
        "degradation cost (throughput x 0.02 EUR/kWh)", f"{r.degradation_cost_eur:,.2f} EUR"
    )
    per_van = o.degradation_cost_eur / max(spec.vehicles, 1)
    money.add_row(
        f"battery ageing model: wear in the fleet (packs {HISTORY_YEARS[0]:g}-"
        f"{HISTORY_YEARS[1]:g} years old)",
        f"{o.degradation_cost_eur:,.2f} EUR ({per_van:,.2f} EUR a van)",
    )
    money.add_row("  of it calendar ageing (happens anyway)", f"{o.calendar_cost_eur:,.2f} EUR")
    money.add_row("  of it cycle wear (driving and V2G)", f"{o.cycle_cost_eur:,.2f} EUR")
    money.add_row("sessions / departures", f"{r.sessions} / {r.departures}")
    money.add_row(
        "violations (SoC floor / trip energy / transformer)",
        f"{r.violations} ({r.soc_floor_violations} / {r.trip_energy_violations} / "
        f"{r.transformer_violations})",
    )
    money.add_row(
        "arbitrage lines traced to their price event", f"{o.traced_lines} / {o.arbitrage_lines}"
    )
    for key, value in o.roi.items():
        money.add_row(f"ROI {key}", value)
    console.print(money)
    devices = Table(title="What the devices and the dispatcher said (events in the log)")
    devices.add_column("fact")
    devices.add_column("count", justify="right")
    for key, value in o.device_facts.items():
        devices.add_row(key, f"{value:,}")
    devices.add_row(
        "relay: sent to stations / to inverters",
        (f"{run.relay.get('sent_to_chargers', 0):,} / {run.relay.get('sent_to_inverters', 0):,}"),
    )
    console.print(devices)
    console.print(f"output in {o.output_dir}:", highlight=False)
    for name, path in sorted({**exported, **{k: str(v) for k, v in charts.items()}}.items()):
        console.print(f"  {name}: {path}", highlight=False)
    console.print(
        f"wall time {wall:.0f} s (start-up {run.wall_s.get('start_up', 0):.0f} s, "
        f"simulated week {run.wall_s.get('week', 0):.0f} s); "
        + ("[green]demo OK[/]" if o.ok else "[red]demo FAILED[/]")
    )
