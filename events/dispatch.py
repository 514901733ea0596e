"""The facts a site dispatcher's stream holds (`dispatch-<site_id>`).

A dispatcher is a policy: it reads vehicle, market and grid facts and acts by
sending vehicle commands. What it records in its own stream is why it acted — the
plan it adopted, the grid signal it saw, the safety trips — and the grid-service
deliveries the revenue projection prices. Every event carries `site_id`; events
the dispatcher decides also carry `at`, the domain time of the command (a replay
never depends on a machine clock).

The three grid-service deliveries keep exactly the fields the revenue projection
reads (`projections/revenue.py`). Sign convention as everywhere: power_kw > 0
charges a vehicle, < 0 discharges it. `export_kw` fields are positive when the
fleet feeds the grid more.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from events.base import Event, utc

UtcDatetime = Annotated[AwareDatetime, AfterValidator(utc)]
Kilowatts = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeKilowatts = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Reason = Annotated[str, Field(min_length=1, max_length=500)]

KeepAliveSource = Literal["coordinator", "grid_signal"]
DecisionKind = Literal[
    "plan", "frequency", "peak_shaving", "safety", "charger_unreachable", "target", "lease"
]


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TransformerLimit(_Part):
    """A transformer feeding some of the site's chargers, with its thermal limits."""

    transformer_id: str = Field(min_length=1, max_length=100)
    import_kw: NonNegativeKilowatts
    export_kw: NonNegativeKilowatts
    charger_ids: tuple[str, ...] = ()


class VehicleSetpoint(_Part):
    vehicle_id: str
    power_kw: Kilowatts


# ---------------------------------------------------------------- configuration


class DispatcherConfigured(Event):
    """The site's grid connection, service settings and safety thresholds.

    Chargers not listed under a transformer belong to the first one.
    """

    site_id: str
    at: UtcDatetime
    transformers: tuple[TransformerLimit, ...]
    peak_threshold_kw: NonNegativeKilowatts | None
    demand_charge_eur_per_kw_month: NonNegativeKilowatts
    nominal_hz: Annotated[float, Field(gt=0)]
    droop: Annotated[float, Field(gt=0, le=1)]
    deadband_hz: Annotated[float, Field(ge=0)]
    trip_low_hz: Annotated[float, Field(gt=0)]
    trip_high_hz: Annotated[float, Field(gt=0)]
    alert_high_hz: Annotated[float, Field(gt=0)]
    reconnect_delay_s: Annotated[float, Field(ge=0)]
    watchdog_timeout_s: Annotated[float, Field(gt=0)]
    charger_timeout_s: Annotated[float, Field(gt=0)]
    lease_s: Annotated[float, Field(gt=0)]
    regulation_share: Share
    peak_shaving_share: Share
    regulation_price_eur_per_mw_per_h: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    degradation_eur_per_kwh: Annotated[float, Field(ge=0, allow_inf_nan=False)]


# ---------------------------------------------------------------- decisions


class DispatchPlanAdopted(Event):
    """A rolling-horizon plan; the shares split each vehicle's usable SoC budget.

    `setpoints_kw[i]` is vehicle `vehicle_ids[i]`'s planned power per interval.
    """

    site_id: str
    at: UtcDatetime
    plan_seq: Annotated[int, Field(ge=1)]
    horizon_start: UtcDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    horizon_intervals: Annotated[int, Field(gt=0)]
    arbitrage_share: Share
    regulation_share: Share
    peak_shaving_share: Share
    objective_eur: Annotated[float, Field(allow_inf_nan=False)]
    replan_reasons: tuple[str, ...]
    vehicle_ids: tuple[str, ...]
    setpoints_kw: tuple[tuple[float, ...], ...]


class SetpointsIssued(Event):
    """The dispatcher asked these vehicles for these powers (decision `decision_seq`).

    Vehicle command ids are `f"dispatch-{site_id}:{decision_seq}:{vehicle_id}"`.
    """

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    kind: DecisionKind
    valid_until: UtcDatetime
    setpoints: tuple[VehicleSetpoint, ...]


