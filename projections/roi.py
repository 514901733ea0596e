"""Return on investment of a V2G depot: cash flows, NPV, IRR, payback and a Monte Carlo.

Conventions, stated once:

* Year 0 is the investment (CAPEX, negative); years 1..H are end-of-year net cash flows
  (revenue - OPEX - battery wear). NPV discounts year t by (1 + r)**t.
* The IRR is the rate r in (-99 %, +10,000 %) at which NPV is zero. It is ``None`` when
  no such rate exists -- the flows never change sign (all costs, or all income), or
  the project never earns its investment back even at -99 % -- and also when several
  rates exist (flows that change sign more than once): a single "IRR" would then be
  arbitrary, and :attr:`RoiResult.irr_note` lists the roots. Decide on NPV in both cases.
* Payback is the time until cumulative undiscounted cash turns non-negative,
  interpolated within the year as if the year's cash arrived evenly; ``None`` if it
  never does within the horizon.
* There is no salvage or residual value at the end of the horizon (a conservative
  choice: chargers may have life left).

The Monte Carlo draws, with a seeded :class:`numpy.random.Generator` (same seed, same
numbers): a price level per season and year (lognormal, mean 1, mixed by the seasonal
weights), a fleet availability per year (normal, clipped to 0..1; revenue and wear
scale with availability / its mean), and one wear-cost multiplier per iteration
(lognormal, mean 1). With every volatility zero each iteration equals the
deterministic case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq

from projections.degradation import degradation_cost_eur
from projections.roi_config import RoiConfig

__all__ = [
    "CashFlows",
    "MonteCarloResult",
    "RoiResult",
    "cash_flows",
    "evaluate",
    "irr",
    "irr_roots",
    "monte_carlo",
    "npv",
    "payback_years",
]

Array = NDArray[np.float64]

IRR_LOWER: Final = -0.99
IRR_UPPER: Final = 100.0
_IRR_GRID_POINTS: Final = 2_000
PRICE_DRIVEN_STREAMS: Final = ("arbitrage", "regulation")


def _yearly(value: float | list[float], horizon_years: int) -> Array:
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float64)
    return np.full(horizon_years, float(value))


def _discount_factors(rate: float, horizon_years: int) -> Array:
    return (1.0 + rate) ** -np.arange(horizon_years + 1, dtype=np.float64)


def npv(cash_flows_eur: ArrayLike, rate: float) -> Array:
    """Net present value of flows for years 0..H along the last axis (any leading shape)."""
    flows = np.asarray(cash_flows_eur, dtype=np.float64)
    return flows @ _discount_factors(rate, flows.shape[-1] - 1)


def _npv_at_rates(flows: Array, rates: Array) -> Array:
    return ((1.0 + rates)[:, None] ** -np.arange(flows.size)) @ flows


def irr_roots(cash_flows_eur: ArrayLike) -> list[float]:
    """Every rate in (-99 %, +10,000 %) where NPV crosses zero, ascending.

    NPV is scanned on a grid uniform in log(1 + r) and each sign change is refined with
    Brent's method (bracketed, so it always converges). A root where NPV only touches
    zero without crossing is not reported.
    """
    flows = np.asarray(cash_flows_eur, dtype=np.float64)
    if not (flows > 0).any() or not (flows < 0).any():
        return []
    rates = np.expm1(np.linspace(np.log1p(IRR_LOWER), np.log1p(IRR_UPPER), _IRR_GRID_POINTS))
    values = _npv_at_rates(flows, rates)

    def f(r: float) -> float:
        return float(_npv_at_rates(flows, np.array([r]))[0])

    roots: list[float] = []
    for i in range(len(rates) - 1):
        a, b = values[i], values[i + 1]
        if a == 0.0:
            roots.append(float(rates[i]))
        elif a * b < 0.0:
            roots.append(float(brentq(f, rates[i], rates[i + 1], xtol=1e-12, rtol=1e-12)))
    return roots


def irr(cash_flows_eur: ArrayLike) -> float | None:
    """The internal rate of return if exactly one exists, else ``None`` (see module doc)."""
    roots = irr_roots(cash_flows_eur)
    return roots[0] if len(roots) == 1 else None


def _irr_note(flows: Array, roots: list[float]) -> str:
    if len(roots) == 1:
        return "unique IRR"
    if not roots:
        if not (flows > 0).any() or not (flows < 0).any():
            return "no IRR: the cash flows never change sign"
        return f"no IRR in ({IRR_LOWER:.0%}, {IRR_UPPER:.0%}): NPV never reaches zero"
    listed = ", ".join(f"{r:.4%}" for r in roots)
    return f"no single IRR: flows change sign more than once, NPV is zero at {listed}"


def payback_years(cash_flows_eur: ArrayLike) -> float | None:
    """Years until cumulative cash is non-negative, fractional; ``None`` if never."""
    flows = np.asarray(cash_flows_eur, dtype=np.float64)
    cumulative = np.cumsum(flows)
    if cumulative[0] >= 0.0:
        return 0.0
    reached = np.nonzero(cumulative >= 0.0)[0]
    if reached.size == 0:
        return None
    t = int(reached[0])
    # cumulative[t - 1] < 0 <= cumulative[t], so flows[t] > 0.
    return (t - 1) + float(-cumulative[t - 1] / flows[t])


@dataclass(frozen=True)
class CashFlows:
    """Deterministic yearly components; arrays for years 1..H, ``net_eur`` for 0..H."""

    years: Array
    capex_eur: float
    revenue_by_stream_eur: dict[str, Array]
    opex_eur: Array
    degradation_eur: Array
    net_eur: Array

    @property
    def revenue_eur(self) -> Array:
        return np.asarray(np.sum(list(self.revenue_by_stream_eur.values()), axis=0), np.float64)


def cash_flows(config: RoiConfig) -> CashFlows:
    """The expected yearly cash flows of the project."""
    horizon = config.finance.horizon_years
    years = np.arange(1, horizon + 1, dtype=np.float64)
    revenue = {name: _yearly(v, horizon) for name, v in config.revenue.streams().items()}
    opex = config.opex.yearly_eur * (1.0 + config.opex.escalation_rate) ** (years - 1.0)
    battery = config.battery
    wear = battery.vehicle_count * degradation_cost_eur(
        _yearly(battery.v2g_fade_per_year, horizon), battery.replacement_cost_eur, battery.eol_fade
    )
    capex = config.capex.total_eur
    net_years = np.sum(list(revenue.values()), axis=0) - opex - wear
    return CashFlows(
        years=years,
        capex_eur=capex,
        revenue_by_stream_eur=revenue,
        opex_eur=opex,
        degradation_eur=wear,
        net_eur=np.concatenate(([-capex], net_years)),
    )


@dataclass(frozen=True)
class MonteCarloResult:
    npv_eur: Array = field(repr=False)
    p10_eur: float
    p50_eur: float
    p90_eur: float
    probability_positive: float
    iterations: int
    seed: int


def monte_carlo(
    config: RoiConfig, *, iterations: int | None = None, seed: int | None = None
) -> MonteCarloResult:
    """NPV distribution over price, availability and wear uncertainty; fully vectorised.

    ``iterations`` and ``seed`` override the config's ``[monte_carlo]`` values.
    """
    mc = config.monte_carlo
    n = mc.iterations if iterations is None else iterations
    seed = mc.seed if seed is None else seed
    base = cash_flows(config)
    horizon = base.years.size
    rng = np.random.default_rng(seed)

    weights = np.asarray(config.seasonal_weights.as_tuple())
    weights = weights / weights.sum()
    sigma = mc.price_volatility
    seasonal = np.exp(sigma * rng.standard_normal((n, horizon, weights.size)) - 0.5 * sigma**2)
    price = seasonal @ weights  # (n, horizon), mean 1

    availability = mc.availability_mean + mc.availability_sd * rng.standard_normal((n, horizon))
    availability_ratio = np.clip(availability, 0.0, 1.0) / mc.availability_mean

    s = mc.degradation_sd
    wear_multiplier = np.exp(s * rng.standard_normal((n, 1)) - 0.5 * s**2)

    price_driven = sum(base.revenue_by_stream_eur[k] for k in PRICE_DRIVEN_STREAMS)
    other = base.revenue_eur - price_driven
    net = (
        (price_driven * price + other) * availability_ratio
        - base.opex_eur
        - base.degradation_eur * availability_ratio * wear_multiplier
    )
    discount = _discount_factors(config.finance.discount_rate, horizon)
    npvs = net @ discount[1:] - base.capex_eur
    p10, p50, p90 = np.percentile(npvs, [10, 50, 90])
    return MonteCarloResult(
        npv_eur=npvs,
        p10_eur=float(p10),
        p50_eur=float(p50),
        p90_eur=float(p90),
        probability_positive=float(np.mean(npvs > 0.0)),
        iterations=n,
        seed=seed,
    )


@dataclass(frozen=True)
class RoiResult:
    cash_flows: CashFlows
    npv_eur: float
    irr: float | None
    irr_note: str
    payback_years: float | None
    discounted_payback_years: float | None
    monte_carlo: MonteCarloResult | None


def evaluate(config: RoiConfig, *, with_monte_carlo: bool = True) -> RoiResult:
    """Deterministic figures and, unless disabled, the Monte Carlo distribution."""
    flows = cash_flows(config)
    rate = config.finance.discount_rate
    roots = irr_roots(flows.net_eur)
    discounted = flows.net_eur * _discount_factors(rate, flows.years.size)
    return RoiResult(
        cash_flows=flows,
        npv_eur=float(npv(flows.net_eur, rate)),
        irr=roots[0] if len(roots) == 1 else None,
        irr_note=_irr_note(flows.net_eur, roots),
        payback_years=payback_years(flows.net_eur),
        discounted_payback_years=payback_years(discounted),
        monte_carlo=monte_carlo(config) if with_monte_carlo else None,
    )
