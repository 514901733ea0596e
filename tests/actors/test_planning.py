"""The day-ahead planner: constraints as properties, the monolithic LP as oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from actors.planning import InfeasiblePlan, PlanningProblem, plan, solve_monolithic, violations
from scripts.bench_dispatch_plan import WINTER_START, prices_from, winter_evening_fleet


def make_fleet(
    seed: int,
    n: int,
    t: int,
    j: int,
    tightness: float,
    price: np.ndarray | None = None,
    degradation: float = 0.02,
    hold: int = 1,
    price_mean: float = 80.0,
    price_sd: float = 60.0,
) -> PlanningProblem:
    """Random fleet; prices change every `hold` intervals (4: hourly prices, 15-min plan)."""
    rng = np.random.default_rng(seed)
    cap = rng.uniform(40, 100, n)
    arrive = rng.integers(0, t // 2, n)
    leave = np.minimum(arrive + rng.integers(2, t, n), t)
    steps = np.arange(t)[None, :]
    tr = rng.integers(0, j, n)
    charge = rng.choice([3.7, 7.4, 11.0, 22.0], n)
    per_transformer = np.bincount(tr, weights=charge, minlength=j)
    return PlanningProblem(
        capacity_kwh=cap,
        soc=rng.uniform(0.05, 0.95, n),
        soc_floor=rng.uniform(0.1, 0.3, n),
        max_charge_kw=charge,
        max_discharge_kw=np.minimum(charge, rng.choice([7.4, 11.0], n)),
        efficiency=rng.uniform(0.88, 0.97, n),
        available=(steps >= arrive[:, None]) & (steps < leave[:, None]),
        departure_interval=leave,
        departure_energy_kwh=rng.uniform(0.3, 1.0, n) * cap,
        transformer=tr,
        price_eur_per_mwh=price
        if price is not None
        else np.repeat(rng.normal(price_mean, price_sd, t), hold)[:t],
        transformer_import_kw=tightness * per_transformer,
        transformer_export_kw=tightness * per_transformer,
        degradation_eur_per_kwh=degradation,
    )


fleets = st.builds(
    make_fleet,
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    t=st.integers(4, 24),
    j=st.integers(1, 3),
    tightness=st.sampled_from([0.3, 0.6, 1.0, 2.0]),
    hold=st.sampled_from([1, 4]),
)
# no wear and prices far below zero: where an LP would charge and discharge at once
odd_markets = st.builds(
    make_fleet,
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    t=st.integers(4, 24),
    j=st.integers(1, 3),
    tightness=st.sampled_from([0.3, 0.6, 1.0]),
    degradation=st.just(0.0),
    hold=st.sampled_from([1, 2, 4]),
    price_mean=st.just(0.0),
    price_sd=st.just(300.0),
)
quick = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@quick
@given(problem=fleets)
def test_the_plan_respects_every_constraint(problem: PlanningProblem) -> None:
    try:
        result = plan(problem)
    except InfeasiblePlan:
        with pytest.raises(InfeasiblePlan):
            solve_monolithic(problem)
        return
    assert violations(problem, result) == []


@quick
@given(problem=fleets)
def test_the_plan_is_within_half_a_percent_of_the_monolithic_lp(problem: PlanningProblem) -> None:
    try:
        reference = solve_monolithic(problem)
    except InfeasiblePlan:
        assume(False)
    result = plan(problem)
    assert violations(problem, reference) == []
    scale = max(abs(reference.objective_eur), 1.0)
    assert result.objective_eur >= reference.objective_eur - 0.005 * scale
    assert result.objective_eur <= reference.bound_eur + 1e-6 * scale


@quick
@given(problem=fleets)
def test_a_certified_plan_brackets_the_lp_optimum(problem: PlanningProblem) -> None:
    try:
        reference = solve_monolithic(problem)
    except InfeasiblePlan:
        assume(False)
    result = plan(problem, gap_tolerance=1e-4)
    assert violations(problem, result) == []
    scale = max(abs(reference.objective_eur), 1.0)
    # no schedule beats the bound, and the plan is within the tolerance of it
    assert result.bound_eur >= reference.objective_eur - 1e-6 * scale
    assert result.bound_eur - result.objective_eur <= 1e-4 * scale + 1e-6


def test_a_thousand_vehicles_on_tight_transformers_match_the_oracle() -> None:
    problem = make_fleet(7, 300, 48, 3, tightness=0.4, hold=4)
    result, reference = plan(problem), solve_monolithic(problem)
    assert violations(problem, result) == []
    gap = (reference.objective_eur - result.objective_eur) / abs(reference.objective_eur)
    assert gap <= 0.005


@quick
@given(problem=odd_markets)
def test_without_wear_below_zero_no_battery_overfills_and_the_bound_holds(
    problem: PlanningProblem,
) -> None:
    try:
        reference = solve_monolithic(problem)
    except InfeasiblePlan:
        assume(False)
    result = plan(problem)
    assert violations(problem, result) == []
    assert violations(problem, reference) == []
    scale = max(abs(reference.bound_eur), 1.0)
    assert result.bound_eur >= reference.bound_eur - 1e-5 * scale


def test_on_the_winter_evening_of_the_bench_the_limits_bind() -> None:
    problem = winter_evening_fleet(200, prices_from(WINTER_START))
    result, reference = plan(problem), solve_monolithic(problem)
    assert violations(problem, result) == []
    assert result.stats["bound_transformers"] == 2  # each vehicle alone would overload both
    load = np.zeros((2, problem.n_intervals))
    np.add.at(load, problem.transformer, result.power_kw)
    at_limit = load >= problem.transformer_import_kw[:, None] - 1e-3
    assert at_limit.sum(axis=1).min() >= 8  # both full for two hours or more
    gap = (reference.objective_eur - result.objective_eur) / abs(reference.objective_eur)
    assert gap <= 0.005


def one_car(price: list[float], degradation: float = 0.02, soc: float = 0.5) -> PlanningProblem:
    t = len(price)
    return PlanningProblem(
        capacity_kwh=np.array([60.0]),
        soc=np.array([soc]),
        soc_floor=np.array([0.2]),
        max_charge_kw=np.array([11.0]),
        max_discharge_kw=np.array([11.0]),
        efficiency=np.array([0.95]),
        available=np.ones((1, t), dtype=bool),
        departure_interval=np.array([-1]),
        departure_energy_kwh=np.array([0.0]),
        transformer=np.array([0]),
        price_eur_per_mwh=np.array(price),
        transformer_import_kw=np.array([100.0]),
        transformer_export_kw=np.array([100.0]),
        degradation_eur_per_kwh=degradation,
    )


def test_negative_prices_lead_to_charging_and_earn_money() -> None:
    problem = one_car([-80.0] * 8)
    result = plan(problem)
    assert np.all(result.power_kw >= 0) and result.power_kw.sum() > 0
    assert result.objective_eur > 0
    assert result.energy_kwh[0, -1] > result.energy_kwh[0, 0]


def test_no_cycling_when_the_spread_does_not_cover_losses_and_wear() -> None:
    # 95 % one way, 0.02 EUR/kWh each way: 60 -> 70 EUR/MWh does not pay
    problem = one_car([60.0] * 4 + [70.0] * 4, soc=0.2)
    assert np.all(plan(problem).power_kw == 0)
    # 20 -> 200 EUR/MWh does
    assert plan(one_car([20.0] * 4 + [200.0] * 4, soc=0.2)).objective_eur > 0


def test_extreme_negative_prices_do_not_burn_energy_by_cycling() -> None:
    result = plan(one_car([-500.0] * 8, soc=0.95))
    assert np.all(result.power_kw >= 0)
    assert result.energy_kwh.max() <= 60.0 + 1e-9


def test_departure_needs_more_than_reachable_are_capped_not_infeasible() -> None:
    problem = one_car([50.0] * 4, soc=0.2)
    problem = PlanningProblem(
        **{
            **problem.__dict__,
            "departure_interval": np.array([4]),
            "departure_energy_kwh": np.array([60.0]),
        }
    )
    result = plan(problem)
    assert violations(problem, result) == []
    assert np.allclose(result.power_kw, 11.0)


def test_bad_shapes_are_rejected() -> None:
    problem = one_car([1.0, 2.0])
    with pytest.raises(ValueError, match="price_eur_per_mwh"):
        PlanningProblem(**{**problem.__dict__, "price_eur_per_mwh": np.zeros(3)})
