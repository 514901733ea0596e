"""Battery capacity fade from published semi-empirical ageing models, vectorised over a fleet.

Two published models, one per cell chemistry; both split fade into a calendar term
(time, temperature, state of charge) and a cycle term (charge throughput, cycle depth):

``SCHMALSTIEG_2014`` -- NMC/graphite, Sanyo UR18650E (2.05 Ah).
    J. Schmalstieg, S. Käbitz, M. Ecker, D. U. Sauer, "A holistic aging model for
    Li(NiMnCo)O2 based 18650 lithium-ion batteries", J. Power Sources 257 (2014) 325-334,
    doi:10.1016/j.jpowsour.2014.02.012.

    relative capacity  C = 1 - alpha_cap * t**0.75 - beta_cap * sqrt(Q)
    alpha_cap(V, T)    = (7.543 * V - 23.75) * 1e6 * exp(-6976 / T)          [day**-0.75]
    beta_cap(V, DOD)   = 7.348e-3 * (V - 3.667)**2 + 7.600e-4 + 4.081e-3 * DOD  [Ah**-0.5]

    t in days, T in kelvin, V the cell's open-circuit voltage in volts (storage voltage
    for the calendar term; the paper uses the quadratic-mean voltage of the cycle for the
    cycle term, approximated here by the OCV at the cycle's mean SOC), DOD in 0..1, Q the
    charge throughput of one cell in Ah. Q counts charge and discharge, so one equivalent
    full cycle (EFC) is 2 x 2.05 Ah -- the convention of NREL's BLAST-Lite transcription
    of this model. The cell capacity, 2.05 Ah, is from M. Ecker et al., J. Power Sources
    248 (2014) 839-851, which reports the ageing tests of the same cells. The cycle tests
    ran at 35 degC and 1C: the cycle term depends on neither temperature nor C-rate.

``NAUMANN_LFP`` -- LFP/graphite, Sony US26650 (3.0 Ah).
    Calendar: M. Naumann, M. Schimpe, P. Keil, H. C. Hesse, A. Jossen, "Analysis and
    modeling of calendar aging of a commercial LiFePO4/graphite cell", J. Energy Storage 17
    (2018) 153-169, doi:10.1016/j.est.2018.01.019:
        fade = k_T(T) * k_SOC(SOC) * sqrt(t_s)
        k_T   = 1.2571e-5 * exp(-17126 / 8.3145 * (1/T - 1/298.15))         [s**-0.5]
        k_SOC = 2.8575 * (SOC - 0.5)**3 + 0.60225
    Cycle: M. Naumann, F. B. Spingler, A. Jossen, "Analysis and modeling of cycle aging of
    a commercial LiFePO4/graphite cell", J. Power Sources 451 (2020) 227666,
    doi:10.1016/j.jpowsour.2019.227666:
        fade = 0.01 * k_C(C) * k_DOD(DOD) * sqrt(FEC)       (the paper's fit is in percent)
        k_C   = 0.0630 * C_rate + 0.0971
        k_DOD = 4.0253 * (DOD - 0.6)**3 + 1.0923

Both are fitted to small cells in a laboratory. A vehicle pack with thermal management
usually ages more slowly; ``degradation_scale`` multiplies the fade to calibrate a model
to warranty or field data (1.0 = the paper as published).

Every function takes numpy arrays (one entry per vehicle, broadcasting allowed), so a
projection calls it once for the whole fleet. Pure numpy: no clock, no I/O.

Units: time in days or years as named, temperature in degrees Celsius (converted to kelvin
inside), energy in kWh, money in EUR, SOC, DOD and fade as fractions 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_EOL_FADE",
    "NAUMANN_LFP",
    "SCHMALSTIEG_2014",
    "AgeingModel",
    "FleetDegradation",
    "FleetUsage",
    "NaumannLfp",
    "Schmalstieg2014Nmc",
    "assess_fleet",
    "cycle_life_efc",
    "degradation_cost_eur",
    "equivalent_full_cycles",
    "soh_trajectory",
    "thermal_throughput_factor",
    "throughput_cost_eur_per_kwh",
    "warranty_consumption",
]

Array = NDArray[np.float64]

DEFAULT_EOL_FADE: Final = 0.20
"""End of life: 20 % capacity lost (80 % state of health), the usual EV warranty threshold."""

_KELVIN_OFFSET: Final = 273.15
_SECONDS_PER_DAY: Final = 86_400.0
_DAYS_PER_YEAR: Final = 365.25


def _f(x: ArrayLike) -> Array:
    return np.asarray(x, dtype=np.float64)


def _kelvin(temperature_c: ArrayLike) -> Array:
    return _f(temperature_c) + _KELVIN_OFFSET


class AgeingModel(Protocol):
    """A calendar + cycle capacity-fade model; each term returns the fade fraction."""

    @property
    def name(self) -> str: ...

    @property
    def calendar_time_exponent(self) -> float: ...

    def calendar_fade(
        self, elapsed_days: ArrayLike, temperature_c: ArrayLike, mean_soc: ArrayLike
    ) -> Array: ...

    def cycle_fade(
        self, efc: ArrayLike, dod: ArrayLike, c_rate: ArrayLike, mean_soc: ArrayLike
    ) -> Array: ...


@dataclass(frozen=True)
class Schmalstieg2014Nmc:
    """Schmalstieg et al. 2014 (see the module docstring for the equations)."""

    name: str = "Schmalstieg 2014, NMC/graphite (Sanyo UR18650E)"
    calendar_time_exponent: float = 0.75
    cell_capacity_ah: float = 2.05
    # Open-circuit voltage at SOC 0, 0.1, ..., 1.0, read from the OCV curve of Fig. 1 of
    # the paper (as digitised in NREL BLAST-Lite, resampled to 10 % steps).
    ocv_soc: tuple[float, ...] = tuple(np.linspace(0.0, 1.0, 11))
    ocv_v: tuple[float, ...] = (
        3.331, 3.491, 3.581, 3.627, 3.655, 3.697, 3.775, 3.869, 3.965, 4.073, 4.162,
    )  # fmt: skip

    def ocv_v_at(self, soc: ArrayLike) -> Array:
        return np.interp(_f(soc), self.ocv_soc, self.ocv_v)

    def alpha_cap(self, voltage_v: ArrayLike, temperature_c: ArrayLike) -> Array:
        """Calendar rate, day**-0.75. Clipped at 0: below ~3.15 V the linear fit turns negative."""
        alpha = (7.543 * _f(voltage_v) - 23.75) * 1e6 * np.exp(-6976.0 / _kelvin(temperature_c))
        return np.maximum(alpha, 0.0)

    def beta_cap(self, voltage_v: ArrayLike, dod: ArrayLike) -> Array:
        """Cycle rate, Ah**-0.5 of one cell's charge throughput."""
        return 7.348e-3 * (_f(voltage_v) - 3.667) ** 2 + 7.600e-4 + 4.081e-3 * _f(dod)

    def calendar_fade(
        self, elapsed_days: ArrayLike, temperature_c: ArrayLike, mean_soc: ArrayLike
    ) -> Array:
        alpha = self.alpha_cap(self.ocv_v_at(mean_soc), temperature_c)
        return alpha * np.maximum(_f(elapsed_days), 0.0) ** 0.75

    def cycle_fade(
        self, efc: ArrayLike, dod: ArrayLike, c_rate: ArrayLike, mean_soc: ArrayLike
    ) -> Array:
        del c_rate  # fitted at 1C only: the paper's cycle term has no C-rate dependence
        charge_throughput_ah = 2.0 * self.cell_capacity_ah * np.maximum(_f(efc), 0.0)
        return self.beta_cap(self.ocv_v_at(mean_soc), dod) * np.sqrt(charge_throughput_ah)


