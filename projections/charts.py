"""PNG charts for ROI and degradation reports (matplotlib, Agg backend, no display needed).

Each writer takes plain arrays (or a pyarrow table), writes one PNG and returns its path.
Figures are created and closed explicitly, so writing many charts leaks nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from numpy.typing import ArrayLike

__all__ = [
    "write_cash_flow_chart",
    "write_fleet_soh_chart",
    "write_npv_distribution_chart",
    "write_revenue_by_stream_chart",
]

_DPI: Final = 120
_SIZE_IN: Final = (8.0, 4.5)
_EUR = FuncFormatter(lambda v, _pos: f"{v / 1000:,.0f}k" if abs(v) >= 1000 else f"{v:,.0f}")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, format="png")
    plt.close(fig)
    return path


def write_cash_flow_chart(
    years: ArrayLike, net_cash_flow_eur: ArrayLike, path: str | Path, *, title: str = ""
) -> Path:
    """Bars of each year's net cash flow (year 0 = investment) and the cumulative line."""
    x = np.asarray(years, dtype=float)
    flows = np.asarray(net_cash_flow_eur, dtype=float)
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    colours = np.where(flows >= 0, "#2a9d8f", "#e76f51")
    ax.bar(x, flows, color=colours, label="net cash flow")
    ax.plot(x, np.cumsum(flows), color="#264653", marker="o", label="cumulative")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("year")
    ax.set_ylabel("EUR")
    ax.yaxis.set_major_formatter(_EUR)
    ax.set_xticks(x)
    ax.set_title(title or "Yearly cash flows")
    ax.legend(loc="best")
    return _save(fig, path)


def write_npv_distribution_chart(
    npv_eur: ArrayLike, path: str | Path, *, title: str = "", bins: int = 60
) -> Path:
    """Histogram of Monte Carlo NPVs with P10, P50 and P90 marked and P(NPV > 0) stated."""
    values = np.asarray(npv_eur, dtype=float)
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    ax.hist(values, bins=bins, color="#8ab17d", edgecolor="white")
    for value, label, style in ((p10, "P10", ":"), (p50, "P50", "-"), (p90, "P90", "--")):
        ax.axvline(value, color="#264653", linestyle=style, label=f"{label} {value:,.0f} EUR")
    ax.axvline(0.0, color="#e76f51", linewidth=1.0, label="NPV = 0")
    ax.set_xlabel("NPV (EUR)")
    ax.set_ylabel("iterations")
    ax.xaxis.set_major_formatter(_EUR)
    share = float(np.mean(values > 0.0))
    ax.set_title(title or f"NPV distribution, {values.size:,} iterations, P(NPV > 0) = {share:.1%}")
    ax.legend(loc="best")
    return _save(fig, path)


def _columns(table: pa.Table | Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    if isinstance(table, pa.Table):
        return {name: table.column(name).to_numpy() for name in table.column_names}
    return {name: np.asarray(values) for name, values in table.items()}


def write_revenue_by_stream_chart(
    table: pa.Table | Mapping[str, ArrayLike],
    path: str | Path,
    *,
    year_column: str = "year",
    title: str = "",
) -> Path:
    """Stacked bars of revenue per stream per year.

    ``table`` has a ``year`` column and one EUR column per stream (e.g. ``arbitrage``,
    ``regulation``, ``peak_shaving``), as a pyarrow table or a mapping of arrays.
    """
    columns = _columns(table)
    if year_column not in columns:
        raise ValueError(f"revenue table needs a {year_column!r} column, has {sorted(columns)}")
    years = columns.pop(year_column).astype(float)
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    bottom = np.zeros_like(years)
    for name, values in columns.items():
        values = values.astype(float)
        ax.bar(years, values, bottom=bottom, label=name.replace("_", " "))
        bottom = bottom + values
    ax.set_xlabel("year")
    ax.set_ylabel("revenue (EUR)")
    ax.yaxis.set_major_formatter(_EUR)
    ax.set_xticks(years)
    ax.set_title(title or "Revenue by stream")
    ax.legend(loc="best")
    return _save(fig, path)


def write_fleet_soh_chart(
    years: ArrayLike,
    soh: ArrayLike,
    path: str | Path,
    *,
    eol_soh: float = 0.8,
    title: str = "",
    max_vehicle_lines: int = 30,
) -> Path:
    """Fleet state of health: P10-P90 band, median, some vehicles, the end-of-life line.

    ``soh`` has shape (n_vehicles, n_years), as from ``degradation.soh_trajectory``.
    """
    x = np.asarray(years, dtype=float)
    health = np.atleast_2d(np.asarray(soh, dtype=float))
    fig, ax = plt.subplots(figsize=_SIZE_IN)
    for row in health[:max_vehicle_lines]:
        ax.plot(x, row * 100, color="#adb5bd", linewidth=0.6, alpha=0.6)
    p10, p50, p90 = np.percentile(health, [10, 50, 90], axis=0) * 100
    ax.fill_between(x, p10, p90, color="#2a9d8f", alpha=0.25, label="P10-P90 of fleet")
    ax.plot(x, p50, color="#264653", linewidth=2, label="median vehicle")
    ax.axhline(eol_soh * 100, color="#e76f51", linestyle="--", label=f"end of life {eol_soh:.0%}")
    ax.set_xlabel("years")
    ax.set_ylabel("state of health (%)")
    ax.set_ylim(min(eol_soh * 100 - 5, float(np.nanmin(health)) * 100 - 2), 101)
    ax.set_title(title or f"Fleet state of health, {health.shape[0]:,} vehicles")
    ax.legend(loc="lower left")
    return _save(fig, path)
