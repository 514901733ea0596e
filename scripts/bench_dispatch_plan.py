"""Benchmark the day-ahead planner against the monolithic LP on fleets from real data.

Prices: a day of the shipped 2024 Netherlands day-ahead file (hourly, held for four
15-minute intervals). Cars: capacities 40-100 kWh, 7.4/11/22 kW chargers, 11 kW
discharge, home-style plug-in windows; 100 vehicles per transformer (10 at 1k,
100 at 10k), each limited to half its vehicles' summed charge power. Prints
progress, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import numpy as np

from actors.gateways.price_files import FilePriceFeed
from actors.planning import PlanningProblem, plan, solve_monolithic, violations

DAY = datetime(2024, 3, 12, tzinfo=UTC)  # an ordinary weekday with a morning/evening spread


def day_prices() -> np.ndarray:
    hourly = FilePriceFeed("nl-day-ahead").prices(DAY, DAY + timedelta(days=1))
    prices = np.asarray(hourly.column("price_eur_per_mwh").to_pylist())
    return np.repeat(prices, 4)


def fleet(n: int, prices: np.ndarray, seed: int = 2024, share: float = 0.5) -> PlanningProblem:
    rng = np.random.default_rng(seed)
    t = prices.size
    cap = rng.uniform(40, 100, n)
    arrive = rng.integers(0, 40, n)
    leave = np.minimum(arrive + rng.integers(16, 80, n), t)
    steps = np.arange(t)[None, :]
    charge = rng.choice([7.4, 11.0, 22.0], n)
    tr = np.arange(n) % max(1, n // 100)
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


def timed(fn, problem, repeats):
    times, result = [], None
    for k in range(repeats):
        start = time.perf_counter()
        result = fn(problem)
        times.append(time.perf_counter() - start)
        print(f"  {fn.__name__} run {k + 1}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
    return statistics.median(times), result


def main() -> None:
    prices = day_prices()
    print(f"prices {DAY:%Y-%m-%d}: {prices.min():.1f}..{prices.max():.1f} EUR/MWh", flush=True)
    p1k = fleet(1000, prices)
    plan_1k, fast = timed(plan, p1k, 3)
    print(f"plan 1k: {plan_1k:.3f} s, rounds {fast.iterations}, {fast.stats}", flush=True)
    mono_1k, ref = timed(solve_monolithic, p1k, 2)
    print(f"monolithic 1k: {mono_1k:.3f} s", flush=True)
    assert violations(p1k, fast) == [], violations(p1k, fast)
    gap = 100 * (ref.objective_eur - fast.objective_eur) / abs(ref.objective_eur)
    p10k = fleet(10_000, prices)
    plan_10k, fast10 = timed(plan, p10k, 2)
    assert violations(p10k, fast10) == []
    print(f"plan 10k: {plan_10k:.3f} s, rounds {fast10.iterations}", flush=True)
    # the same fleet under transformers sized at 15 % of connected charge power:
    # the limits bind and the coupling (column generation) is exercised
    tight = fleet(1000, prices, share=0.15)
    plan_tight, fast_t = timed(plan, tight, 1)
    mono_tight, ref_t = timed(solve_monolithic, tight, 1)
    assert violations(tight, fast_t) == []
    gap_t = 100 * (ref_t.objective_eur - fast_t.objective_eur) / abs(ref_t.objective_eur)
    print(
        f"binding 1k: plan {plan_tight:.3f} s ({fast_t.iterations} rounds), "
        f"monolithic {mono_tight:.3f} s, gap {gap_t:.4f} %",
        flush=True,
    )
    print(
        json.dumps(
            {
                "plan_s_1k": round(plan_1k, 3),
                "plan_s_10k": round(plan_10k, 3),
                "monolithic_lp_s_1k": round(mono_1k, 3),
                "speedup_vs_monolithic_1k": round(mono_1k / plan_1k, 2),
                "objective_gap_pct_1k": round(gap, 4),
                "objective_eur_1k": round(fast.objective_eur, 2),
                "monolithic_objective_eur_1k": round(ref.objective_eur, 2),
                "binding_transformers_1k": int(fast.stats["bound_transformers"]),
                "plan_s_1k_binding": round(plan_tight, 3),
                "monolithic_lp_s_1k_binding": round(mono_tight, 3),
                "objective_gap_pct_1k_binding": round(gap_t, 4),
                "rounds_1k_binding": fast_t.iterations,
            }
        )
    )


if __name__ == "__main__":
    main()
