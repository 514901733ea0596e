"""Backtest: the real dispatcher policy over historical prices, in simulated time.

`run_backtest` starts the real runtime (log actor, vehicle/market/dispatch hosts on a
local Ray), publishes the shipped day-ahead prices as a feed would (each day's prices
at 12:00 UTC the day before), drives a simulated fleet (`cluster.fleet_sim`: ElaadNL
sessions, preset cars) and runs one `SiteDispatcher` per site in the driver with
the simulated clock, 15-minute steps, no sleeping. The log it writes is an ordinary
one: projections and `v2g log verify` work on it.

The report is computed from the log alone (`audit`), not from what the dispatcher
or the simulator believe: revenue (arbitrage = metered net export x the published
price of its hour; plus any grid-service events), energy charged and discharged,
degradation cost, and the violations — a discharge ending below the SoC floor, a
departure with less than the trip's energy, a transformer above its limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from actors.dispatch import ConfigureDispatcher
from actors.gateways.price_files import FilePriceFeed
from actors.vehicle import (
    PlanTrip,
    PlugIn,
    RecordEnergy,
    RegisterVehicle,
    ReportTelemetry,
    Unplug,
)
from cluster.dispatcher import SiteDispatcher, embedded_fleet
from cluster.fleet_sim import STEP, Session, SimVehicle, simulate_fleet
from events.base import Command
from events.dispatch import TransformerLimit
from events.market import PublishPrice, RegisterMarket

__all__ = ["BacktestReport", "audit", "main", "run_backtest"]

MARKET_ID = "nl-day-ahead"
_TOL_KWH = 1e-3
_TOL_KW = 1e-6


@dataclass(frozen=True)
class BacktestReport:
    start: str
    days: int
    vehicles: int
    sites: int
    events: int
    revenue_eur: float
    arbitrage_eur: float
    grid_services_eur: float
    energy_charged_kwh: float
    energy_discharged_kwh: float
    degradation_cost_eur: float
    net_eur: float
    soc_floor_violations: int
    trip_energy_violations: int
    transformer_violations: int
    sessions: int
    departures: int

    @property
    def violations(self) -> int:
        return self.soc_floor_violations + self.trip_energy_violations + self.transformer_violations

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "violations": self.violations}


def _site_config(site: str, fleet: Sequence[SimVehicle], at: datetime) -> ConfigureDispatcher:
    mine = [v for v in fleet if v.site_id == site]
    halves = (mine[0::2], mine[1::2])
    transformers = tuple(
        TransformerLimit(
            transformer_id=f"{site}-t{k}",
            # sized at 60 % of the connected chargers: the limit binds on cheap nights
            import_kw=round(0.6 * sum(v.charge_kw for v in group), 3) or 1.0,
            export_kw=round(0.6 * sum(v.discharge_kw for v in group), 3) or 1.0,
            charger_ids=tuple(v.charger_id for v in group),
        )
        for k, group in enumerate(halves)
        if group
    )
    return ConfigureDispatcher(
        command_id=f"cfg-{site}",
        issued_at=at,
        site_id=site,
        transformers=transformers,
        lease_s=2 * STEP.total_seconds(),
    )


def _prices(start: datetime, end: datetime, at: datetime) -> list[Command]:
    table = FilePriceFeed(MARKET_ID).prices(start, end)
    return [
        PublishPrice(
            command_id=f"{MARKET_ID}:{when:%Y%m%dT%H%MZ}:v0",
            issued_at=at,
            market_id=MARKET_ID,
            interval_start=when,
            interval_minutes=60,
            price_eur_per_mwh=price,
            version=0,
        )
        for when, price in zip(
            table.column("interval_start").to_pylist(),
            table.column("price_eur_per_mwh").to_pylist(),
            strict=True,
        )
    ]


def run_backtest(
    data_dir: str,
    start: datetime = datetime(2024, 3, 11, tzinfo=UTC),
    days: int = 2,
    vehicles: int = 10,
    sites: int = 2,
    seed: int = 2024,
    name: str = "backtest",
    degradation_eur_per_kwh: float = 0.02,
    on_step: Callable[[int, int], None] | None = None,
) -> BacktestReport:
    """Backtest `days` from `start` (a UTC midnight) with a simulated fleet; see the module doc.

    `on_step(done, total)` is called after each simulated step (progress bars).
    """
    start = start.astimezone(UTC)
    end = start + timedelta(days=days)
    fleet_sim = simulate_fleet(start, days, vehicles, sites, seed)
    client = embedded_fleet(data_dir, name=name)
    try:
        send = client.send_many
        setup: list[Command] = [
            RegisterMarket(
                command_id=f"{MARKET_ID}:register",
                issued_at=start,
                market_id=MARKET_ID,
                kind="day_ahead",
            )
        ]
        setup += _prices(start, start + timedelta(days=1), start)
        setup += [
            RegisterVehicle(
                command_id=f"register:{v.vehicle_id}",
                issued_at=start,
                vehicle_id=v.vehicle_id,
                model=v.model,
                site_id=v.site_id,
            )
            for v in fleet_sim
        ]
        _check(send(setup))
        site_ids = sorted({v.site_id for v in fleet_sim})
        dispatchers = [
            SiteDispatcher(
                client.runtime,
                site,
                _site_config(site, fleet_sim, start),
                market_id=MARKET_ID,
                clock=lambda: start,
            )
            for site in site_ids
        ]
        powers: dict[str, tuple[float, datetime, datetime]] = {}
        now = start
        total_steps = int((end - start) / STEP)
        done_steps = 0
        while now < end:
            commands: list[Command] = []
            for v in fleet_sim:
                commands.extend(_advance(v, now, powers.pop(v.vehicle_id, None)))
            if now.hour == 12 and now.minute == 0:  # the day-ahead auction's results
                day = now.replace(hour=0) + timedelta(days=1)
                commands += _prices(day, day + timedelta(days=1), now)
            _check(send(commands))
            for dispatcher in dispatchers:
                dispatcher.tick(now)
            states = client.states("vehicle")
            for v in fleet_sim:
                state = states.get(f"vehicle-{v.vehicle_id}")
                if v.plugged is not None and state is not None and state.setpoint is not None:
                    sp = state.setpoint
                    powers[v.vehicle_id] = (sp.power_kw, sp.since, sp.valid_until)
            now += STEP
            done_steps += 1
            if on_step is not None:
                on_step(done_steps, total_steps)
        # the last step's energy and the departures due at the end
        commands = []
        for v in fleet_sim:
            commands.extend(_advance(v, now, powers.pop(v.vehicle_id, None), arrivals=False))
        _check(send(commands))
        table = client.runtime.log.read_all.remote(1, None, None)
        import ray

        table = ray.get(table)
        return audit(table, start, days, vehicles, sites, degradation_eur_per_kwh)
    finally:
        client.close()


def _check(results: Sequence[Any]) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"simulator command rejected: {bad[0].command_id}: {bad[0].reason}")


def _advance(
    v: SimVehicle,
    now: datetime,
    power: tuple[float, datetime, datetime] | None,
    arrivals: bool = True,
) -> list[Command]:
    """The simulator's commands at `now`: meter the last step, departures, arrivals."""
    out: list[Command] = []
    vid = v.vehicle_id
    if v.plugged is not None:
        step_start = now - STEP
        charged = discharged = 0.0
        if power is not None:
            kw, since, until = power
            hours = (min(until, now) - max(since, step_start)).total_seconds() / 3600
            if hours > 0:
                charged, discharged = v.apply(kw, hours)
        out.append(sim_energy(vid, step_start, now, charged, discharged))
        out.append(sim_telemetry(v, now, "tel"))
        if v.plugged.departure <= now:
            out.append(
                Unplug(
                    command_id=f"sim:unplug:{vid}:{now:%Y%m%dT%H%M}", issued_at=now, vehicle_id=vid
                )
            )
            v.plugged = None
            if v.sessions and v.sessions[0].arrival > now:
                # drive away: the next session brings back what this trip uses
                v.energy_kwh = max(0.1 * v.capacity_kwh, v.energy_kwh - v.sessions[0].energy_kwh)
    if arrivals and v.plugged is None and v.sessions and v.sessions[0].arrival <= now:
        session = v.sessions.pop(0)
        v.plugged = session
        out += sim_arrival(v, session, now)
    return out