@dataclass(frozen=True)
class NaumannLfp:
    """Naumann et al. 2018 (calendar) and 2020 (cycle); equations in the module docstring."""

    name: str = "Naumann 2018/2020, LFP/graphite (Sony US26650)"
    calendar_time_exponent: float = 0.5

    def calendar_fade(
        self, elapsed_days: ArrayLike, temperature_c: ArrayLike, mean_soc: ArrayLike
    ) -> Array:
        k_t = 1.2571e-5 * np.exp(-17126.0 / 8.3145 * (1.0 / _kelvin(temperature_c) - 1 / 298.15))
        k_soc = 2.8575 * (_f(mean_soc) - 0.5) ** 3 + 0.60225
        return k_t * k_soc * np.sqrt(np.maximum(_f(elapsed_days), 0.0) * _SECONDS_PER_DAY)

    def cycle_fade(
        self, efc: ArrayLike, dod: ArrayLike, c_rate: ArrayLike, mean_soc: ArrayLike
    ) -> Array:
        del mean_soc  # the 2020 cycle model depends on depth and rate, not on mean SOC
        k_c = 0.0630 * _f(c_rate) + 0.0971
        k_dod = 4.0253 * (_f(dod) - 0.6) ** 3 + 1.0923
        return 0.01 * k_c * k_dod * np.sqrt(np.maximum(_f(efc), 0.0))


