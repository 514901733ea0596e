"""The day-ahead planner: which vehicle charges or discharges how much in each interval.

Pure: numpy, scipy.sparse and highspy only; no ray, no clock, no IO. The caller
passes the fleet as arrays, the day-ahead prices and the transformer limits, and
gets back a power schedule per vehicle and interval, its energy trajectory and the
objective in EUR.

The model (one LP, the same for both solvers)
---------------------------------------------
Per vehicle i and interval t (length dt hours), grid-side charge c >= 0 and
discharge d >= 0 in kW, stored energy e in kWh with one-way efficiency eta:

    e[t+1] = e[t] + dt * (eta * c[t] - d[t] / eta),   e[0] = soc * capacity
    c[t] <= max_charge_kw * available[t],  d[t] <= max_discharge_kw * available[t]
    lower[t] <= e[t] <= capacity
    -export_kw[j] <= sum over vehicles on transformer j of (c[t] - d[t]) <= import_kw[j]

`lower` is the SoC floor and, at the departure point, the energy the trip needs,
both capped to what the vehicle can physically reach by charging flat out from now
(`energy_bounds`). The objective maximises arbitrage revenue minus degradation:

    sum dt * (price/1000 * (d - c) - degradation_eur_per_kwh * (c + d))
      + terminal_value_eur_per_kwh * e[T]

Throughput is counted on the grid side. Below a (very negative) price of
-1000 * deg * (1 + eta^2) / (1 - eta^2) EUR/MWh an LP would earn money by charging
and discharging at once, burning energy in the losses; no charger does that, so
the model values discharge there as it values charge (the convex, conservative
envelope) and the plan never cycles. Reported objectives are the true revenue of
the returned schedule.

Why the decomposed method looks the way it does
-----------------------------------------------
Measured on the 2-core machine (see MEASURED.md and scripts/bench_dispatch_plan.py):
one LP for 1,000 vehicles takes seconds and per-vehicle HiGHS calls cost ~1.3 ms
each, so neither scales to 10,000 vehicles in 10 s. Two facts make it fast:

1. A single battery facing linear prices is solved *exactly* by backward dynamic
   programming over its value function V_t(e), which is convex and piecewise
   linear. One step is an infimal convolution with the two-slope cost of moving
   energy (slopes = marginal cost of charging and revenue of discharging) — i.e.
   inserting two segments into a sorted list of slopes — followed by clipping to
   the energy bounds. The optimal policy is then a two-threshold rule per interval
   (charge up to e_a, discharge down to e_b, else hold). All vehicles run in
   lock-step as (vehicles x segments) numpy arrays, so 10,000 vehicles cost about
   what 10 Python-level LP calls would.
2. The transformer limits are the only coupling and only bind in some intervals.
   Dantzig-Wolfe column generation prices them: a small master LP per round (one
   convexity row per vehicle, one row per transformer interval, columns = the
   schedules the DP proposed) gives shadow prices that the DP adds to the market
   price. The master is kept in one HiGHS instance and re-solved warm after new
   columns are added. Each round also yields a Lagrangian lower bound, so the gap
   to the LP optimum is certified, not hoped for; we stop at `gap_tolerance`
   (default 1e-4, far inside the 0.5 % contract).
   Transformers whose unconstrained optimum respects the limit are finished after
   the first DP (their optimum is the coupled optimum).

The master's answer is a convex combination of feasible schedules, so it respects
every limit (the rows carry a 1e-6 kW safety margin so floating point can never
push a transformer over). A vehicle whose combination mixes charging and
discharging in one interval has no physical equivalent; those few vehicles (at
most one per binding transformer interval) are re-optimised together in a small
exact LP against the headroom the others leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highspy
import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

__all__ = [
    "FleetPlan",
    "InfeasiblePlan",
    "PlanningProblem",
    "energy_bounds",
    "plan",
    "schedule_objective_eur",
    "solve_monolithic",
    "violations",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

_LIMIT_MARGIN_KW = 1e-6
_ENERGY_TOLERANCE_KWH = 1e-6
_SMOOTHING = 0.5


class InfeasiblePlan(ValueError):
    """No schedule meets the forced charging (floor, trip) within a transformer limit."""


@dataclass(frozen=True)
class PlanningProblem:
    """Everything the planner needs, as arrays; N vehicles, T intervals, J transformers.

    Per vehicle (shape N): capacity_kwh, soc (0..1 now), soc_floor (0..1),
    max_charge_kw and max_discharge_kw (already min(vehicle, charger), >= 0),
    efficiency (one-way, 0..1], departure_interval (the SoC point 1..T at which the
    vehicle leaves; outside 1..T means it stays beyond the horizon),
    departure_energy_kwh (energy it needs then), transformer (0..J-1).
    available: (N, T) bool, plugged in during interval t.
    price_eur_per_mwh: (T,). transformer_import_kw, transformer_export_kw: (J,).
    """

    capacity_kwh: FloatArray
    soc: FloatArray
    soc_floor: FloatArray
    max_charge_kw: FloatArray
    max_discharge_kw: FloatArray
    efficiency: FloatArray
    available: BoolArray
    departure_interval: IntArray
    departure_energy_kwh: FloatArray
    transformer: IntArray
    price_eur_per_mwh: FloatArray
    transformer_import_kw: FloatArray
    transformer_export_kw: FloatArray
    degradation_eur_per_kwh: float = 0.02
    interval_minutes: int = 15
    terminal_value_eur_per_kwh: float = 0.0

    def __post_init__(self) -> None:
        n, t = np.shape(self.available)
        per_vehicle = [
            "capacity_kwh",
            "soc",
            "soc_floor",
            "max_charge_kw",
            "max_discharge_kw",
            "efficiency",
            "departure_interval",
            "departure_energy_kwh",
            "transformer",
        ]
        for name in per_vehicle:
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(
                    f"{name} must have shape ({n},), got {np.shape(getattr(self, name))}"
                )
        if np.shape(self.price_eur_per_mwh) != (t,):
            raise ValueError(f"price_eur_per_mwh must have shape ({t},)")
        j = np.shape(self.transformer_import_kw)
        if np.shape(self.transformer_export_kw) != j or len(j) != 1:
            raise ValueError("transformer_import_kw and transformer_export_kw must be (J,) alike")
        checks = {
            "capacity_kwh must be > 0": np.all(self.capacity_kwh > 0),
            "soc must be in 0..1": np.all((self.soc >= 0) & (self.soc <= 1)),
            "soc_floor must be in 0..1": np.all((self.soc_floor >= 0) & (self.soc_floor <= 1)),
            "max_charge_kw must be >= 0": np.all(self.max_charge_kw >= 0),
            "max_discharge_kw must be >= 0": np.all(self.max_discharge_kw >= 0),
            "efficiency must be in (0, 1]": np.all((self.efficiency > 0) & (self.efficiency <= 1)),
            "departure_energy_kwh must be >= 0": np.all(self.departure_energy_kwh >= 0),
            "transformer index out of range": np.all(
                (self.transformer >= 0) & (self.transformer < j[0])
            ),
            "transformer limits must be >= 0": np.all(self.transformer_import_kw >= 0)
            and np.all(self.transformer_export_kw >= 0),
            "prices must be finite": np.all(np.isfinite(self.price_eur_per_mwh)),
            "degradation_eur_per_kwh must be >= 0": self.degradation_eur_per_kwh >= 0,
            "interval_minutes must be > 0": self.interval_minutes > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)

    @property
    def n_vehicles(self) -> int:
        return int(np.shape(self.available)[0])

    @property
    def n_intervals(self) -> int:
        return int(np.shape(self.available)[1])

    @property
    def interval_h(self) -> float:
        return self.interval_minutes / 60.0

    def subset(
        self, vehicles: IntArray, import_kw: FloatArray, export_kw: FloatArray
    ) -> PlanningProblem:
        """The same market for some vehicles, with per-transformer limits replaced."""
        pick = {
            name: getattr(self, name)[vehicles]
            for name in [
                "capacity_kwh",
                "soc",
                "soc_floor",
                "max_charge_kw",
                "max_discharge_kw",
                "efficiency",
                "available",
                "departure_interval",
                "departure_energy_kwh",
                "transformer",
            ]
        }
        return PlanningProblem(
            **pick,
            price_eur_per_mwh=self.price_eur_per_mwh,
            transformer_import_kw=import_kw,
            transformer_export_kw=export_kw,
            degradation_eur_per_kwh=self.degradation_eur_per_kwh,
            interval_minutes=self.interval_minutes,
            terminal_value_eur_per_kwh=self.terminal_value_eur_per_kwh,
        )


@dataclass(frozen=True)
class FleetPlan:
    """A schedule: power_kw (N, T), > 0 charges; energy_kwh (N, T+1) from now on."""

    power_kw: FloatArray
    energy_kwh: FloatArray
    objective_eur: float
    method: str
    bound_eur: float = float("nan")
    iterations: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def soc_of(self, problem: PlanningProblem) -> FloatArray:
        return self.energy_kwh / problem.capacity_kwh[:, None]


# --------------------------------------------------------------------------- bounds


def energy_bounds(problem: PlanningProblem) -> tuple[FloatArray, FloatArray]:
    """Lower and upper stored energy (N, T+1), requirements capped to what is reachable.

    The floor and the trip energy are raised requirements only as far as charging
    flat out from now can reach them; the upper bound is the capacity.
    """
    dt = problem.interval_h
    cap = problem.capacity_kwh
    e0 = problem.soc * cap
    n, t = problem.n_vehicles, problem.n_intervals
    step = problem.efficiency[:, None] * problem.max_charge_kw[:, None] * problem.available * dt
    reach = np.minimum(cap[:, None], e0[:, None] + np.cumsum(step, axis=1))
    need = np.repeat((problem.soc_floor * cap)[:, None], t, axis=1)
    dep = problem.departure_interval
    leaves = (dep >= 1) & (dep <= t)
    rows = np.nonzero(leaves)[0]
    cols = dep[leaves] - 1
    need[rows, cols] = np.maximum(need[rows, cols], problem.departure_energy_kwh[leaves])
    lower = np.empty((n, t + 1))
    lower[:, 0] = e0
    lower[:, 1:] = np.minimum(need, reach)
    upper = np.empty((n, t + 1))
    upper[:, 0] = e0
    upper[:, 1:] = cap[:, None]
    return lower, upper


def _step_costs(problem: PlanningProblem, price: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Marginal cost a of storing and revenue b of releasing one stored kWh, b <= a."""
    eta = problem.efficiency[:, None]
    p = price / 1000.0
    deg = problem.degradation_eur_per_kwh
    a = (p + deg) / eta
    b = np.minimum(eta * (p - deg), a)
    return a, b


