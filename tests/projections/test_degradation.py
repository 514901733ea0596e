"""Capacity fade: the published equations, vectorisation over a fleet, cost and warranty."""

import math

import numpy as np
import pytest

from projections.degradation import (
    NAUMANN_LFP,
    SCHMALSTIEG_2014,
    FleetUsage,
    assess_fleet,
    cycle_life_efc,
    degradation_cost_eur,
    equivalent_full_cycles,
    soh_trajectory,
    thermal_throughput_factor,
    throughput_cost_eur_per_kwh,
    warranty_consumption,
)


def test_schmalstieg_2014_calendar_equation_and_published_coefficients():
    """Schmalstieg et al., J. Power Sources 257 (2014) 325-334, calendar capacity term:

    alpha_cap = (7.543 V - 23.75) 1e6 exp(-6976 / T), fade = alpha_cap t^0.75 (t in days).
    Worked by hand for storage at 4.1 V and 50 degC (the paper's calendar tests ran at
    50 degC): alpha = 7.1763e6 x exp(-21.5875) = 3.024e-3 per day^0.75, and a year
    (365^0.75 = 83.51) loses 25.3 % of capacity.
    """
    alpha = (7.543 * 4.1 - 23.75) * 1e6 * math.exp(-6976 / 323.15)
    assert SCHMALSTIEG_2014.alpha_cap(4.1, 50.0) == pytest.approx(alpha, rel=1e-12)
    assert alpha == pytest.approx(3.024e-3, rel=1e-3)
    soc_at_4_1_v = np.interp(4.1, SCHMALSTIEG_2014.ocv_v, SCHMALSTIEG_2014.ocv_soc)
    year = SCHMALSTIEG_2014.calendar_fade(365.0, 50.0, soc_at_4_1_v)
    assert year == pytest.approx(alpha * 365**0.75, rel=1e-9)
    assert year == pytest.approx(0.2525, abs=1e-4)
    # The same cell at 25 degC ages exp(6976 (1/298.15 - 1/323.15)) = 6.1x slower.
    ratio = SCHMALSTIEG_2014.alpha_cap(4.1, 50.0) / SCHMALSTIEG_2014.alpha_cap(4.1, 25.0)
    assert ratio == pytest.approx(math.exp(6976 * (1 / 298.15 - 1 / 323.15)), rel=1e-12)
    assert ratio == pytest.approx(6.12, abs=0.01)


def test_schmalstieg_2014_cycle_equation_and_published_coefficients():
    """beta_cap = 7.348e-3 (V - 3.667)^2 + 7.600e-4 + 4.081e-3 DOD, fade = beta_cap sqrt(Q).

    At the paper's minimum-stress voltage, 3.667 V, only the constant and the DOD term
    remain: 100 % DOD gives beta = 4.841e-3 per sqrt(Ah). 500 EFC of the 2.05 Ah cell is
    Q = 2 x 2.05 x 500 = 2050 Ah of throughput.
    """
    assert SCHMALSTIEG_2014.beta_cap(3.667, 1.0) == pytest.approx(4.841e-3, rel=1e-12)
    beta_40 = 7.348e-3 * (3.9 - 3.667) ** 2 + 7.600e-4 + 4.081e-3 * 0.4
    assert SCHMALSTIEG_2014.beta_cap(3.9, 0.4) == pytest.approx(beta_40, rel=1e-12)
    soc_for_3_9_v = np.interp(3.9, SCHMALSTIEG_2014.ocv_v, SCHMALSTIEG_2014.ocv_soc)
    fade = SCHMALSTIEG_2014.cycle_fade(500, 0.4, 1.0, soc_for_3_9_v)
    assert fade == pytest.approx(beta_40 * math.sqrt(2050.0), rel=1e-9)


def test_naumann_lfp_equations_by_hand():
    """Naumann et al. 2018 (J. Energy Storage 17:153) calendar, 2020 (J. Power Sources
    451:227666) cycle. At the calendar reference, 25 degC and SOC 0.5, k_T = 1.2571e-5 and
    k_SOC = 0.60225: one year (365.25 d) loses 1.2571e-5 x 0.60225 x sqrt(31,557,600 s)
    = 4.25 %. Cycling at 1C and 60 % DOD: 0.01 x 0.1601 x 1.0923 x sqrt(1000) = 5.53 %.
    """
    year = NAUMANN_LFP.calendar_fade(365.25, 25.0, 0.5)
    assert year == pytest.approx(1.2571e-5 * 0.60225 * math.sqrt(31_557_600), rel=1e-12)
    assert year == pytest.approx(0.0425, abs=5e-5)
    cyc = NAUMANN_LFP.cycle_fade(1000, 0.6, 1.0, 0.5)
    assert cyc == pytest.approx(0.01 * 0.1601 * 1.0923 * math.sqrt(1000), rel=1e-12)


