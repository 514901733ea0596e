"""Each chart writer produces a valid, non-empty PNG."""

import numpy as np
import pyarrow as pa
import pytest

from projections.charts import (
    write_cash_flow_chart,
    write_fleet_soh_chart,
    write_npv_distribution_chart,
    write_revenue_by_stream_chart,
)
from projections.degradation import soh_trajectory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # a real plot, not an empty canvas
    assert data.endswith(b"IEND\xaeB`\x82")


def test_cash_flow_chart(tmp_path):
    flows = [-50_000.0] + [8_000.0] * 10
    _assert_png(write_cash_flow_chart(np.arange(11), flows, tmp_path / "cash.png"))


def test_npv_distribution_chart(tmp_path):
    npvs = np.random.default_rng(0).normal(10_000.0, 20_000.0, 10_000)
    _assert_png(write_npv_distribution_chart(npvs, tmp_path / "sub" / "npv.png"))


def test_revenue_chart_from_a_pyarrow_table_and_from_arrays(tmp_path):
    table = pa.table(
        {
            "year": list(range(1, 11)),
            "arbitrage": [6_000.0] * 10,
            "regulation": [8_000.0] * 10,
            "peak_shaving": [2_000.0] * 10,
        }
    )
    _assert_png(write_revenue_by_stream_chart(table, tmp_path / "revenue.png"))
    arrays = {"year": np.arange(1, 4), "arbitrage": np.array([1.0, 2.0, 3.0])}
    _assert_png(write_revenue_by_stream_chart(arrays, tmp_path / "revenue2.png"))
    with pytest.raises(ValueError, match="'year' column"):
        write_revenue_by_stream_chart({"arbitrage": [1.0]}, tmp_path / "bad.png")


def test_fleet_soh_chart(tmp_path):
    rng = np.random.default_rng(1)
    n = 200
    years = np.arange(0, 11, dtype=float)
    soh = soh_trajectory(
        years,
        throughput_kwh_per_year=rng.uniform(4_000, 15_000, n),
        capacity_kwh=rng.choice([50.0, 60.0, 77.0], n),
        dod=rng.uniform(0.1, 0.5, n),
        c_rate=0.2,
        temperature_c=rng.uniform(10, 30, n),
        mean_soc=rng.uniform(0.4, 0.8, n),
    )
    _assert_png(write_fleet_soh_chart(years, soh, tmp_path / "soh.png"))