def sim_arrival(v: SimVehicle, session: Session, now: datetime) -> list[Command]:
    """A simulated van arriving: it plugs in, reports its battery, plans its next trip."""
    vid = v.vehicle_id
    return [
        PlugIn(
            command_id=f"sim:plug:{vid}:{now:%Y%m%dT%H%M}",
            issued_at=now,
            vehicle_id=vid,
            charger_id=v.charger_id,
            charger_max_charge_kw=v.charge_kw,
            charger_max_discharge_kw=v.discharge_kw,
        ),
        sim_telemetry(v, now, "arrive"),
        PlanTrip(
            command_id=f"sim:trip:{vid}:{now:%Y%m%dT%H%M}",
            issued_at=now,
            vehicle_id=vid,
            departure_at=session.departure,
            energy_needed_kwh=v.trip_energy_kwh(session),
        ),
    ]


def sim_energy(
    vehicle_id: str, start: datetime, now: datetime, charged_kwh: float, discharged_kwh: float
) -> RecordEnergy:
    """The vehicle meter's reading for the step (start, now] (deterministic id per step)."""
    return RecordEnergy(
        command_id=f"sim:energy:{vehicle_id}:{now:%Y%m%dT%H%M}",
        issued_at=now,
        vehicle_id=vehicle_id,
        interval_start=start,
        interval_end=now,
        charged_kwh=round(charged_kwh, 9),
        discharged_kwh=round(discharged_kwh, 9),
    )