def test_calendar_fade_rises_with_temperature_and_soc():
    temps = np.array([0.0, 25.0, 40.0])
    assert np.all(np.diff(SCHMALSTIEG_2014.calendar_fade(365, temps, 0.5)) > 0)
    assert np.all(np.diff(NAUMANN_LFP.calendar_fade(365, temps, 0.5)) > 0)
    socs = np.array([0.3, 0.6, 0.9])
    assert np.all(np.diff(SCHMALSTIEG_2014.calendar_fade(365, 25.0, socs)) > 0)


def _usage(**override):
    base = dict(
        capacity_kwh=[60.0, 77.0, 50.0],
        throughput_kwh=[20_000.0, 30_000.0, 5_000.0],
        dod=[0.3, 0.5, 0.2],
        c_rate=[0.2, 0.5, 0.1],
        temperature_c=[20.0, 30.0, 10.0],
        elapsed_days=[730.0, 1000.0, 365.0],
        mean_soc=[0.6, 0.7, 0.5],
        replacement_cost_eur=[9_000.0, 11_000.0, 7_500.0],
        warranty_throughput_kwh=60_000.0,
        warranty_years=8.0,
    )
    base.update(override)
    return FleetUsage.of(**base)


@pytest.mark.parametrize("model", [SCHMALSTIEG_2014, NAUMANN_LFP], ids=lambda m: m.name[:8])
def test_one_fleet_call_equals_one_call_per_vehicle(model):
    usage = _usage()
    fleet = assess_fleet(usage, model)
    for i in range(3):
        one = assess_fleet(
            FleetUsage.of(
                **{k: np.asarray(getattr(usage, k))[i] for k in usage.__dataclass_fields__}
            ),
            model,
        )
        assert float(one.capacity_fade) == pytest.approx(fleet.capacity_fade[i], rel=1e-12)
    efc = equivalent_full_cycles(usage.throughput_kwh, usage.capacity_kwh)
    expected = model.calendar_fade(usage.elapsed_days, usage.temperature_c, usage.mean_soc)
    expected = expected + model.cycle_fade(efc, usage.dod, usage.c_rate, usage.mean_soc)
    np.testing.assert_allclose(fleet.capacity_fade, expected, rtol=1e-12)
    np.testing.assert_allclose(fleet.soh, 1.0 - expected, rtol=1e-12)


def test_temperature_history_averages_the_rate_not_the_temperature():
    steady = assess_fleet(_usage(temperature_c=[[25.0, 25.0]] * 3))
    flat = assess_fleet(_usage(temperature_c=[25.0] * 3))
    np.testing.assert_allclose(steady.calendar_fade, flat.calendar_fade, rtol=1e-12)
    # 10 and 40 degC half the time each: Arrhenius is convex, so this ages faster than 25.
    swing = assess_fleet(_usage(temperature_c=[[10.0, 40.0]] * 3))
    assert np.all(swing.calendar_fade > flat.calendar_fade)
    np.testing.assert_allclose(swing.thermal_throughput_factor, [0.875] * 3)


def test_money_and_warranty_by_hand():
    # 5 % fade of a 9,000 EUR pack that is worn out at 20 % fade: a quarter of the pack.
    assert degradation_cost_eur(0.05, 9_000.0) == pytest.approx(2_250.0)
    with pytest.raises(ValueError, match="eol_fade"):
        degradation_cost_eur(0.05, 9_000.0, eol_fade=0.0)
    # LFP at 1C, 60 % DOD: fade per sqrt(EFC) k = 0.01 x 0.1601 x 1.0923 = 1.74877e-3,
    # so 20 % fade takes (0.2 / k)^2 = 13,079.6 EFC; at 150 EUR/kWh each kWh in or out
    # costs 150 / (2 x 13,079.6) = 0.5734 cents.
    life = cycle_life_efc(NAUMANN_LFP, dod=0.6, c_rate=1.0)
    assert life == pytest.approx((0.2 / (0.01 * 0.1601 * 1.0923)) ** 2, rel=1e-12)
    assert life == pytest.approx(13_079.6, abs=0.1)
    assert throughput_cost_eur_per_kwh(150.0, life) == pytest.approx(0.005734, abs=1e-6)
    energy, time = warranty_consumption(30_000.0, 60_000.0, 2.0, 8.0)
    assert (energy, time) == (0.5, 0.25)


