"""A small backtest on a real local Ray: a few vehicles, real 2024 prices, two days."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cluster.backtest import run_backtest
from events.log import EventLog

pytestmark = pytest.mark.ray


def test_a_two_day_backtest_has_no_violations_and_prices_its_energy(ray_session, tmp_path):
    report = run_backtest(
        str(tmp_path), datetime(2024, 3, 11, tzinfo=UTC), days=2, vehicles=6, sites=2
    )
    assert report.violations == 0
    assert report.sessions >= 6 and report.departures >= 1
    assert report.energy_charged_kwh > 0
    # revenue is net export x the published price, from the log's own events
    assert report.revenue_eur == pytest.approx(report.arbitrage_eur + report.grid_services_eur)
    assert report.degradation_cost_eur == pytest.approx(
        0.02 * (report.energy_charged_kwh + report.energy_discharged_kwh), abs=1e-3
    )
    with EventLog(str(tmp_path / "log")) as log:  # an ordinary log: it reopens and reads
        assert log.read_all().num_rows == report.events