def sim_telemetry(v: SimVehicle, now: datetime, what: str) -> ReportTelemetry:
    """The simulated vehicle's reading as a command (deterministic id per step)."""
    return ReportTelemetry(
        command_id=f"sim:{what}:{v.vehicle_id}:{now:%Y%m%dT%H%M}",
        issued_at=now,
        vehicle_id=v.vehicle_id,
        measured_at=now,
        soc=v.soc,
        battery_temp_c=25.0,
        soh=0.95,
        source="simulator",
    )


# --------------------------------------------------------------------------- the audit


def audit(
    table: pa.Table,
    start: datetime,
    days: int,
    vehicles: int,
    sites: int,
    degradation_eur_per_kwh: float = 0.02,
) -> BacktestReport:
    """Revenue, energy and violations from the log alone (payload JSON, no dispatcher code)."""
    rows = sorted(
        zip(
            table.column("position").to_pylist(),
            table.column("stream_id").to_pylist(),
            table.column("type").to_pylist(),
            table.column("payload").to_pylist(),
            strict=True,
        )
    )
    prices: dict[datetime, float] = {}
    spec: dict[str, dict[str, Any]] = {}
    charger_of: dict[str, str] = {}
    transformer_of: dict[str, str] = {}
    limits: dict[str, tuple[float, float]] = {}
    last_soc: dict[str, float] = {}
    last_discharged: dict[str, float] = {}
    trip: dict[str, float] = {}
    load: dict[tuple[str, datetime], float] = defaultdict(float)
    charged = discharged = arbitrage = services = 0.0
    floor_v = trip_v = sessions = departures = 0
    peaks: dict[tuple[str, str], float] = {}
    for _, _stream, kind, payload_json in rows:
        p = json.loads(payload_json)
        if kind in ("PricePublished", "PriceRevised"):
            price = p.get("price_eur_per_mwh", p.get("new_price_eur_per_mwh"))
            prices[_t(p["interval_start"])] = float(price)
        elif kind == "DispatcherConfigured":
            for tr in p["transformers"]:
                limits[tr["transformer_id"]] = (tr["import_kw"], tr["export_kw"])
                for c in tr["charger_ids"]:
                    transformer_of[c] = tr["transformer_id"]
        elif kind == "VehicleRegistered":
            spec[p["vehicle_id"]] = p
        elif kind == "VehiclePluggedIn":
            charger_of[p["vehicle_id"]] = p["charger_id"]
            sessions += 1
        elif kind == "VehicleTripPlanned":
            trip[p["vehicle_id"]] = float(p["energy_needed_kwh"])
        elif kind == "VehicleTelemetryReported":
            vid = p["vehicle_id"]
            last_soc[vid] = float(p["soc"])
            if last_discharged.pop(vid, 0.0) > 0 and p["soc"] < spec[vid]["soc_floor"] - 1e-6:
                floor_v += 1
        elif kind == "VehicleEnergyRecorded":
            vid = p["vehicle_id"]
            c, d = float(p["charged_kwh"]), float(p["discharged_kwh"])
            charged += c
            discharged += d
            last_discharged[vid] = d
            begin, finish = _t(p["interval_start"]), _t(p["interval_end"])
            hours = (finish - begin).total_seconds() / 3600
            hour = begin.replace(minute=0, second=0, microsecond=0)
            arbitrage += (d - c) * prices.get(hour, 0.0) / 1000
            tr = transformer_of.get(charger_of.get(vid, ""), "")
            load[(tr, begin)] += (c - d) / hours
        elif kind == "VehicleUnplugged":
            vid = p["vehicle_id"]
            departures += 1
            needed = trip.pop(vid, 0.0)
            if last_soc.get(vid, 0.0) * spec[vid]["battery_capacity_kwh"] < needed - _TOL_KWH:
                trip_v += 1
        elif kind == "RegulationCapacityReserved":
            services += (
                (p["up_kw"] + p["down_kw"])
                * p["price_eur_per_mw_per_h"]
                * p["interval_minutes"]
                / 60000
            )
        elif kind == "RegulationEnergyDelivered":
            services += p["energy_kwh"] * p["price_eur_per_mwh"] / 1000
        elif kind == "PeakShavingDelivered":
            key = (p["site_id"], p["interval_start"][:7])
            value = p["avoided_peak_kw"] * p["demand_charge_eur_per_kw_month"]
            peaks[key] = max(peaks.get(key, 0.0), value)
    services += sum(peaks.values())
    transformer_v = 0
    for (tr, _), kw in load.items():
        imp, exp = limits.get(tr, (float("inf"), float("inf")))
        if kw > imp + _TOL_KW or -kw > exp + _TOL_KW:
            transformer_v += 1
    degradation = (charged + discharged) * degradation_eur_per_kwh
    revenue = arbitrage + services
    return BacktestReport(
        start=start.isoformat(),
        days=days,
        vehicles=vehicles,
        sites=sites,
        events=table.num_rows,
        revenue_eur=round(revenue, 4),
        arbitrage_eur=round(arbitrage, 4),
        grid_services_eur=round(services, 4),
        energy_charged_kwh=round(charged, 4),
        energy_discharged_kwh=round(discharged, 4),
        degradation_cost_eur=round(degradation, 4),
        net_eur=round(revenue - degradation, 4),
        soc_floor_violations=floor_v,
        trip_energy_violations=trip_v,
        transformer_violations=transformer_v,
        sessions=sessions,
        departures=departures,
    )


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def main(argv: Sequence[str] | None = None) -> int:
    """`v2g backtest`: a progress bar and a summary, or `--json` for scripts.

    Exit code 1 if any violation was counted, 2 for bad arguments.
    """
    parser = argparse.ArgumentParser(prog="v2g backtest", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="var/backtest")
    parser.add_argument("--start", default="2024-03-11", help="UTC date (YYYY-MM-DD), 2024")
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--vehicles", type=int, default=10)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    try:
        start = datetime.strptime(args.start, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        print(f"--start {args.start!r}: expected YYYY-MM-DD", file=sys.stderr)
        return 2
    if args.json:
        report = run_backtest(
            args.data_dir, start, args.days, args.vehicles, args.sites, seed=args.seed
        )
        print(json.dumps(report.as_dict()))
        return 1 if report.violations else 0
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task("simulated 15-minute steps", total=args.days * 96)
        report = run_backtest(
            args.data_dir,
            start,
            args.days,
            args.vehicles,
            args.sites,
            seed=args.seed,
            on_step=lambda done, total: progress.update(task, completed=done, total=total),
        )
    table = Table(title=f"Backtest from {args.start}, {args.days} day(s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in report.as_dict().items():
        table.add_row(
            key.replace("_", " "), f"{value:,.2f}" if isinstance(value, float) else str(value)
        )
    console.print(table)
    console.print(f"log in {args.data_dir}/log; `v2g replay` builds its projections")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