def schedule_objective_eur(
    problem: PlanningProblem, power_kw: FloatArray, energy_kwh: FloatArray
) -> float:
    """Revenue minus degradation (plus terminal value) of a schedule, in EUR."""
    dt = problem.interval_h
    revenue = -dt * float(np.sum(power_kw * problem.price_eur_per_mwh[None, :])) / 1000.0
    wear = dt * problem.degradation_eur_per_kwh * float(np.abs(power_kw).sum())
    terminal = problem.terminal_value_eur_per_kwh * float(energy_kwh[:, -1].sum())
    return revenue - wear + terminal


def _energy_from_power(problem: PlanningProblem, power_kw: FloatArray) -> FloatArray:
    dt = problem.interval_h
    eta = problem.efficiency[:, None]
    stored = dt * np.where(power_kw > 0, eta * power_kw, power_kw / eta)
    e = np.empty((problem.n_vehicles, problem.n_intervals + 1))
    e[:, 0] = problem.soc * problem.capacity_kwh
    e[:, 1:] = e[:, :1] + np.cumsum(stored, axis=1)
    return e


def violations(problem: PlanningProblem, result: FleetPlan, tol_kwh: float = 1e-6) -> list[str]:
    """Every constraint the schedule breaks, as readable strings (empty when feasible).

    Transformer limits are checked exactly (no tolerance); energies to `tol_kwh`.
    """
    out: list[str] = []
    p = result.power_kw
    avail = problem.available
    if np.any(p > problem.max_charge_kw[:, None] * avail):
        out.append("charge power above limit or while unplugged")
    if np.any(-p > problem.max_discharge_kw[:, None] * avail):
        out.append("discharge power above limit or while unplugged")
    e = _energy_from_power(problem, p)
    if np.max(np.abs(e - result.energy_kwh)) > tol_kwh:
        out.append("energy trajectory does not follow from the power schedule")
    lower, upper = energy_bounds(problem)
    if np.any(e[:, 1:] < lower[:, 1:] - tol_kwh):
        i, t = np.argwhere(e[:, 1:] < lower[:, 1:] - tol_kwh)[0]
        out.append(f"vehicle {i} below its floor/trip energy at point {t + 1}")
    if np.any(e[:, 1:] > upper[:, 1:] + tol_kwh):
        out.append("energy above capacity")
    j = problem.transformer_import_kw.shape[0]
    load = np.zeros((j, problem.n_intervals))
    np.add.at(load, problem.transformer, p)
    imp_kw = problem.transformer_import_kw[:, None]
    exp_kw = problem.transformer_export_kw[:, None]
    if np.any(load > imp_kw):
        out.append(f"transformer import exceeded by {np.max(load - imp_kw):.3g} kW")
    if np.any(-load > exp_kw):
        out.append(f"transformer export exceeded by {np.max(-load - exp_kw):.3g} kW")
    return out