SCHMALSTIEG_2014: Final = Schmalstieg2014Nmc()
NAUMANN_LFP: Final = NaumannLfp()


def equivalent_full_cycles(throughput_kwh: ArrayLike, capacity_kwh: ArrayLike) -> Array:
    """EFC from energy throughput, counting charge and discharge: one EFC moves 2 x capacity."""
    return _f(throughput_kwh) / (2.0 * _f(capacity_kwh))


def _calendar_fade_exposed(
    model: AgeingModel,
    elapsed_days: Array,
    temperature_c: Array,
    mean_soc: Array,
) -> Array:
    """Calendar fade for a temperature history given as samples along the last axis.

    Ageing is Arrhenius, so the fade rate is averaged over the samples -- not the
    temperature: a week at 40 degC ages more than it is offset by a week at 10 degC.
    The time exponent (0.75 or 0.5) applies to the total time, so the rate is found at
    one day and scaled.
    """
    if temperature_c.ndim > np.ndim(mean_soc):
        one_day = model.calendar_fade(1.0, temperature_c, mean_soc[..., None])
        rate_per_day_power = one_day.mean(axis=-1)
        return _f(
            rate_per_day_power * np.maximum(elapsed_days, 0.0) ** model.calendar_time_exponent
        )
    return model.calendar_fade(elapsed_days, temperature_c, mean_soc)


def thermal_throughput_factor(temperature_c: ArrayLike) -> Array:
    """Share of nominal power (hence usable V2G throughput) a BMS allows at a cell temperature.

    An assumption, not a published fit: a typical BMS derating, full power from 10 to
    35 degC, linearly down to none at -20 degC and at 55 degC. Use it to discount planned
    V2G throughput for cold or hot exposure; 1.0 means no penalty.
    """
    t = _f(temperature_c)
    return np.interp(t, [-20.0, 10.0, 35.0, 55.0], [0.0, 1.0, 1.0, 0.0])


def degradation_cost_eur(
    fade: ArrayLike, replacement_cost_eur: ArrayLike, eol_fade: float = DEFAULT_EOL_FADE
) -> Array:
    """Value of capacity lost: the pack is written off linearly from new to end of life."""
    if not 0.0 < eol_fade <= 1.0:
        raise ValueError(f"eol_fade must be in (0, 1], got {eol_fade!r}")
    return _f(replacement_cost_eur) * _f(fade) / eol_fade


def cycle_life_efc(
    model: AgeingModel,
    dod: ArrayLike,
    c_rate: ArrayLike = 1.0,
    mean_soc: ArrayLike = 0.5,
    eol_fade: float = DEFAULT_EOL_FADE,
    degradation_scale: float = 1.0,
) -> Array:
    """EFC until cycle fade alone reaches ``eol_fade``. Both models are sqrt(EFC) laws."""
    fade_at_one_efc = degradation_scale * model.cycle_fade(1.0, dod, c_rate, mean_soc)
    return (eol_fade / fade_at_one_efc) ** 2


def throughput_cost_eur_per_kwh(
    battery_price_eur_per_kwh: ArrayLike, cycle_life_efc: ArrayLike
) -> Array:
    """Average wear cost per kWh of throughput (charged or discharged), for the dispatcher.

    The pack costs ``price x capacity`` and moves ``2 x cycle_life x capacity`` kWh before
    end of life, so capacity cancels. A kWh cycled through V2G (in and out) costs twice this.
    """
    return _f(battery_price_eur_per_kwh) / (2.0 * _f(cycle_life_efc))


