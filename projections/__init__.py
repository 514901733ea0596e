"""DuckDB projections over the event log: energy, revenue, degradation, ROI.

Capabilities as plain functions: :func:`replay` (audit rebuild), :func:`verify`
(live database vs. a fresh replay), :func:`export` (CSV / Parquet), :func:`query`
(read-only SQL) and :func:`roi_report`; :class:`ProjectionStore` keeps the
projections in step with the log.
"""

from projections.degradation import (
    DEFAULT_EOL_FADE,
    NAUMANN_LFP,
    SCHMALSTIEG_2014,
    AgeingModel,
    FleetDegradation,
    FleetUsage,
    NaumannLfp,
    Schmalstieg2014Nmc,
    assess_fleet,
    cycle_life_efc,
    degradation_cost_eur,
    equivalent_full_cycles,
    soh_trajectory,
    thermal_throughput_factor,
    throughput_cost_eur_per_kwh,
    warranty_consumption,
)
from projections.degradation_view import DegradationParams, DegradationProjection
from projections.energy import EnergyProjection
from projections.export import ExportError, export
from projections.replay import AuditReport, replay, verify
from projections.report import RoiReport, roi_report
from projections.revenue import RevenueProjection
from projections.roi import (
    CashFlows,
    MonteCarloResult,
    RoiResult,
    cash_flows,
    evaluate,
    irr,
    irr_roots,
    monte_carlo,
    npv,
    payback_years,
)
from projections.roi_config import RoiConfig, RoiConfigError, load_roi_config
from projections.sql_guard import ForbiddenStatement, QueryError, query
from projections.store import PositionAlreadyApplied, ProjectionError, ProjectionStore

__all__ = [
    "DEFAULT_EOL_FADE",
    "NAUMANN_LFP",
    "SCHMALSTIEG_2014",
    "AgeingModel",
    "AuditReport",
    "CashFlows",
    "DegradationParams",
    "DegradationProjection",
    "EnergyProjection",
    "ExportError",
    "FleetDegradation",
    "FleetUsage",
    "ForbiddenStatement",
    "MonteCarloResult",
    "NaumannLfp",
    "PositionAlreadyApplied",
    "ProjectionError",
    "ProjectionStore",
    "QueryError",
    "RevenueProjection",
    "RoiConfig",
    "RoiConfigError",
    "RoiReport",
    "RoiResult",
    "Schmalstieg2014Nmc",
    "assess_fleet",
    "cash_flows",
    "cycle_life_efc",
    "degradation_cost_eur",
    "equivalent_full_cycles",
    "evaluate",
    "export",
    "irr",
    "irr_roots",
    "load_roi_config",
    "monte_carlo",
    "npv",
    "payback_years",
    "query",
    "replay",
    "roi_report",
    "soh_trajectory",
    "thermal_throughput_factor",
    "throughput_cost_eur_per_kwh",
    "verify",
    "warranty_consumption",
]