# ------------------------------------------------------------------ exact single-battery DP


def _dp_schedules(
    problem: PlanningProblem,
    price: FloatArray,
    lower: FloatArray,
    upper: FloatArray,
) -> FloatArray:
    """Exact optimal power (N, T) of each vehicle alone, for per-vehicle prices (N, T).

    Backward pass over convex piecewise-linear value functions stored as sorted
    slopes and segment lengths (vehicles x segments); forward pass applies the
    two-threshold policy. See the module docstring.
    """
    n, t_count = price.shape
    dt = problem.interval_h
    eta = problem.efficiency[:, None]
    a, b = _step_costs(problem, price)
    x_max = eta * problem.max_charge_kw[:, None] * problem.available * dt
    y_max = problem.max_discharge_kw[:, None] * problem.available * dt / eta
    rows = np.arange(n)

    lo = lower[:, t_count].copy()
    slopes = np.full((n, 1), -problem.terminal_value_eur_per_kwh)
    lengths = (upper[:, t_count] - lower[:, t_count])[:, None].copy()
    thr_a = np.empty((n, t_count))
    thr_b = np.empty((n, t_count))
    for t in range(t_count - 1, -1, -1):
        na = -a[:, t : t + 1]
        nb = -b[:, t : t + 1]
        below_a = slopes < na
        below_b = slopes < nb
        thr_a[:, t] = lo + np.where(below_a, lengths, 0.0).sum(axis=1)
        thr_b[:, t] = lo + np.where(slopes <= nb, lengths, 0.0).sum(axis=1)
        if t == 0:
            break
        pa = below_a.sum(axis=1)
        pb = below_b.sum(axis=1)
        k = slopes.shape[1]
        col = np.arange(k)[None, :]
        new_pos = col + (col >= pa[:, None]) + (col >= pb[:, None])
        new_slopes = np.empty((n, k + 2))
        new_lengths = np.empty((n, k + 2))
        new_slopes[rows[:, None], new_pos] = slopes
        new_lengths[rows[:, None], new_pos] = lengths
        new_slopes[rows, pa] = na[:, 0]
        new_lengths[rows, pa] = x_max[:, t]
        new_slopes[rows, pb + 1] = nb[:, 0]
        new_lengths[rows, pb + 1] = y_max[:, t]
        lo = lo - x_max[:, t]
        # clip the domain to the energy bounds at point t
        ends = lo[:, None] + np.cumsum(new_lengths, axis=1)
        starts = ends - new_lengths
        hi = ends[:, -1]
        new_lo = np.maximum(lo, lower[:, t])
        new_hi = np.minimum(hi, upper[:, t])
        new_lengths = np.clip(
            np.minimum(ends, new_hi[:, None]) - np.maximum(starts, new_lo[:, None]), 0.0, None
        )
        lo = new_lo
        # compact: zero-length segments to the back (stable, keeps slopes sorted)
        empty = new_lengths <= 0.0
        order = np.argsort(empty, axis=1, kind="stable")
        keep = int((~empty).sum(axis=1).max(initial=1))
        order = order[:, : max(keep, 1)]
        slopes = np.take_along_axis(new_slopes, order, axis=1)
        lengths = np.take_along_axis(new_lengths, order, axis=1)
        slopes[lengths <= 0.0] = np.inf

    e = problem.soc * problem.capacity_kwh
    power = np.empty((n, t_count))
    eta1 = problem.efficiency
    for t in range(t_count):
        up = np.minimum(thr_a[:, t], e + x_max[:, t])
        down = np.maximum(thr_b[:, t], e - y_max[:, t])
        nxt = np.where(e < thr_a[:, t], up, np.where(e > thr_b[:, t], down, e))
        nxt = np.clip(nxt, lower[:, t + 1], upper[:, t + 1])
        z = np.clip(nxt - e, -y_max[:, t], x_max[:, t])
        power[:, t] = np.where(z > 0, z / (eta1 * dt), z * eta1 / dt)
        e = e + z
    return power