class OrphanedDecisionRecorded(Event):
    """Decision `decision_seq` has no record of its own: its number is taken, not reused.

    Its record and its vehicle commands are appended at once, so a crash between the
    appends can leave vehicle commands named `f"dispatch-{site_id}:{decision_seq}:..."`
    without the record. A restarted dispatcher that found them records this before its
    next decision (which is `decision_seq + 1`): reusing the number would make the
    vehicles answer the new commands as repeats of the old ones. `vehicle_ids` are the
    vehicles whose commands it found (empty: a number below such a decision, with no
    command found, or one of the numbers a restarted dispatcher does not reuse because
    the previous one may still have had them in flight; `reason` says which). The
    vehicles' own streams hold what they were asked and did.
    """

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    vehicle_ids: tuple[str, ...]
    reason: Reason


class GridSignalRecorded(Event):
    site_id: str
    at: UtcDatetime
    frequency_hz: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    regulation_signal: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)]
    site_load_kw: Kilowatts


class FrequencyResponseIssued(Event):
    """Droop response: `export_kw` more (negative: less) than the plan, across vehicles."""

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    frequency_hz: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    export_kw: Kilowatts
    throttled_discharge: bool
    vehicle_count: Annotated[int, Field(ge=0)]


class WatchdogTripped(Event):
    """No keep-alive from `source` for `timeout_s`: every controlled vehicle went to 0."""

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    source: KeepAliveSource
    last_seen_at: UtcDatetime | None
    timeout_s: float
    vehicle_ids: tuple[str, ...]


class EmergencyStopActivated(Event):
    """All discharge halts; every controlled vehicle went to 0 until the stop is cleared."""

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    reason: Reason
    vehicle_ids: tuple[str, ...]


class EmergencyStopCleared(Event):
    site_id: str
    at: UtcDatetime
    reason: Reason


class AntiIslandingTripped(Event):
    """Grid frequency lost or outside the trip band: everything disconnected."""

    site_id: str
    at: UtcDatetime
    decision_seq: Annotated[int, Field(ge=1)]
    frequency_hz: float | None
    reason: Reason
    vehicle_ids: tuple[str, ...]


class GridReconnected(Event):
    """The grid was back inside the band long enough; control may be granted again."""

    site_id: str
    at: UtcDatetime


class ControlResumed(Event):
    """A watchdog trip is over: keep-alives are back."""

    site_id: str
    at: UtcDatetime
    source: KeepAliveSource


# ---------------------------------------------------------------- grid services (revenue)


class RegulationCapacityReserved(Event):
    site_id: str
    interval_start: UtcDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    up_kw: NonNegativeKilowatts
    down_kw: NonNegativeKilowatts
    price_eur_per_mw_per_h: Annotated[float, Field(allow_inf_nan=False)]


class RegulationEnergyDelivered(Event):
    site_id: str
    vehicle_id: str
    interval_start: UtcDatetime
    energy_kwh: Annotated[float, Field(allow_inf_nan=False)]
    price_eur_per_mwh: Annotated[float, Field(allow_inf_nan=False)]


class PeakShavingDelivered(Event):
    site_id: str
    interval_start: UtcDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    avoided_peak_kw: NonNegativeKilowatts
    demand_charge_eur_per_kw_month: NonNegativeKilowatts


DISPATCH_EVENTS: tuple[type[Event], ...] = (
    DispatcherConfigured,
    DispatchPlanAdopted,
    SetpointsIssued,
    OrphanedDecisionRecorded,
    GridSignalRecorded,
    FrequencyResponseIssued,
    WatchdogTripped,
    ControlResumed,
    EmergencyStopActivated,
    EmergencyStopCleared,
    AntiIslandingTripped,
    GridReconnected,
    RegulationCapacityReserved,
    RegulationEnergyDelivered,
    PeakShavingDelivered,
)

__all__ = [
    "DISPATCH_EVENTS",
    "AntiIslandingTripped",
    "ControlResumed",
    "DecisionKind",
    "DispatchPlanAdopted",
    "DispatcherConfigured",
    "EmergencyStopActivated",
    "EmergencyStopCleared",
    "FrequencyResponseIssued",
    "GridReconnected",
    "GridSignalRecorded",
    "KeepAliveSource",
    "OrphanedDecisionRecorded",
    "PeakShavingDelivered",
    "RegulationCapacityReserved",
    "RegulationEnergyDelivered",
    "SetpointsIssued",
    "TransformerLimit",
    "VehicleSetpoint",
    "WatchdogTripped",
]