def warranty_consumption(
    throughput_kwh: ArrayLike,
    warranty_throughput_kwh: ArrayLike,
    elapsed_years: ArrayLike,
    warranty_years: ArrayLike,
) -> tuple[Array, Array]:
    """Fractions of the warranty's energy allowance and of its term used (1.0 = exhausted)."""
    return (
        _f(throughput_kwh) / _f(warranty_throughput_kwh),
        _f(elapsed_years) / _f(warranty_years),
    )


@dataclass(frozen=True)
class FleetUsage:
    """One entry per vehicle (arrays of shape (n,)); ``temperature_c`` may be (n,) or (n, k).

    ``throughput_kwh`` counts energy charged plus energy discharged at the battery since
    the vehicle was new (driving and V2G alike); ``elapsed_days`` is the pack's age.
    ``prior_throughput_kwh`` and ``prior_elapsed_days`` are the part of both before the
    period being priced (e.g. the pack's history when it joined the fleet; 0 for a new
    pack): the period's cost is the fade between the two points, not the fade since new.
    A (n, k) ``temperature_c`` is k equally long samples of cell temperature.
    """

    capacity_kwh: Array
    throughput_kwh: Array
    dod: Array
    c_rate: Array
    temperature_c: Array
    elapsed_days: Array
    mean_soc: Array
    replacement_cost_eur: Array
    warranty_throughput_kwh: Array
    warranty_years: Array
    prior_throughput_kwh: Array
    prior_elapsed_days: Array

    @classmethod
    def of(cls, **columns: ArrayLike) -> FleetUsage:
        """Build from array-likes, broadcasting scalars to the fleet size.

        ``prior_throughput_kwh`` and ``prior_elapsed_days`` default to 0 (a new pack).
        """
        columns = {"prior_throughput_kwh": 0.0, "prior_elapsed_days": 0.0, **columns}
        arrays = {k: _f(v) for k, v in columns.items()}
        temperature = arrays.pop("temperature_c")
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()), temperature.shape[:1])
        arrays = {k: np.broadcast_to(v, shape) for k, v in arrays.items()}
        if temperature.ndim <= 1:
            temperature = np.broadcast_to(temperature, shape)
        return cls(temperature_c=temperature, **arrays)

    @property
    def efc(self) -> Array:
        return equivalent_full_cycles(self.throughput_kwh, self.capacity_kwh)

    @property
    def prior_efc(self) -> Array:
        return equivalent_full_cycles(self.prior_throughput_kwh, self.capacity_kwh)


@dataclass(frozen=True)
class FleetDegradation:
    """Per-vehicle results of :func:`assess_fleet`.

    Fades and ``soh`` are of the pack since new (at ``elapsed_days`` and
    ``throughput_kwh``); the costs are of the fade incurred after the prior point:
    ``calendar_cost_eur`` (ageing that happens whether the vehicle is used or not),
    ``cycle_cost_eur`` (wear from throughput: driving and V2G) and their sum
    ``degradation_cost_eur``.
    """

    calendar_fade: Array
    cycle_fade: Array
    capacity_fade: Array
    soh: Array
    degradation_cost_eur: Array
    calendar_cost_eur: Array
    cycle_cost_eur: Array
    throughput_cost_eur_per_kwh: Array
    thermal_throughput_factor: Array
    warranty_throughput_used: Array
    warranty_time_used: Array