# --------------------------------------------------------------------------- LP


def _lp_matrices(
    problem: PlanningProblem, lower: FloatArray, upper: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, sp.csc_matrix, FloatArray, FloatArray]:
    """Columns [c (N*T), d (N*T), e[1..T] (N*T)], rows [balance (N*T), transformer (J*T)]."""
    n, t = problem.n_vehicles, problem.n_intervals
    j = problem.transformer_import_kw.shape[0]
    dt = problem.interval_h
    nt = n * t
    a, b = _step_costs(problem, np.broadcast_to(problem.price_eur_per_mwh, (n, t)))
    eta = problem.efficiency[:, None]
    cost_c = (a * eta * dt).ravel()
    cost_d = (-(b / eta) * dt).ravel()
    cost_e = np.zeros((n, t))
    cost_e[:, -1] = -problem.terminal_value_eur_per_kwh
    cost = np.concatenate([cost_c, cost_d, cost_e.ravel()])
    col_lo = np.concatenate([np.zeros(2 * nt), lower[:, 1:].ravel()])
    col_hi = np.concatenate(
        [
            (problem.max_charge_kw[:, None] * problem.available).ravel(),
            (problem.max_discharge_kw[:, None] * problem.available).ravel(),
            upper[:, 1:].ravel(),
        ]
    )
    idx = np.arange(nt)
    eta_flat = np.broadcast_to(eta, (n, t)).ravel()
    has_prev = (idx % t) != 0
    prev = idx[has_prev]
    trow = (np.repeat(problem.transformer, t) * t + np.tile(np.arange(t), n)) + nt
    r = np.concatenate([idx, idx, idx, prev, trow, trow])
    c = np.concatenate([idx, idx + nt, idx + 2 * nt, prev - 1 + 2 * nt, idx, idx + nt])
    v = np.concatenate(
        [
            -eta_flat * dt,
            dt / eta_flat,
            np.ones(nt),
            -np.ones(prev.size),
            np.ones(nt),
            -np.ones(nt),
        ]
    )
    matrix = sp.csc_matrix((v, (r, c)), shape=(nt + j * t, 3 * nt))
    rhs = np.zeros((n, t))
    rhs[:, 0] = problem.soc * problem.capacity_kwh
    export = np.minimum(-problem.transformer_export_kw + _LIMIT_MARGIN_KW, 0.0)
    import_ = np.maximum(problem.transformer_import_kw - _LIMIT_MARGIN_KW, 0.0)
    row_lo = np.concatenate([rhs.ravel(), np.repeat(export, t)])
    row_hi = np.concatenate([rhs.ravel(), np.repeat(import_, t)])
    return cost, col_lo, col_hi, matrix, row_lo, row_hi