def test_thermal_throughput_factor_shape():
    factor = thermal_throughput_factor([-30.0, -5.0, 10.0, 22.5, 35.0, 45.0, 60.0])
    np.testing.assert_allclose(factor, [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_soh_trajectory_matches_the_point_assessment_and_never_rises():
    years = np.arange(0, 11, dtype=float)
    soh = soh_trajectory(
        years,
        throughput_kwh_per_year=[8_000.0, 12_000.0],
        capacity_kwh=[60.0, 77.0],
        dod=0.3,
        c_rate=0.2,
        temperature_c=[20.0, 25.0],
        mean_soc=0.6,
    )
    assert soh.shape == (2, 11)
    np.testing.assert_array_equal(soh[:, 0], [1.0, 1.0])
    assert np.all(np.diff(soh, axis=1) <= 0)
    at_ten = assess_fleet(
        FleetUsage.of(
            capacity_kwh=[60.0, 77.0],
            throughput_kwh=[80_000.0, 120_000.0],
            dod=0.3,
            c_rate=0.2,
            temperature_c=[20.0, 25.0],
            elapsed_days=3652.5,
            mean_soc=0.6,
            replacement_cost_eur=9_000.0,
            warranty_throughput_kwh=1.0,
            warranty_years=1.0,
        )
    )
    np.testing.assert_allclose(soh[:, -1], at_ten.soh, rtol=1e-12)


def test_degradation_scale_multiplies_fade():
    full = assess_fleet(_usage())
    half = assess_fleet(_usage(), degradation_scale=0.5)
    np.testing.assert_allclose(half.capacity_fade, full.capacity_fade / 2, rtol=1e-12)


@pytest.mark.parametrize("model", [SCHMALSTIEG_2014, NAUMANN_LFP], ids=lambda m: m.name[:8])
def test_a_new_pack_costs_all_its_fade_split_into_calendar_and_cycle(model):
    r = assess_fleet(_usage(), model)
    cost = degradation_cost_eur(r.capacity_fade, _usage().replacement_cost_eur)
    np.testing.assert_allclose(r.degradation_cost_eur, cost, rtol=1e-12)
    np.testing.assert_allclose(
        r.calendar_cost_eur, degradation_cost_eur(r.calendar_fade, [9_000.0, 11_000.0, 7_500.0])
    )
    np.testing.assert_allclose(r.degradation_cost_eur, r.calendar_cost_eur + r.cycle_cost_eur)


@pytest.mark.parametrize("model", [SCHMALSTIEG_2014, NAUMANN_LFP], ids=lambda m: m.name[:8])
@pytest.mark.parametrize("temperature_c", [[20.0, 30.0, 10.0], [[10.0, 30.0]] * 3])
def test_a_used_pack_costs_the_fade_since_its_prior_point(model, temperature_c):
    """Two points of the same pack: the period costs the fade between them, term by term."""
    prior_days = np.array([730.0, 365.0, 1400.0])
    prior_kwh = np.array([15_000.0, 4_000.0, 40_000.0])
    week_kwh = np.array([120.0, 300.0, 0.0])
    week = _usage(
        temperature_c=temperature_c,
        elapsed_days=prior_days + 7,
        throughput_kwh=prior_kwh + week_kwh,
        prior_elapsed_days=prior_days,
        prior_throughput_kwh=prior_kwh,
    )
    before = _usage(temperature_c=temperature_c, elapsed_days=prior_days, throughput_kwh=prior_kwh)
    r, then = assess_fleet(week, model), assess_fleet(before, model)

    def cost(fade: np.ndarray) -> np.ndarray:
        return degradation_cost_eur(fade, week.replacement_cost_eur)

    np.testing.assert_allclose(r.calendar_cost_eur, cost(r.calendar_fade - then.calendar_fade))
    np.testing.assert_allclose(r.cycle_cost_eur, cost(r.cycle_fade - then.cycle_fade))
    assert r.cycle_cost_eur[2] == 0.0  # no throughput in the period: no cycle wear
    # fade and SoH are of the pack since new, whatever period is priced
    since_new = _usage(
        temperature_c=temperature_c,
        elapsed_days=prior_days + 7,
        throughput_kwh=prior_kwh + week_kwh,
    )
    np.testing.assert_allclose(r.soh, assess_fleet(since_new, model).soh, rtol=1e-12)


def test_the_same_week_costs_less_the_older_the_pack():
    """Both terms are concave in time and throughput: marginal wear falls with history."""
    ages = np.array([0.0, 365.0, 730.0, 1460.0])
    kwh = ages * 6_000.0 / 365.25  # 6,000 kWh through the battery a year
    r = assess_fleet(
        FleetUsage.of(
            capacity_kwh=60.0,
            throughput_kwh=kwh + 150.0,
            dod=0.3,
            c_rate=0.2,
            temperature_c=20.0,
            elapsed_days=ages + 7,
            mean_soc=0.6,
            replacement_cost_eur=9_000.0,
            warranty_throughput_kwh=60_000.0,
            warranty_years=8.0,
            prior_throughput_kwh=kwh,
            prior_elapsed_days=ages,
        )
    )
    assert np.all(np.diff(r.calendar_cost_eur) < 0)
    assert np.all(np.diff(r.cycle_cost_eur) < 0)
