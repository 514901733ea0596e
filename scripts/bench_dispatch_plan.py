"""Benchmark the day-ahead planner against the monolithic LP on fleets from real data.

Headline (`plan_s_1k`, `plan_s_10k`, `speedup_vs_monolithic_1k`, `objective_gap_pct_1k`):
a winter evening where the transformer limits bind. Prices: the Netherlands day-ahead
auction for 11 December 2024, 12:00 to 12:00 local (evening peak 581 EUR/MWh, night
trough 107). Cars: home charging sessions drawn from the shipped ElaadNL open data
(private chargers: arrival time, connection time and energy charged per session;
`cluster.fleet_sim.elaad`) on the eight V2G-capable 2024 presets (`actors.presets`),
weighted by Dutch registrations. Every session must have its energy by departure
(or by the end of the horizon). 100 vehicles per low-voltage transformer, each rated at 25 % of its
vehicles' summed charge power: a 400 kVA substation serving ~150 homes keeps ~200 kW
for charging at the evening household peak, against ~1 MW of home chargers at full
EV adoption. The cheap night hours then fill every transformer for hours.

`plan` runs as the dispatcher calls it, certifying its gap (`certified_gap_bound_pct_1k`
is the certified bound on the gap); `uncertified_*`: the same without the certificate.
Extra keys (`nonbinding_*`): the previous case, an ordinary March weekday with
uniformly random plug-in windows and transformers at 50 % of connected power, where
no limit binds and the plan is the per-vehicle DP alone.

Times are medians of repeated runs (wall clock, and CPU time of this process, which
other engineers' jobs on the shared 2-core machine disturb less); the load average
is reported with them. Prints progress, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

import actors.presets
from actors.gateways.price_files import FilePriceFeed
from actors.planning import FleetPlan, PlanningProblem, plan, solve_monolithic, violations
from actors.presets import presets
from cluster.fleet_sim import elaad

WINTER_START = datetime(2024, 12, 11, 11, tzinfo=UTC)  # 12:00 Amsterdam time
SPRING_DAY = datetime(2024, 3, 12, tzinfo=UTC)
TRANSFORMER_SHARE = 0.25
VEHICLES_PER_TRANSFORMER = 100

SPECS = Path(actors.presets.__file__).parent / "data" / actors.presets.SPECS_FILE


def registrations() -> dict[str, float]:
    """Dutch registrations per V2G-capable model (the weights for drawing cars)."""
    specs = json.loads(SPECS.read_text(encoding="utf-8"))
    return {name: float(spec["number_of_registrations"]) for name, spec in specs.items()}


def prices_from(start: datetime) -> np.ndarray:
    """24 hourly day-ahead prices from `start`, each held for four 15-minute intervals."""
    hourly = FilePriceFeed("nl-day-ahead").prices(start, start + timedelta(days=1))
    return np.repeat(np.asarray(hourly.column("price_eur_per_mwh").to_pylist()), 4)


def winter_evening_fleet(
    n: int, prices: np.ndarray, seed: int = 2024, share: float = TRANSFORMER_SHARE
) -> PlanningProblem:
    """Home sessions (ElaadNL, private) arriving 12:00-24:00; the horizon starts at 12:00."""
    rng = np.random.default_rng(seed)
    t = prices.size
    dist = elaad("private")
    afternoon = dist.arrival_weekday[48:]  # local 12:00 onwards, per 15 minutes
    arrive = rng.choice(afternoon.size, n, p=afternoon / afternoon.sum())
    hours = np.interp(rng.uniform(0, 100, n), dist.percent, dist.connection_hours)
    leave = np.minimum(arrive + np.maximum(np.round(4 * hours), 4).astype(np.int64), t)
    demand_kwh = np.interp(rng.uniform(0, 100, n), dist.percent, dist.energy_kwh)
    weights = registrations()
    cars = [presets()[name] for name in weights]
    share_of_model = np.array(list(weights.values()))
    model = rng.choice(len(cars), n, p=share_of_model / share_of_model.sum())
    capacity = np.array([car.battery_capacity_kwh for car in cars])[model]
    charger_kw = rng.choice([7.4, 11.0], n, p=[0.3, 0.7])  # single- or three-phase home
    charge_kw = np.minimum(np.array([car.ac_max_charge_kw for car in cars])[model], charger_kw)
    discharge_kw = np.minimum(
        np.array([car.ac_max_discharge_kw for car in cars])[model], charger_kw
    )
    soc = rng.uniform(0.2, 0.6, n)
    steps = np.arange(t)[None, :]
    transformer = np.arange(n) // VEHICLES_PER_TRANSFORMER
    connected_kw = np.bincount(transformer, weights=charge_kw)
    return PlanningProblem(
        capacity_kwh=capacity,
        soc=soc,
        soc_floor=np.full(n, 0.2),
        max_charge_kw=charge_kw,
        max_discharge_kw=discharge_kw,
        efficiency=np.array([car.charge_efficiency for car in cars])[model],
        available=(steps >= arrive[:, None]) & (steps < leave[:, None]),
        departure_interval=leave,  # staying past the horizon: needs it by the end
        departure_energy_kwh=np.minimum(capacity, soc * capacity + demand_kwh),
        transformer=transformer,
        price_eur_per_mwh=prices,
        transformer_import_kw=share * connected_kw,
        transformer_export_kw=share * connected_kw,
        degradation_eur_per_kwh=0.02,
    )


def spring_fleet(
    n: int, prices: np.ndarray, seed: int = 2024, share: float = 0.5
) -> PlanningProblem:
    """Uniform random plug-in windows; the limits do not bind (the earlier headline)."""
    rng = np.random.default_rng(seed)
    t = prices.size
    cap = rng.uniform(40, 100, n)
    arrive = rng.integers(0, 40, n)
    leave = np.minimum(arrive + rng.integers(16, 80, n), t)
    steps = np.arange(t)[None, :]
    charge = rng.choice([7.4, 11.0, 22.0], n)
    tr = np.arange(n) % max(1, n // VEHICLES_PER_TRANSFORMER)
    per_tr = np.bincount(tr, weights=charge)
    return PlanningProblem(
        capacity_kwh=cap,
        soc=rng.uniform(0.2, 0.9, n),
        soc_floor=np.full(n, 0.2),
        max_charge_kw=charge,
        max_discharge_kw=np.minimum(charge, 11.0),
        efficiency=np.full(n, 0.95),
        available=(steps >= arrive[:, None]) & (steps < leave[:, None]),
        departure_interval=leave,
        departure_energy_kwh=rng.uniform(0.5, 0.9, n) * cap,
        transformer=tr,
        price_eur_per_mwh=prices,
        transformer_import_kw=share * per_tr,
        transformer_export_kw=share * per_tr,
        degradation_eur_per_kwh=0.02,
    )


def intervals_at_limit(problem: PlanningProblem, result: FleetPlan) -> int:
    """Transformer intervals loaded to within 1 W of their import or export limit."""
    load = np.zeros((problem.transformer_import_kw.size, problem.n_intervals))
    np.add.at(load, problem.transformer, result.power_kw)
    at_import = load >= problem.transformer_import_kw[:, None] - 1e-3
    at_export = -load >= problem.transformer_export_kw[:, None] - 1e-3
    return int((at_import | at_export).sum())


def timed(
    label: str, fn: Callable[[PlanningProblem], FleetPlan], problem: PlanningProblem, repeats: int
) -> tuple[float, float, FleetPlan]:
    """Median wall and CPU seconds over `repeats` runs, and the last result."""
    walls, cpus = [], []
    result = None
    for k in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(problem)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        print(
            f"  {label} run {k + 1}: {walls[-1]:.3f} s wall, {cpus[-1]:.3f} s cpu, "
            f"load {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
            flush=True,
        )
    assert result is not None
    return statistics.median(walls), statistics.median(cpus), result


def gap_pct(reference: FleetPlan, result: FleetPlan) -> float:
    return 100 * (reference.objective_eur - result.objective_eur) / abs(reference.objective_eur)


def main() -> None:
    load_before = os.getloadavg()[0]
    winter = prices_from(WINTER_START)
    print(f"winter prices: {winter.min():.1f}..{winter.max():.1f} EUR/MWh", flush=True)
    w1k = winter_evening_fleet(1000, winter)
    plan_1k, cpu_1k, fast = timed("plan 1k", plan, w1k, 5)
    assert violations(w1k, fast) == [], violations(w1k, fast)
    mono_1k, mono_cpu_1k, ref = timed("monolithic 1k", solve_monolithic, w1k, 3)
    at_limit_1k = intervals_at_limit(w1k, fast)
    print(
        f"winter 1k: plan {plan_1k:.3f} s, monolithic {mono_1k:.3f} s, gap "
        f"{gap_pct(ref, fast):.4f} %, {fast.stats}, {at_limit_1k} intervals at a limit",
        flush=True,
    )
    _, quick_cpu_1k, quick = timed(
        "plan 1k without certificate", lambda p: plan(p, gap_tolerance=None), w1k, 3
    )
    w10k = winter_evening_fleet(10_000, winter)
    plan_10k, cpu_10k, fast10 = timed("plan 10k", plan, w10k, 3)
    assert violations(w10k, fast10) == [], violations(w10k, fast10)
    print(f"winter 10k: plan {plan_10k:.3f} s, {fast10.stats}", flush=True)

    spring = prices_from(SPRING_DAY)
    s1k = spring_fleet(1000, spring)
    nb_1k, _, nb_fast = timed("non-binding plan 1k", plan, s1k, 3)
    nb_mono_1k, _, nb_ref = timed("non-binding monolithic 1k", solve_monolithic, s1k, 2)
    assert violations(s1k, nb_fast) == []
    s10k = spring_fleet(10_000, spring)
    nb_10k, _, nb_fast10 = timed("non-binding plan 10k", plan, s10k, 2)
    assert violations(s10k, nb_fast10) == []
    print(
        json.dumps(
            {
                "plan_s_1k": round(plan_1k, 3),
                "plan_s_10k": round(plan_10k, 3),
                "monolithic_lp_s_1k": round(mono_1k, 3),
                "speedup_vs_monolithic_1k": round(mono_1k / plan_1k, 2),
                "objective_gap_pct_1k": round(gap_pct(ref, fast), 4),
                "objective_eur_1k": round(fast.objective_eur, 2),
                "monolithic_objective_eur_1k": round(ref.objective_eur, 2),
                "plan_cpu_s_1k": round(cpu_1k, 3),
                "plan_cpu_s_10k": round(cpu_10k, 3),
                "monolithic_lp_cpu_s_1k": round(mono_cpu_1k, 3),
                "binding_transformers_1k": int(fast.stats["bound_transformers"]),
                "binding_transformers_10k": int(fast10.stats["bound_transformers"]),
                "transformer_intervals_at_limit_1k": at_limit_1k,
                "transformer_intervals_at_limit_10k": intervals_at_limit(w10k, fast10),
                "certified_gap_bound_pct_1k": round(
                    100 * (fast.bound_eur - fast.objective_eur) / abs(fast.objective_eur), 4
                ),
                "uncertified_plan_cpu_s_1k": round(quick_cpu_1k, 3),
                "uncertified_objective_gap_pct_1k": round(gap_pct(ref, quick), 4),
                "nonbinding_plan_s_1k": round(nb_1k, 3),
                "nonbinding_plan_s_10k": round(nb_10k, 3),
                "nonbinding_monolithic_lp_s_1k": round(nb_mono_1k, 3),
                "nonbinding_speedup_vs_monolithic_1k": round(nb_mono_1k / nb_1k, 2),
                "nonbinding_objective_gap_pct_1k": round(gap_pct(nb_ref, nb_fast), 4),
                "nonbinding_binding_transformers_1k": int(nb_fast.stats["bound_transformers"]),
                "load_avg_1m_before": round(load_before, 2),
                "load_avg_1m_after": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