def _highs(solver: str = "choose") -> highspy.Highs:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("solver", solver)
    return h


def _solve_lp(problem: PlanningProblem, solver: str = "choose") -> tuple[FloatArray, float]:
    n, t = problem.n_vehicles, problem.n_intervals
    lower, upper = energy_bounds(problem)
    cost, col_lo, col_hi, matrix, row_lo, row_hi = _lp_matrices(problem, lower, upper)
    lp = highspy.HighsLp()
    lp.num_col_ = cost.size
    lp.num_row_ = row_lo.size
    lp.col_cost_ = cost
    lp.col_lower_ = col_lo
    lp.col_upper_ = col_hi
    lp.row_lower_ = row_lo
    lp.row_upper_ = row_hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr.astype(np.int32)
    lp.a_matrix_.index_ = matrix.indices.astype(np.int32)
    lp.a_matrix_.value_ = matrix.data
    lp.a_matrix_.num_col_ = cost.size
    lp.a_matrix_.num_row_ = row_lo.size
    h = _highs(solver)
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise InfeasiblePlan(f"LP not solved: {h.modelStatusToString(status)}")
    x = np.asarray(h.getSolution().col_value)
    nt = n * t
    power = (x[:nt] - x[nt : 2 * nt]).reshape(n, t)
    return power, -float(h.getInfo().objective_function_value)


