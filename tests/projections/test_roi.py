"""ROI formulas against hand calculations; config validation; the Monte Carlo."""

import copy
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from projections.roi import (
    cash_flows,
    evaluate,
    irr,
    irr_roots,
    monte_carlo,
    npv,
    payback_years,
)
from projections.roi_config import RoiConfigError, load_roi_config, parse_roi_config

EXAMPLE = Path(__file__).resolve().parents[2] / "projections" / "roi_example.toml"

# A small project whose cash flows are easy to work out by hand (see test_cash_flows...).
HAND = {
    "capex": {
        "charger_count": 10,
        "charger_unit_eur": 1000.0,
        "inverter_count": 2,
        "inverter_unit_eur": 500.0,
        "installation_eur": 3000.0,
    },
    "opex": {"yearly_eur": 1000.0, "escalation_rate": 0.10},
    "battery": {
        "vehicle_count": 5,
        "replacement_cost_eur": 8000.0,
        "eol_fade": 0.2,
        "v2g_fade_per_year": 0.01,
    },
    "revenue": {"arbitrage_eur": 3000.0, "regulation_eur": 2000.0, "peak_shaving_eur": 1000.0},
    "seasonal_weights": {"winter": 0.25, "spring": 0.25, "summer": 0.25, "autumn": 0.25},
    "finance": {"discount_rate": 0.05, "horizon_years": 3},
}


def _config(**sections):
    data = copy.deepcopy(HAND)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_roi_config(data)


# --- formulas --------------------------------------------------------------------------


def test_npv_of_an_annuity():
    # -1000 now, then 300 a year for 5 years at 10 %: annuity factor (1 - 1.1^-5) / 0.1
    # = 3.790787, so NPV = -1000 + 300 x 3.790787 = 137.236.
    flows = [-1000.0] + [300.0] * 5
    assert npv(flows, 0.10) == pytest.approx(137.2360, abs=1e-4)
    assert npv(flows, 0.0) == pytest.approx(500.0)


def test_npv_is_vectorised_over_leading_axes():
    flows = np.array([[-100.0, 110.0], [-100.0, 121.0]])
    np.testing.assert_allclose(npv(flows, 0.10), [0.0, 10.0], atol=1e-12)


def test_irr_known_values_and_substitution():
    assert irr([-100.0, 110.0]) == pytest.approx(0.10, abs=1e-10)
    assert irr([-100.0, 0.0, 121.0]) == pytest.approx(0.10, abs=1e-10)
    flows = [-1000.0] + [300.0] * 5
    rate = irr(flows)
    assert rate == pytest.approx(0.152382, abs=1e-6)
    assert npv(flows, rate) == pytest.approx(0.0, abs=1e-7)  # substituted back


def test_irr_can_be_negative():
    # Gets back 90 of 100: (1 + r) = 0.9.
    assert irr([-100.0, 90.0]) == pytest.approx(-0.10, abs=1e-10)


def test_no_irr_when_flows_never_change_sign():
    assert irr([-100.0, -10.0, -5.0]) is None
    assert irr([100.0, 10.0]) is None
    assert irr_roots([0.0, 0.0]) == []


def test_several_irrs_are_reported_not_chosen():
    # NPV x (1+r)^2 = -100 (1+r)^2 + 230 (1+r) - 132 = 0 has roots 1+r = 1.1 and 1.2.
    flows = [-100.0, 230.0, -132.0]
    np.testing.assert_allclose(irr_roots(flows), [0.10, 0.20], atol=1e-10)
    assert irr(flows) is None


def test_payback_counted_by_hand():
    # Cumulative: -1000, -700, -400, -100, +200: paid back a third into year 4.
    assert payback_years([-1000.0, 300.0, 300.0, 300.0, 300.0]) == pytest.approx(10 / 3)
    assert payback_years([-1000.0, 500.0, 500.0]) == pytest.approx(2.0)
    assert payback_years([-1000.0, 100.0, 100.0]) is None
    assert payback_years([0.0, 100.0]) == 0.0


def test_cash_flows_of_a_hand_checked_project():
    flows = cash_flows(_config())
    # CAPEX 10 x 1000 + 2 x 500 + 3000 = 14,000. OPEX 1000 rising 10 %: 1000, 1100, 1210.
    # Wear: 5 vans x 8000 EUR x 1 % fade / 20 % = 2000 a year. Revenue 6000 a year.
    assert flows.capex_eur == 14_000.0
    np.testing.assert_allclose(flows.opex_eur, [1000.0, 1100.0, 1210.0])
    np.testing.assert_allclose(flows.degradation_eur, [2000.0] * 3)
    np.testing.assert_allclose(flows.net_eur, [-14_000.0, 3000.0, 2900.0, 2790.0])
    result = evaluate(_config(), with_monte_carlo=False)
    expected = -14_000 + 3000 / 1.05 + 2900 / 1.05**2 + 2790 / 1.05**3
    assert result.npv_eur == pytest.approx(expected)
    assert result.payback_years is None  # 8,690 back of 14,000 after 3 years
    assert result.irr is not None and result.irr < 0
    assert npv(flows.net_eur, result.irr) == pytest.approx(0.0, abs=1e-6)