def assess_fleet(
    usage: FleetUsage,
    model: AgeingModel = SCHMALSTIEG_2014,
    *,
    battery_price_eur_per_kwh: ArrayLike | None = None,
    eol_fade: float = DEFAULT_EOL_FADE,
    degradation_scale: float = 1.0,
) -> FleetDegradation:
    """Fade, state of health, cost and warranty use for every vehicle, in one vectorised call.

    Calendar and cycle fade add, as in both papers. Stress (SOC, DOD, C-rate, temperature)
    is taken as constant over the pack's life at the given averages: the closed forms then
    hold exactly, without tracking an equivalent-time state per step. The period's cost
    is the cost of the fade between the prior point and now, term by term: both terms
    are concave (t**0.75 or sqrt(t); sqrt(Q)), so a week of a two-year-old pack costs
    far less than the first week of a new one.

    ``battery_price_eur_per_kwh`` defaults to replacement cost / capacity.
    """
    mean_soc = _f(usage.mean_soc)
    temperature = _f(usage.temperature_c)

    def calendar(days: ArrayLike) -> Array:
        return degradation_scale * _calendar_fade_exposed(model, _f(days), temperature, mean_soc)

    def cycle(efc: Array) -> Array:
        return degradation_scale * model.cycle_fade(efc, usage.dod, usage.c_rate, mean_soc)

    cal = calendar(usage.elapsed_days)
    cyc = cycle(usage.efc)
    # The period's fade, from the uncapped terms (the cap at 1 only bites far past EOL).
    cal_cost = degradation_cost_eur(
        cal - calendar(usage.prior_elapsed_days), usage.replacement_cost_eur, eol_fade
    )
    cyc_cost = degradation_cost_eur(
        cyc - cycle(usage.prior_efc), usage.replacement_cost_eur, eol_fade
    )
    fade = np.minimum(cal + cyc, 1.0)
    price = (
        _f(usage.replacement_cost_eur) / _f(usage.capacity_kwh)
        if battery_price_eur_per_kwh is None
        else _f(battery_price_eur_per_kwh)
    )
    life = cycle_life_efc(
        model, usage.dod, usage.c_rate, mean_soc, eol_fade, degradation_scale=degradation_scale
    )
    thermal = thermal_throughput_factor(temperature)
    if temperature.ndim > mean_soc.ndim:
        thermal = thermal.mean(axis=-1)
    warranty_energy, warranty_time = warranty_consumption(
        usage.throughput_kwh,
        usage.warranty_throughput_kwh,
        _f(usage.elapsed_days) / _DAYS_PER_YEAR,
        usage.warranty_years,
    )
    return FleetDegradation(
        calendar_fade=cal,
        cycle_fade=cyc,
        capacity_fade=fade,
        soh=1.0 - fade,
        degradation_cost_eur=cal_cost + cyc_cost,
        calendar_cost_eur=cal_cost,
        cycle_cost_eur=cyc_cost,
        throughput_cost_eur_per_kwh=throughput_cost_eur_per_kwh(price, life),
        thermal_throughput_factor=thermal,
        warranty_throughput_used=warranty_energy,
        warranty_time_used=warranty_time,
    )


def soh_trajectory(
    years: ArrayLike,
    throughput_kwh_per_year: ArrayLike,
    capacity_kwh: ArrayLike,
    dod: ArrayLike,
    c_rate: ArrayLike,
    temperature_c: ArrayLike,
    mean_soc: ArrayLike,
    model: AgeingModel = SCHMALSTIEG_2014,
    degradation_scale: float = 1.0,
) -> Array:
    """State of health, shape (n_vehicles, n_years), at each age in ``years`` (from new).

    Per-vehicle inputs have shape (n,); usage is taken as steady (constant yearly
    throughput and stress), so each point is the closed form at that age.
    """
    t_years = _f(years)[None, :]
    per_vehicle = np.broadcast_arrays(
        *(
            np.atleast_1d(_f(a))
            for a in (throughput_kwh_per_year, capacity_kwh, dod, c_rate, mean_soc)
        )
    )
    rate_kwh, capacity, dod_v, c_rate_v, soc_v = (a[:, None] for a in per_vehicle)
    temp = _f(temperature_c)
    efc = equivalent_full_cycles(rate_kwh * t_years, capacity)
    if temp.ndim > 1:
        one_day = model.calendar_fade(1.0, temp, soc_v).mean(axis=-1, keepdims=True)
        cal = one_day * (t_years * _DAYS_PER_YEAR) ** model.calendar_time_exponent
    else:
        cal = model.calendar_fade(t_years * _DAYS_PER_YEAR, np.atleast_1d(temp)[:, None], soc_v)
    cyc = model.cycle_fade(efc, dod_v, c_rate_v, soc_v)
    return _f(np.clip(1.0 - degradation_scale * (cal + cyc), 0.0, 1.0))
