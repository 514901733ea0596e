"""`v2g demo`: the system end to end on the embedded default.

A local Ray, the log in a local folder, a few real V2G car models at a depot: they
register, plug in, report telemetry and trip plans, a dispatcher takes the control
lease and asks for power, and the vehicle decider accepts, limits or refuses each
setpoint with its reason. Then the events, the states and the hash-chain check.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
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
from cluster.client import FleetClient
from events.verify import verify_log

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


def run_demo(data_dir: str, vehicles: int = 6, fresh: bool = True) -> int:
    console = Console()
    if fresh and os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    console.print(f"[bold]v2gfleet demo[/] — local Ray, log in {data_dir}/log")
    with FleetClient.embedded(data_dir, shards={"vehicle": 2}, num_cpus=2) as fleet:
        results = []
        for batch in demo_commands(vehicles):
            results.extend(fleet.send_many(batch))
        outcome = Table(title="Commands and what the fleet decided")
        for col in ("command", "status", "events / reason"):
            outcome.add_column(col)
        for r in results:
            detail = r.reason or ", ".join(r.event_types)
            outcome.add_row(r.command_id, r.status, detail)
        console.print(outcome)

        setpoints = Table(title="Setpoints after the 18:00 discharge request")
        for col in ("vehicle", "model", "SoC", "temp °C", "SoH", "setpoint kW"):
            setpoints.add_column(col)
        reasons: list[str] = []
        for i in range(vehicles):
            van = f"van-{i + 1:02d}"
            events = fleet.events(f"vehicle-{van}")
            last = next(
                (
                    e
                    for e in reversed(events)
                    if "Setpoint" in e.type and "intruder" not in e.command_id
                ),
                None,
            )
            state = fleet.state("vehicle", van)
            payload = last.event().model_dump() if last else {}
            why = payload.get("reason") or ", ".join(payload.get("limited_by", [])) or "as asked"
            reasons.append(f"{van}: {why}")
            setpoints.add_row(
                van,
                state.spec.model if state.spec and state.spec.model else "",
                f"{state.reading.soc:.2f}" if state.reading else "",
                f"{state.reading.battery_temp_c:.0f}" if state.reading else "",
                f"{state.reading.soh:.2f}" if state.reading else "",
                f"{payload.get('power_kw', 0.0):+.1f}",
            )
        console.print(setpoints)
        for line in reasons:
            console.print(f"  {line}", highlight=False)
        watermark = fleet.watermark()
    report = verify_log(os.path.join(data_dir, "log"))
    console.print(
        f"log: {watermark} events, hash chain "
        + ("[green]verified[/]" if report.ok else f"[red]BROKEN: {report.problem}[/]")
    )
    refused = sum("VehicleSetpointRejected" in r.event_types for r in results)
    invalid = sum(r.status == "rejected" for r in results)
    console.print(
        f"{len(results)} commands: {refused} setpoints refused by the vehicles' own rules"
        f" (one from a scheduler without the lease), {invalid} invalid"
    )
    return 0 if report.ok else 1