def test_yearly_lists_are_used_year_by_year():
    cfg = _config(revenue={"arbitrage_eur": [1000.0, 2000.0, 3000.0]})
    np.testing.assert_allclose(
        cash_flows(cfg).revenue_by_stream_eur["arbitrage"], [1000.0, 2000.0, 3000.0]
    )


def test_the_result_says_why_there_is_no_irr():
    losing = _config(revenue={"arbitrage_eur": 0.0, "regulation_eur": 0.0})
    result = evaluate(losing, with_monte_carlo=False)
    assert result.irr is None
    assert "never change sign" in result.irr_note


# --- config ----------------------------------------------------------------------------


def test_example_config_loads_and_evaluates():
    cfg = load_roi_config(EXAMPLE)
    assert cfg.finance.horizon_years == 10
    assert cfg.monte_carlo.iterations == 10_000
    result = evaluate(cfg)
    assert result.monte_carlo is not None
    assert result.cash_flows.net_eur.shape == (11,)


def test_unknown_key_is_named_with_its_value():
    data = copy.deepcopy(HAND)
    data["finance"]["discount_rat"] = 0.07
    with pytest.raises(RoiConfigError, match=r"finance\.discount_rat: unknown key \(value 0\.07\)"):
        parse_roi_config(data)


def test_bad_value_is_named_with_its_value():
    data = copy.deepcopy(HAND)
    data["finance"]["discount_rate"] = 1.5
    data["capex"]["charger_count"] = -3
    with pytest.raises(RoiConfigError) as caught:
        parse_roi_config(data)
    message = str(caught.value)
    assert "finance.discount_rate = 1.5" in message
    assert "capex.charger_count = -3" in message


def test_missing_section_and_bad_weights_and_list_length():
    data = copy.deepcopy(HAND)
    del data["opex"]
    with pytest.raises(RoiConfigError, match="opex: required key is missing"):
        parse_roi_config(data)
    with pytest.raises(RoiConfigError, match="sum to 1"):
        _config(seasonal_weights={"winter": 0.5})
    with pytest.raises(RoiConfigError, match=r"revenue\.regulation_eur has 2 yearly values"):
        _config(revenue={"regulation_eur": [1.0, 2.0]})


def test_unreadable_files_give_a_clear_error(tmp_path):
    with pytest.raises(RoiConfigError, match="cannot read"):
        load_roi_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[capex\n")
    with pytest.raises(RoiConfigError, match="not valid TOML"):
        load_roi_config(broken)


def test_example_file_is_plain_toml():
    with EXAMPLE.open("rb") as fh:
        assert set(tomllib.load(fh)) >= {"capex", "opex", "battery", "revenue", "finance"}


# --- Monte Carlo -----------------------------------------------------------------------


def test_zero_volatility_monte_carlo_is_the_deterministic_npv():
    cfg = _config(monte_carlo={"iterations": 500, "availability_mean": 0.8})
    deterministic = evaluate(cfg, with_monte_carlo=False).npv_eur
    mc = monte_carlo(cfg)
    np.testing.assert_allclose(mc.npv_eur, deterministic, rtol=1e-12)
    assert mc.p10_eur == pytest.approx(deterministic)
    assert mc.p90_eur == pytest.approx(deterministic)
    assert mc.probability_positive == float(deterministic > 0)


def test_monte_carlo_is_reproducible_from_its_seed():
    cfg = _config(
        monte_carlo={"price_volatility": 0.3, "availability_sd": 0.1, "availability_mean": 0.8}
    )
    a, b = monte_carlo(cfg, seed=7), monte_carlo(cfg, seed=7)
    np.testing.assert_array_equal(a.npv_eur, b.npv_eur)
    assert not np.array_equal(a.npv_eur, monte_carlo(cfg, seed=8).npv_eur)


def test_price_noise_has_mean_one_so_the_mean_npv_is_unbiased():
    cfg = _config(monte_carlo={"price_volatility": 0.5, "degradation_sd": 0.5})
    deterministic = evaluate(cfg, with_monte_carlo=False).npv_eur
    mc = monte_carlo(cfg, iterations=40_000, seed=1)
    standard_error = mc.npv_eur.std() / np.sqrt(mc.npv_eur.size)
    assert abs(mc.npv_eur.mean() - deterministic) < 4 * standard_error
    assert mc.p10_eur < mc.p50_eur < mc.p90_eur


def test_ten_thousand_iterations_are_fast():
    cfg = load_roi_config(EXAMPLE)
    monte_carlo(cfg)  # warm-up
    start = time.perf_counter()
    mc = monte_carlo(cfg)
    elapsed_s = time.perf_counter() - start
    assert mc.npv_eur.shape == (10_000,)
    # The target is 100 ms (scripts/bench_monte_carlo.py measures it); the test allows
    # slack for a loaded CI machine.
    assert elapsed_s < 1.0