def _finish(problem: PlanningProblem, power: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Clip float noise off the power limits; derive the energy trajectory."""
    avail = problem.available
    power = np.clip(
        power,
        -problem.max_discharge_kw[:, None] * avail,
        problem.max_charge_kw[:, None] * avail,
    )
    return power, _energy_from_power(problem, power)


def solve_monolithic(problem: PlanningProblem, solver: str = "choose") -> FleetPlan:
    """The reference: one LP over the whole fleet (the oracle for `plan`)."""
    power, model_objective = _solve_lp(problem, solver)
    power, energy = _finish(problem, power)
    return FleetPlan(
        power_kw=power,
        energy_kwh=energy,
        objective_eur=schedule_objective_eur(problem, power, energy),
        method="monolithic-lp",
        bound_eur=model_objective,
        iterations=1,
    )


# --------------------------------------------------------------------------- decomposed


def _transformer_load(problem: PlanningProblem, power: FloatArray) -> FloatArray:
    load = np.zeros((problem.transformer_import_kw.shape[0], problem.n_intervals))
    np.add.at(load, problem.transformer, power)
    return load


def _column_cost(
    problem: PlanningProblem, power: FloatArray, price: FloatArray, rows: IntArray
) -> FloatArray:
    """Model cost (EUR, minimised) of net schedules of vehicles `rows` under prices."""
    dt = problem.interval_h
    deg = problem.degradation_eur_per_kwh
    energy_cost = dt * (power * price / 1000.0).sum(axis=1) + dt * deg * np.abs(power).sum(axis=1)
    if problem.terminal_value_eur_per_kwh == 0.0:
        return energy_cost
    eta = problem.efficiency[rows, None]
    stored = dt * np.where(power > 0, eta * power, power / eta).sum(axis=1)
    final = problem.soc[rows] * problem.capacity_kwh[rows] + stored
    return energy_cost - problem.terminal_value_eur_per_kwh * final


def _slack_penalty(problem: PlanningProblem) -> float:
    """EUR per kW of limit violation in the master: well above any true shadow price.

    A transformer's shadow price is what moving one kW of charging to another
    interval costs, bounded by the price spread plus wear, after losses.
    """
    price = problem.price_eur_per_mwh
    spread = (float(price.max() - price.min()) / 1000.0 + 2 * problem.degradation_eur_per_kwh) / (
        float(problem.efficiency.min()) ** 2
    )
    return 10.0 * problem.interval_h * (spread + problem.terminal_value_eur_per_kwh) + 1.0


class _Master:
    """Restricted master LP of the column generation over the vehicles of bound transformers."""

    def __init__(
        self, problem: PlanningProblem, vehicles: IntArray, transformers: IntArray, penalty: float
    ) -> None:
        self.problem = problem
        self.vehicles = vehicles
        self.t = problem.n_intervals
        tr_pos = -np.ones(problem.transformer_import_kw.shape[0], dtype=np.int64)
        tr_pos[transformers] = np.arange(transformers.size)
        self.tr_row = tr_pos[problem.transformer[vehicles]]  # per active vehicle
        self.transformers = transformers
        n_a = vehicles.size
        n_tr = transformers.size * self.t
        self.n_conv = n_a
        imp = np.repeat(problem.transformer_import_kw[transformers], self.t) - _LIMIT_MARGIN_KW
        exp = np.repeat(problem.transformer_export_kw[transformers], self.t) - _LIMIT_MARGIN_KW
        self.h = _highs("simplex")
        inf = highspy.kHighsInf
        row_lo = np.concatenate([np.ones(n_a), -np.maximum(exp, 0.0)])
        row_hi = np.concatenate([np.ones(n_a), np.maximum(imp, 0.0)])
        self.h.addRows(
            row_lo.size,
            row_lo,
            row_hi,
            0,
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0),
        )
        # slack columns keep the master feasible while columns are few
        idx = np.arange(n_a, n_a + n_tr, dtype=np.int32)
        for sign in (1.0, -1.0):
            self.h.addCols(
                n_tr,
                np.full(n_tr, penalty),
                np.zeros(n_tr),
                np.full(n_tr, inf),
                n_tr,
                np.arange(n_tr, dtype=np.int32),
                idx,
                np.full(n_tr, sign),
            )
        self.n_slack = 2 * n_tr
        self.col_vehicle: list[IntArray] = []
        self.col_power: list[FloatArray] = []

    def add(self, local: IntArray, power: FloatArray, cost: FloatArray) -> None:
        """Add one column per listed active vehicle (local index), with its power (k, T)."""
        if local.size == 0:
            return
        nz = power != 0.0
        counts = nz.sum(axis=1) + 1
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        t_idx = np.nonzero(nz)
        index = np.empty(int(counts.sum()), dtype=np.int32)
        value = np.empty(int(counts.sum()))
        index[starts] = local
        value[starts] = 1.0
        # positions of the nonzeros after each column's convexity entry
        offs = np.cumsum(nz, axis=1) - 1
        pos = starts[t_idx[0]] + 1 + offs[t_idx]
        index[pos] = self.n_conv + self.tr_row[local][t_idx[0]] * self.t + t_idx[1]
        value[pos] = power[t_idx]
        self.h.addCols(
            local.size,
            cost,
            np.zeros(local.size),
            np.full(local.size, highspy.kHighsInf),
            index.size,
            starts,
            index,
            value,
        )
        self.col_vehicle.append(local)
        self.col_power.append(power)

    def solve(self) -> tuple[float, FloatArray, FloatArray, FloatArray]:
        self.h.run()
        status = self.h.getModelStatus()
        if status != highspy.HighsModelStatus.kOptimal:  # pragma: no cover - slacks prevent it
            raise InfeasiblePlan(f"master LP: {self.h.modelStatusToString(status)}")
        sol = self.h.getSolution()
        duals = np.asarray(sol.row_dual)
        x = np.asarray(sol.col_value)
        return (
            float(self.h.getInfo().objective_function_value),
            duals[: self.n_conv],
            duals[self.n_conv :].reshape(-1, self.t),
            x,
        )


def plan(
    problem: PlanningProblem,
    gap_tolerance: float = 1e-3,
    max_rounds: int = 60,
) -> FleetPlan:
    """The fast plan: exact per-vehicle DP, transformer limits by column generation.

    Returns a schedule that respects every constraint, whose objective is within
    `gap_tolerance` (relative, certified by a Lagrangian bound) of the LP optimum.
    Raises InfeasiblePlan when forced charging cannot fit under a transformer.
    """
    n, t = problem.n_vehicles, problem.n_intervals
    dt = problem.interval_h
    lower, upper = energy_bounds(problem)
    base_price = np.broadcast_to(problem.price_eur_per_mwh, (n, t))
    power = _dp_schedules(problem, base_price, lower, upper)
    load = _transformer_load(problem, power)
    imp_ok = np.maximum(problem.transformer_import_kw - _LIMIT_MARGIN_KW, 0.0)
    exp_ok = np.maximum(problem.transformer_export_kw - _LIMIT_MARGIN_KW, 0.0)
    over = (load > imp_ok[:, None]) | (-load > exp_ok[:, None])
    bound_trs = np.nonzero(over.any(axis=1))[0]
    stats: dict[str, float] = {
        "bound_transformers": float(bound_trs.size),
        "polished_vehicles": 0.0,
    }
    if bound_trs.size == 0:
        power, energy = _finish(problem, power)
        obj = schedule_objective_eur(problem, power, energy)
        return FleetPlan(power, energy, obj, "dp", bound_eur=obj, iterations=1, stats=stats)

    active = np.nonzero(np.isin(problem.transformer, bound_trs))[0]
    sub = problem.subset(active, problem.transformer_import_kw, problem.transformer_export_kw)
    s_lower, s_upper = lower[active], upper[active]
    master = _Master(problem, active, bound_trs, _slack_penalty(problem))
    local_all = np.arange(active.size)
    master.add(
        local_all,
        power[active],
        _column_cost(sub, power[active], problem.price_eur_per_mwh, local_all),
    )
    best_bound = -np.inf
    center: FloatArray | None = None  # duals of the best Lagrangian bound so far
    rounds = 1
    n_tr = problem.transformer_import_kw.shape[0]
    exp = problem.transformer_export_kw[bound_trs][:, None]
    imp = problem.transformer_import_kw[bound_trs][:, None]
    smoothing = _SMOOTHING
    for rounds in range(2, max_rounds + 2):  # noqa: B007 - reported below
        master_obj, sigma, row_dual, _ = master.solve()
        # Wentges smoothing: price between the master's duals and the best
        # bound's duals; Kelley's plain cutting plane oscillates for dozens of rounds.
        y = row_dual if center is None else smoothing * center + (1 - smoothing) * row_dual
        shadow = np.zeros((n_tr, t))
        shadow[bound_trs] = y
        eff_price = problem.price_eur_per_mwh[None, :] - shadow[sub.transformer] * 1000.0 / dt
        cand = _dp_schedules(sub, eff_price, s_lower, s_upper)
        priced = _column_cost(sub, cand, eff_price, local_all)
        bound = float(
            priced.sum() - (np.maximum(y, 0) * exp).sum() - (np.maximum(-y, 0) * imp).sum()
        )
        if bound > best_bound:
            best_bound, center = bound, y
        shadow[bound_trs] = row_dual
        master_price = problem.price_eur_per_mwh[None, :] - shadow[sub.transformer] * 1000.0 / dt
        reduced = _column_cost(sub, cand, master_price, local_all) - sigma
        improving = np.nonzero(reduced < -1e-9 * max(1.0, abs(master_obj) / max(1, active.size)))[0]
        gap = (master_obj - best_bound) / max(1.0, abs(master_obj))
        if gap <= gap_tolerance:
            break
        if improving.size == 0:
            if smoothing == 0.0:
                break
            smoothing = 0.0  # mispricing: price at the master's own duals once
            continue
        smoothing = _SMOOTHING
        master.add(
            improving,
            cand[improving],
            _column_cost(sub, cand[improving], problem.price_eur_per_mwh, improving),
        )
    _, _, _, x = master.solve()
    weights = x[master.n_slack :]
    slack = x[: master.n_slack]
    if slack.max(initial=0.0) > 1e-7:
        raise InfeasiblePlan("forced charging does not fit under a transformer limit")
    col_vehicle = np.concatenate(master.col_vehicle)
    col_power = np.concatenate(master.col_power)
    weights = np.clip(weights, 0.0, None)
    total = np.bincount(col_vehicle, weights=weights, minlength=active.size)
    combo = np.zeros((active.size, t))
    np.add.at(combo, col_vehicle, weights[:, None] * col_power)
    combo /= total[:, None]
    charging = np.zeros((active.size, t), dtype=bool)
    discharging = np.zeros((active.size, t), dtype=bool)
    used = weights > 1e-9
    np.logical_or.at(charging, col_vehicle[used], col_power[used] > 0)
    np.logical_or.at(discharging, col_vehicle[used], col_power[used] < 0)
    mixed = np.nonzero((charging & discharging).any(axis=1))[0]
    power[active] = combo
    if mixed.size:
        stats["polished_vehicles"] = float(mixed.size)
        power[active[mixed]] = _polish(problem, power, active[mixed])
    power, energy = _finish(problem, power)
    obj = schedule_objective_eur(problem, power, energy)
    unbound = ~np.isin(problem.transformer, bound_trs)
    free_obj = schedule_objective_eur(
        problem.subset(
            np.nonzero(unbound)[0], problem.transformer_import_kw, problem.transformer_export_kw
        ),
        power[unbound],
        energy[unbound],
    )
    return FleetPlan(
        power,
        energy,
        obj,
        "dp+column-generation",
        bound_eur=free_obj - best_bound,
        iterations=rounds,
        stats=stats,
    )


def _polish(problem: PlanningProblem, power: FloatArray, vehicles: IntArray) -> FloatArray:
    """Exact LP for `vehicles` within the headroom the rest of the fleet leaves."""
    others = np.ones(problem.n_vehicles, dtype=bool)
    others[vehicles] = False
    load = np.zeros((problem.transformer_import_kw.shape[0], problem.n_intervals))
    np.add.at(load, problem.transformer[others], power[others])
    sub = problem.subset(vehicles, problem.transformer_import_kw, problem.transformer_export_kw)
    lower, upper = energy_bounds(sub)
    cost, col_lo, col_hi, matrix, row_lo, row_hi = _lp_matrices(sub, lower, upper)
    nt = vehicles.size * problem.n_intervals
    row_hi[nt:] = (problem.transformer_import_kw[:, None] - load).ravel() - _LIMIT_MARGIN_KW
    row_lo[nt:] = (-problem.transformer_export_kw[:, None] - load).ravel() + _LIMIT_MARGIN_KW
    row_hi[nt:] = np.maximum(row_hi[nt:], row_lo[nt:])
    lp = highspy.HighsLp()
    lp.num_col_ = cost.size
    lp.num_row_ = row_lo.size
    lp.col_cost_ = cost
    lp.col_lower_ = col_lo
    lp.col_upper_ = col_hi
    lp.row_lower_ = row_lo
    lp.row_upper_ = row_hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr.astype(np.int32)
    lp.a_matrix_.index_ = matrix.indices.astype(np.int32)
    lp.a_matrix_.value_ = matrix.data
    lp.a_matrix_.num_col_ = cost.size
    lp.a_matrix_.num_row_ = row_lo.size
    h = _highs()
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:  # pragma: no cover
        return power[vehicles]
    x = np.asarray(h.getSolution().col_value)
    return (x[:nt] - x[nt : 2 * nt]).reshape(vehicles.size, problem.n_intervals)
