"""A simulated fleet for backtests: ElaadNL sessions, preset cars, exact battery physics.

Sessions (one a day per vehicle at most) are drawn from the ElaadNL distributions
shipped in `actors/data/elaad_*.csv` (see `actors/data/MARKET_SOURCES.md`): the
arrival time (share of sessions per 15-minute slot, weekday or weekend), the
connection time and the energy charged per session (both given as "x % of
sessions last / charge at least y"; read as an inverse distribution function).
Cars are drawn from the presets (`actors/presets.py`).

What a session asks of the dispatcher: leave with the energy it arrived with plus
the session's ElaadNL energy, capped at 90 % of the battery and at what 70 % of
the charger's power over the stay can deliver (a trip the site could not serve even
alone is not the dispatcher's failure). Between sessions the car drives the energy
the next session will bring back.

The physics is the vehicle decider's own accounting: charging stores
`power_kw x hours x charge_efficiency`, discharging takes `|power_kw| x hours /
discharge_efficiency`, metered at the charger. Randomness comes from a seeded
`numpy.random.Generator`: the same seed gives the same fleet and the same log.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

import numpy as np

from actors.presets import presets

DATA = Path(__file__).resolve().parent.parent / "actors" / "data"
STEP = timedelta(minutes=15)


@dataclass(frozen=True)
class ElaadDistributions:
    """Weights per 15-minute arrival slot, and inverse distributions of stay and energy."""

    arrival_weekday: np.ndarray  # (96,)
    arrival_weekend: np.ndarray  # (96,)
    percent: np.ndarray  # (101,) 0..100
    connection_hours: np.ndarray  # (101,) descending
    energy_kwh: np.ndarray  # (101,) descending


def _columns(name: str) -> tuple[list[str], list[list[str]]]:
    with open(DATA / name, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@cache
def elaad(charger_type: str = "private") -> ElaadDistributions:
    """The shipped ElaadNL distributions for `private`, `public` or `workplace` chargers."""
    head, rows = _columns("elaad_arrival.csv")
    weekday = np.array([float(r[head.index(charger_type)]) for r in rows])
    head_we, rows_we = _columns("elaad_arrival_weekend.csv")
    column = charger_type if charger_type in head_we else "public"
    weekend = np.array([float(r[head_we.index(column)]) for r in rows_we])
    head_c, rows_c = _columns("elaad_connection_time.csv")
    head_e, rows_e = _columns("elaad_energy_demand.csv")
    return ElaadDistributions(
        arrival_weekday=weekday / weekday.sum(),
        arrival_weekend=weekend / weekend.sum(),
        percent=np.array([float(r[0]) for r in rows_c]),
        connection_hours=np.array([float(r[head_c.index(charger_type)]) for r in rows_c]),
        energy_kwh=np.array([float(r[head_e.index(charger_type)]) for r in rows_e]),
    )


@dataclass
class Session:
    arrival: datetime
    departure: datetime
    energy_kwh: float  # what the ElaadNL session charged


@dataclass
class SimVehicle:
    vehicle_id: str
    site_id: str
    model: str
    charger_id: str
    capacity_kwh: float
    charge_kw: float
    discharge_kw: float
    charge_efficiency: float
    discharge_efficiency: float
    energy_kwh: float
    sessions: list[Session] = field(default_factory=list)
    plugged: Session | None = None

    @property
    def soc(self) -> float:
        return min(1.0, max(0.0, self.energy_kwh / self.capacity_kwh))

    def trip_energy_kwh(self, session: Session) -> float:
        stay_h = (session.departure - session.arrival).total_seconds() / 3600
        reachable = self.energy_kwh + 0.7 * self.charge_kw * self.charge_efficiency * stay_h
        wanted = self.energy_kwh + session.energy_kwh
        return round(min(wanted, 0.9 * self.capacity_kwh, reachable), 3)

    def apply(self, power_kw: float, hours: float) -> tuple[float, float]:
        """Run at `power_kw` for `hours`; returns metered (charged_kwh, discharged_kwh)."""
        if power_kw > 0:
            self.energy_kwh += power_kw * hours * self.charge_efficiency
            return power_kw * hours, 0.0
        if power_kw < 0:
            self.energy_kwh += power_kw * hours / self.discharge_efficiency
            return 0.0, -power_kw * hours
        return 0.0, 0.0


def _round_up(at: datetime) -> datetime:
    seconds = at.timestamp()
    step = STEP.total_seconds()
    return datetime.fromtimestamp(-(-seconds // step) * step, at.tzinfo)


def simulate_fleet(
    start: datetime,
    days: int,
    vehicles: int,
    sites: int,
    seed: int = 2024,
    charger_type: str = "private",
) -> list[SimVehicle]:
    """Vehicles with their sessions over `days` from `start` (UTC midnight)."""
    rng = np.random.default_rng(seed)
    dist = elaad(charger_type)
    cars = sorted(presets().values(), key=lambda c: c.name)
    fleet = []
    for i in range(vehicles):
        car = cars[int(rng.integers(len(cars)))]
        site = f"site-{i % sites}"
        v = SimVehicle(
            vehicle_id=f"{site}-ev{i // sites:03d}",
            site_id=site,
            model=car.name,
            charger_id=f"{site}-cp{i // sites:03d}",
            capacity_kwh=car.battery_capacity_kwh,
            charge_kw=car.ac_max_charge_kw,
            discharge_kw=car.ac_max_discharge_kw,
            charge_efficiency=car.charge_efficiency,
            discharge_efficiency=car.charge_efficiency,
            energy_kwh=car.battery_capacity_kwh * float(rng.uniform(0.35, 0.7)),
        )
        free_from = start
        for d in range(days + 1):
            day = start + timedelta(days=d)
            weights = dist.arrival_weekend if day.weekday() >= 5 else dist.arrival_weekday
            slot = int(rng.choice(96, p=weights))
            arrival = day + slot * STEP
            u = float(rng.uniform(0, 100))
            hours = float(np.interp(u, dist.percent, dist.connection_hours))
            energy = float(np.interp(float(rng.uniform(0, 100)), dist.percent, dist.energy_kwh))
            departure = _round_up(arrival + timedelta(hours=max(hours, 1.0)))
            if arrival < free_from or arrival >= start + timedelta(days=days):
                continue
            energy = min(max(energy, 1.0), 0.6 * v.capacity_kwh)
            v.sessions.append(Session(arrival, departure, energy))
            free_from = departure + STEP
        fleet.append(v)
    return fleet


__all__ = ["ElaadDistributions", "Session", "SimVehicle", "elaad", "simulate_fleet"]
