"""The ROI report: a summary table and four PNG charts, from the projections and a config.

``roi_report(config_path, db_path, out_dir)`` writes ``out_dir/summary.txt`` and

- ``cash_flows.png``: the config's yearly net cash flows (year 0 = investment);
- ``npv_distribution.png``: the Monte Carlo NPVs with P10 / P50 / P90;
- ``revenue_by_stream.png``: revenue per stream per calendar year as the revenue
  projection holds it; if it holds none yet, the config's expected revenue per project
  year (the summary says which);
- ``fleet_soh.png``: each vehicle's projected state of health by age, from the
  degradation projection (skipped, and said so, when it has no vehicle).

Regulation capacity and energy are shown as one stream, ``regulation``, as in the ROI
config.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
from rich.console import Console
from rich.table import Table

from projections.charts import (
    write_cash_flow_chart,
    write_fleet_soh_chart,
    write_npv_distribution_chart,
    write_revenue_by_stream_chart,
)
from projections.roi import RoiResult, evaluate
from projections.roi_config import load_roi_config

__all__ = ["RoiReport", "roi_report"]

_STREAMS = ("arbitrage", "regulation", "peak_shaving")


@dataclass(frozen=True)
class RoiReport:
    result: RoiResult
    summary: dict[str, str]
    charts: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    text: str = ""


def _fmt_eur(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} EUR"


def _observed_revenue(con: duckdb.DuckDBPyConnection) -> dict[str, np.ndarray]:
    rows = con.execute("""
        SELECT year(interval_start) AS year,
               CASE WHEN stream LIKE 'regulation%' THEN 'regulation' ELSE stream END AS stream,
               CAST(coalesce(sum(revenue_eur), 0) AS DOUBLE) AS eur
        FROM revenue_lines GROUP BY ALL ORDER BY year, stream
    """).fetchall()
    if not rows:
        return {}
    years = sorted({int(r[0]) for r in rows})
    table = {"year": np.asarray(years, dtype=float)}
    for s in _STREAMS:
        table[s] = np.zeros(len(years))
    for year, stream, eur in rows:
        if stream in table:
            table[stream][years.index(int(year))] += float(eur)
    return table


def _fleet_soh(con: duckdb.DuckDBPyConnection) -> tuple[np.ndarray, np.ndarray] | None:
    rows = con.execute(
        "SELECT vehicle_id, age_years, soh FROM degradation_soh_trajectory "
        "ORDER BY vehicle_id, age_years"
    ).fetchall()
    if not rows:
        return None
    years = sorted({int(r[1]) for r in rows})
    vehicles = sorted({str(r[0]) for r in rows})
    soh = np.full((len(vehicles), len(years) + 1), np.nan)
    soh[:, 0] = 1.0  # new
    for v, y, s in rows:
        soh[vehicles.index(str(v)), years.index(int(y)) + 1] = float(s)
    return np.asarray([0, *years], dtype=float), soh


def roi_report(
    config_path: str | os.PathLike[str],
    db_path: str,
    out_dir: str | os.PathLike[str],
    *,
    console: Console | None = None,
) -> RoiReport:
    """Evaluate the ROI config, read the projections, write the charts and the summary.

    Args:
        config_path: the ROI TOML (see ``projections/roi_example.toml``).
        db_path: the projection database (read-only).
        out_dir: folder for ``summary.txt`` and the PNGs (created if missing).
        console: where to print the summary table (default: standard output).

    Raises:
        projections.roi_config.RoiConfigError: the config is missing or invalid.
        FileNotFoundError: there is no database at ``db_path``.

    Example::

        roi_report("projections/roi_example.toml", "var/projections.duckdb", "var/report")
    """
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"no projection database at {db_path!r}; run a replay first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = load_roi_config(config_path)
    result = evaluate(config)
    flows = result.cash_flows
    notes: list[str] = []
    charts: dict[str, Path] = {}
    with duckdb.connect(db_path, read_only=True) as con:
        observed = _observed_revenue(con)
        soh = _fleet_soh(con)
        [(vehicles, cost, mean_soh)] = con.execute(
            "SELECT count(*), CAST(coalesce(sum(degradation_cost_eur), 0) AS DOUBLE), "
            "CAST(avg(soh) AS DOUBLE) FROM degradation"
        ).fetchall()
    years = np.arange(0, flows.years.size + 1, dtype=float)
    charts["cash_flows"] = write_cash_flow_chart(years, flows.net_eur, out / "cash_flows.png")
    mc = result.monte_carlo
    assert mc is not None
    charts["npv_distribution"] = write_npv_distribution_chart(
        mc.npv_eur, out / "npv_distribution.png"
    )
    if observed:
        revenue_table = observed
        revenue_title = "Revenue by stream (revenue projection)"
    else:
        revenue_table = {"year": flows.years, **flows.revenue_by_stream_eur}
        revenue_title = "Revenue by stream (expected, from the ROI config)"
        notes.append("the revenue projection holds no revenue yet: the chart shows the config")
    charts["revenue_by_stream"] = write_revenue_by_stream_chart(
        revenue_table, out / "revenue_by_stream.png", title=revenue_title
    )
    if soh is not None:
        charts["fleet_soh"] = write_fleet_soh_chart(
            soh[0], soh[1], out / "fleet_soh.png", eol_soh=1.0 - config.battery.eol_fade
        )
    else:
        notes.append("the degradation projection holds no vehicle: no fleet SoH chart")

    summary = {
        "CAPEX": _fmt_eur(flows.capex_eur),
        "NPV": _fmt_eur(result.npv_eur),
        "IRR": "n/a" if result.irr is None else f"{result.irr:.1%}",
        "IRR note": result.irr_note,
        "payback": "never" if result.payback_years is None else f"{result.payback_years:.1f} y",
        "discounted payback": (
            "never"
            if result.discounted_payback_years is None
            else f"{result.discounted_payback_years:.1f} y"
        ),
        "Monte Carlo P10 / P50 / P90": (
            f"{mc.p10_eur:,.0f} / {mc.p50_eur:,.0f} / {mc.p90_eur:,.0f} EUR"
        ),
        "P(NPV > 0)": f"{mc.probability_positive:.1%} of {mc.iterations:,}",
    }
    for stream in _STREAMS:
        total = float(np.sum(observed.get(stream, 0.0))) if observed else 0.0
        summary[f"observed {stream}"] = f"{total:,.2f} EUR" if observed else "none yet"
    summary["vehicles in projection"] = str(int(vehicles))
    summary["fleet mean SoH"] = "n/a" if mean_soh is None else f"{float(mean_soh):.1%}"
    summary["degradation cost to date"] = f"{float(cost):,.2f} EUR"

    table = Table(title="V2G depot ROI")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, v)
    buffer = Console(file=io.StringIO(), width=100, record=True)
    buffer.print(table)
    for n in notes:
        buffer.print(f"note: {n}")
    text = buffer.export_text()
    (out / "summary.txt").write_text(text)
    (console or Console()).print(table)
    return RoiReport(result, summary, charts, notes, text)
