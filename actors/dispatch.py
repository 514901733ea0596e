"""The site dispatcher: a decider for its own stream and the pure policy it runs.

Two parts, both pure (no ray, clock, randomness or IO; time arrives as arguments):

1. The `DISPATCH` decider over `dispatch-<site_id>`: it records what the dispatcher
   decided and why (plans, setpoint decisions with their `decision_seq`, grid
   signals, safety trips, grid-service deliveries). The runtime hosts it like any
   entity kind, so decisions are durable, idempotent and numbered.
2. `SitePolicy`, which folds the log (vehicle, market, charger and its own events)
   into a view of the site and, when asked at a given time, returns a `Decision`:
   commands for its own stream and vehicle commands (`GrantControl`,
   `RequestSetpoint`, `EnforceSafeState`) whose ids are
   `f"dispatch-{site_id}:{decision_seq}:{vehicle_id}"` (a restart re-sends the same
   ids, so the vehicles record each decision once).

What the policy does, in order of precedence (safety first, the vehicle decider
having the last word on every setpoint anyway):

- Safety: an emergency stop, loss of keep-alive (watchdog, 5 s), and a grid
  frequency lost or outside the trip band (anti-islanding, 47.5-51.5 Hz) put every
  vehicle of the site into the safe state; control is granted again only once the
  cause is cleared (reconnection after `reconnect_delay_s` in band). A charger
  unreachable for more than `charger_timeout_s` gets power 0 and is left out.
  "Unreachable" is what the gateway can tell: the station's connection was found
  dead (`ChargerWentOffline`), or a setpoint to it timed out or found it offline;
  it is reachable again once it speaks (`ChargerCameOnline`, a boot, a heartbeat,
  meter values). Silence between a station's messages is not unreachability:
  stations speak every 10-60 s, and the gateway's heartbeat watchdog is what turns
  silence into `ChargerWentOffline`.
- Plan: a rolling-horizon day-ahead plan (`actors.planning.plan`) over the prices
  known from now on, re-planned when prices change, a vehicle plugs in or leaves,
  a trip changes, or telemetry departs from the planned SoC. Each vehicle's usable
  energy (above its reserve) and power are split between the revenue streams:
  `regulation_share` kept as symmetric headroom, `peak_shaving_share` kept as
  energy at the bottom, the rest for arbitrage. The plan states the shares.
- Real time: the plan's power for the current interval, moved to meet a
  coordinator's site target and to hold the site load under the peak threshold,
  with discharge preferred from the highest SoC and lowest cycle count, excluded on
  low state of health, derated when hot, moved off transformers near their limit,
  and clamped to each vehicle's limits for the setpoint's duration.
- Frequency: droop response around the real-time setpoints,
  export_kw = -(df - deadband * sign(df)) / (droop * f_nom) * P_rated, split by
  headroom, clipped to the reserved capacity; discharge is throttled to 0 above
  `alert_high_hz` (over-frequency alert, LFSM-O). The response is pre-armed at
  each tick (per-vehicle base and limits as vectors), so an event only scales it;
  the energy it delivers is booked per vehicle and price interval at the next
  tick, not per event, so an event costs its own record and the setpoints alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Annotated, Any

import numpy as np
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from actors.decider import CommandRejected, Decider, UnknownEntity
from actors.planning import InfeasiblePlan, PlanningProblem, plan
from actors.vehicle import (
    VEHICLE,
    EnforceSafeState,
    GrantControl,
    RequestSetpoint,
    RequestSetpoints,
    VehicleState,
    available_charge_kwh,
    available_discharge_kwh,
    discharge_refusal,
    soc_bounds,
    thermal_derating,
)
from events.base import ENVELOPE_FIELDS, Command, Event, load_event, utc
from events.charger import ChargerSetpointRejected, ChargerWentOffline
from events.dispatch import (
    AntiIslandingTripped,
    ControlResumed,
    DecisionKind,
    DispatcherConfigured,
    DispatchPlanAdopted,
    EmergencyStopActivated,
    EmergencyStopCleared,
    FrequencyResponseIssued,
    GridReconnected,
    GridSignalRecorded,
    KeepAliveSource,
    OrphanedDecisionRecorded,
    PeakShavingDelivered,
    RegulationCapacityReserved,
    RegulationEnergyDelivered,
    SetpointsIssued,
    TransformerLimit,
    VehicleSetpoint,
    WatchdogTripped,
)
from events.vehicle import VehicleRegistered

SiteId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Seq = Annotated[int, Field(ge=1)]

# Setpoints are kept this far inside every vehicle limit so the vehicle decider's
# own clamp (which works on the same numbers) never has to cut them.
_LIMIT_MARGIN = 1e-6
# Powers closer than this are the same setpoint (no new command for them).
_SAME_KW = 0.05
# Telemetry this far (SoC, 0..1) from the planned trajectory triggers a re-plan.
_SOC_DEPARTURE = 0.05


# ---------------------------------------------------------------------------
# Commands


class _DispatchCommand(Command):
    site_id: SiteId

    @property
    def stream_id(self) -> str:
        return f"dispatch-{self.site_id}"


class ConfigureDispatcher(_DispatchCommand):
    """The site's transformers and the settings of every service; IEEE 1547 defaults."""

    transformers: tuple[TransformerLimit, ...] = Field(min_length=1)
    peak_threshold_kw: Annotated[float, Field(ge=0)] | None = None
    demand_charge_eur_per_kw_month: Annotated[float, Field(ge=0)] = 0.0
    nominal_hz: Annotated[float, Field(gt=0)] = 50.0
    droop: Annotated[float, Field(gt=0, le=1)] = 0.05
    deadband_hz: Annotated[float, Field(ge=0)] = 0.036
    trip_low_hz: Annotated[float, Field(gt=0)] = 47.5
    trip_high_hz: Annotated[float, Field(gt=0)] = 51.5
    alert_high_hz: Annotated[float, Field(gt=0)] = 50.2
    reconnect_delay_s: Annotated[float, Field(ge=0)] = 300.0
    watchdog_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    charger_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    lease_s: Annotated[float, Field(gt=0)] = 60.0
    regulation_share: Share = 0.0
    peak_shaving_share: Share = 0.0
    regulation_price_eur_per_mw_per_h: Annotated[float, Field(ge=0)] = 0.0
    degradation_eur_per_kwh: Annotated[float, Field(ge=0)] = 0.02

    @model_validator(mode="after")
    def _consistent(self) -> ConfigureDispatcher:
        if not self.trip_low_hz < self.nominal_hz < self.alert_high_hz <= self.trip_high_hz:
            raise ValueError(
                "frequencies must satisfy trip_low_hz < nominal_hz < alert_high_hz <= trip_high_hz"
            )
        if self.regulation_share + self.peak_shaving_share > 1:
            raise ValueError("regulation_share + peak_shaving_share must be at most 1")
        ids = [t.transformer_id for t in self.transformers]
        if len(set(ids)) != len(ids):
            raise ValueError("transformer ids must be unique")
        return self


class AdoptPlan(_DispatchCommand):
    plan_seq: Seq
    horizon_start: AwareDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    horizon_intervals: Annotated[int, Field(gt=0)]
    arbitrage_share: Share
    regulation_share: Share
    peak_shaving_share: Share
    objective_eur: float
    replan_reasons: tuple[str, ...]
    vehicle_ids: tuple[str, ...]
    setpoints_kw: tuple[tuple[float, ...], ...]


class IssueSetpoints(_DispatchCommand):
    decision_seq: Seq
    kind: DecisionKind
    valid_until: AwareDatetime
    setpoints: tuple[VehicleSetpoint, ...]


class RecordOrphanedDecision(_DispatchCommand):
    """Take decision `decision_seq` as lost: its vehicle commands are in the log, its record not."""

    decision_seq: Seq
    vehicle_ids: tuple[str, ...]
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class RecordGridSignal(_DispatchCommand):
    frequency_hz: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None
    regulation_signal: Annotated[float, Field(ge=-1, le=1)] = 0.0
    site_load_kw: float = 0.0


class IssueFrequencyResponse(_DispatchCommand):
    decision_seq: Seq
    frequency_hz: Annotated[float, Field(gt=0)]
    export_kw: float
    throttled_discharge: bool
    vehicle_count: Annotated[int, Field(ge=0)]


class TripWatchdog(_DispatchCommand):
    decision_seq: Seq
    source: KeepAliveSource
    last_seen_at: AwareDatetime | None
    timeout_s: float
    vehicle_ids: tuple[str, ...]


class ResumeControl(_DispatchCommand):
    source: KeepAliveSource


class ActivateEmergencyStop(_DispatchCommand):
    decision_seq: Seq
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    vehicle_ids: tuple[str, ...]


class ClearEmergencyStop(_DispatchCommand):
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class TripAntiIslanding(_DispatchCommand):
    decision_seq: Seq
    frequency_hz: float | None
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    vehicle_ids: tuple[str, ...]


class ReconnectGrid(_DispatchCommand):
    pass


class ReserveRegulationCapacity(_DispatchCommand):
    interval_start: AwareDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    up_kw: Annotated[float, Field(ge=0)]
    down_kw: Annotated[float, Field(ge=0)]
    price_eur_per_mw_per_h: float


class RecordRegulationEnergy(_DispatchCommand):
    vehicle_id: str
    interval_start: AwareDatetime
    energy_kwh: float
    price_eur_per_mwh: float


class RecordPeakShaving(_DispatchCommand):
    interval_start: AwareDatetime
    interval_minutes: Annotated[int, Field(gt=0)]
    avoided_peak_kw: Annotated[float, Field(ge=0)]
    demand_charge_eur_per_kw_month: Annotated[float, Field(ge=0)]


DispatchCommand = (
    ConfigureDispatcher
    | AdoptPlan
    | IssueSetpoints
    | RecordOrphanedDecision
    | RecordGridSignal
    | IssueFrequencyResponse
    | TripWatchdog
    | ResumeControl
    | ActivateEmergencyStop
    | ClearEmergencyStop
    | TripAntiIslanding
    | ReconnectGrid
    | ReserveRegulationCapacity
    | RecordRegulationEnergy
    | RecordPeakShaving
)


# ---------------------------------------------------------------------------
# State


class DispatchState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: str
    config: DispatcherConfigured | None = None
    plan_seq: int = 0
    decision_seq: int = 0
    emergency_stop: bool = False
    islanded: bool = False
    watchdog_tripped: tuple[KeepAliveSource, ...] = ()
    last_frequency_hz: float | None = None
    reserved_until: datetime | None = None  # regulation capacity reserved up to here
    peak_shaved: tuple[str, ...] = ()  # interval starts (ISO) with a delivery, newest 8

    @property
    def halted(self) -> str | None:
        """Why no vehicle may be given power now, or None."""
        if self.emergency_stop:
            return "emergency stop active: all discharge halted"
        if self.islanded:
            return "anti-islanding tripped: the site is disconnected"
        if self.watchdog_tripped:
            return f"watchdog tripped ({', '.join(self.watchdog_tripped)}): control suspended"
        return None


def initial_state(site_id: str) -> DispatchState:
    return DispatchState(site_id=site_id)


def evolve(state: DispatchState, event: Event) -> DispatchState:
    match event:
        case DispatcherConfigured():
            return state.model_copy(update={"config": event})
        case DispatchPlanAdopted():
            return state.model_copy(update={"plan_seq": event.plan_seq})
        case SetpointsIssued() | FrequencyResponseIssued() | OrphanedDecisionRecorded():
            return state.model_copy(update={"decision_seq": event.decision_seq})
        case GridSignalRecorded():
            return state.model_copy(update={"last_frequency_hz": event.frequency_hz})
        case WatchdogTripped():
            tripped = tuple(sorted({*state.watchdog_tripped, event.source}))
            return state.model_copy(
                update={"decision_seq": event.decision_seq, "watchdog_tripped": tripped}
            )
        case ControlResumed():
            kept = tuple(s for s in state.watchdog_tripped if s != event.source)
            return state.model_copy(update={"watchdog_tripped": kept})
        case EmergencyStopActivated():
            return state.model_copy(
                update={"decision_seq": event.decision_seq, "emergency_stop": True}
            )
        case EmergencyStopCleared():
            return state.model_copy(update={"emergency_stop": False})
        case AntiIslandingTripped():
            return state.model_copy(update={"decision_seq": event.decision_seq, "islanded": True})
        case GridReconnected():
            return state.model_copy(update={"islanded": False})
        case RegulationCapacityReserved():
            end = event.interval_start + timedelta(minutes=event.interval_minutes)
            return state.model_copy(update={"reserved_until": end})
        case PeakShavingDelivered():
            shaved = (*state.peak_shaved, event.interval_start.isoformat())[-8:]
            return state.model_copy(update={"peak_shaved": shaved})
        case RegulationEnergyDelivered():
            return state
    raise TypeError(f"the dispatcher cannot evolve with {type(event).__name__}")


# ---------------------------------------------------------------------------
# decide


def _next_seq(command_seq: int, state_seq: int, what: str) -> bool:
    """True when the command is the next decision; False when already recorded."""
    if command_seq <= state_seq:
        return False
    if command_seq != state_seq + 1:
        raise CommandRejected(
            f"{what} {command_seq} skips ahead: the last recorded is {state_seq}, "
            f"the next must be {state_seq + 1}"
        )
    return True


def _configure(command: ConfigureDispatcher, state: DispatchState) -> list[Event]:
    fields = command.model_dump(exclude={*ENVELOPE_FIELDS, "site_id"})
    configured = DispatcherConfigured(site_id=command.site_id, at=command.issued_at, **fields)
    if state.config is not None and state.config.model_dump(exclude={"at"}) == (
        configured.model_dump(exclude={"at"})
    ):
        return []
    return [configured]


def _issue_setpoints(command: IssueSetpoints, state: DispatchState) -> list[Event]:
    if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
        return []
    if command.valid_until <= command.issued_at:
        raise CommandRejected("valid_until must be after issued_at")
    halted = state.halted
    if halted is not None and any(s.power_kw != 0 for s in command.setpoints):
        raise CommandRejected(f"{halted}; only zero setpoints may be issued")
    return [
        SetpointsIssued(
            site_id=command.site_id,
            at=command.issued_at,
            decision_seq=command.decision_seq,
            kind=command.kind,
            valid_until=command.valid_until,
            setpoints=command.setpoints,
        )
    ]


def _frequency_response(command: IssueFrequencyResponse, state: DispatchState) -> list[Event]:
    if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
        return []
    if state.halted is not None:
        raise CommandRejected(f"{state.halted}; no frequency response")
    fields = command.model_dump(exclude={*ENVELOPE_FIELDS, "site_id"})
    return [FrequencyResponseIssued(site_id=command.site_id, at=command.issued_at, **fields)]


def decide(command: DispatchCommand, state: DispatchState) -> list[Event]:
    if command.site_id != state.site_id:
        raise CommandRejected(
            f"site_id {command.site_id!r} does not match the stream of {state.site_id!r}"
        )
    if isinstance(command, ConfigureDispatcher):
        return _configure(command, state)
    if state.config is None:
        raise UnknownEntity(f"dispatcher for site {state.site_id!r} is not configured")
    site, at = command.site_id, command.issued_at
    match command:
        case AdoptPlan():
            if not _next_seq(command.plan_seq, state.plan_seq, "plan_seq"):
                return []
            if len(command.setpoints_kw) != len(command.vehicle_ids) or any(
                len(row) != command.horizon_intervals for row in command.setpoints_kw
            ):
                raise CommandRejected("setpoints_kw must be vehicles x horizon_intervals")
            share_sum = command.arbitrage_share + command.regulation_share
            if abs(share_sum + command.peak_shaving_share - 1) > 1e-9:
                raise CommandRejected("the three shares of the SoC budget must add up to 1")
            fields = command.model_dump(exclude={*ENVELOPE_FIELDS, "site_id"})
            return [DispatchPlanAdopted(site_id=site, at=at, **fields)]
        case IssueSetpoints():
            return _issue_setpoints(command, state)
        case IssueFrequencyResponse():
            return _frequency_response(command, state)
        case RecordOrphanedDecision():
            # Only ever the next number: it closes a gap in order, one decision at a time.
            if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
                return []
            return [
                OrphanedDecisionRecorded(
                    site_id=site,
                    at=at,
                    decision_seq=command.decision_seq,
                    vehicle_ids=command.vehicle_ids,
                    reason=command.reason,
                )
            ]
        case RecordGridSignal():
            return [
                GridSignalRecorded(
                    site_id=site,
                    at=at,
                    frequency_hz=command.frequency_hz,
                    regulation_signal=command.regulation_signal,
                    site_load_kw=command.site_load_kw,
                )
            ]
        case TripWatchdog():
            if command.source in state.watchdog_tripped:
                return []
            if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
                return []
            return [
                WatchdogTripped(
                    site_id=site,
                    at=at,
                    decision_seq=command.decision_seq,
                    source=command.source,
                    last_seen_at=command.last_seen_at,
                    timeout_s=command.timeout_s,
                    vehicle_ids=command.vehicle_ids,
                )
            ]
        case ResumeControl():
            if command.source not in state.watchdog_tripped:
                return []
            return [ControlResumed(site_id=site, at=at, source=command.source)]
        case ActivateEmergencyStop():
            if state.emergency_stop:
                return []
            if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
                return []
            return [
                EmergencyStopActivated(
                    site_id=site,
                    at=at,
                    decision_seq=command.decision_seq,
                    reason=command.reason,
                    vehicle_ids=command.vehicle_ids,
                )
            ]
        case ClearEmergencyStop():
            if not state.emergency_stop:
                return []
            return [EmergencyStopCleared(site_id=site, at=at, reason=command.reason)]
        case TripAntiIslanding():
            if state.islanded:
                return []
            if not _next_seq(command.decision_seq, state.decision_seq, "decision_seq"):
                return []
            return [
                AntiIslandingTripped(
                    site_id=site,
                    at=at,
                    decision_seq=command.decision_seq,
                    frequency_hz=command.frequency_hz,
                    reason=command.reason,
                    vehicle_ids=command.vehicle_ids,
                )
            ]
        case ReconnectGrid():
            return [GridReconnected(site_id=site, at=at)] if state.islanded else []
        case ReserveRegulationCapacity():
            if state.reserved_until is not None and command.interval_start < state.reserved_until:
                return []
            return [
                RegulationCapacityReserved(
                    site_id=site,
                    interval_start=command.interval_start,
                    interval_minutes=command.interval_minutes,
                    up_kw=command.up_kw,
                    down_kw=command.down_kw,
                    price_eur_per_mw_per_h=command.price_eur_per_mw_per_h,
                )
            ]
        case RecordRegulationEnergy():
            return [
                RegulationEnergyDelivered(
                    site_id=site,
                    vehicle_id=command.vehicle_id,
                    interval_start=command.interval_start,
                    energy_kwh=command.energy_kwh,
                    price_eur_per_mwh=command.price_eur_per_mwh,
                )
            ]
        case RecordPeakShaving():
            if utc(command.interval_start).isoformat() in state.peak_shaved:
                return []
            return [
                PeakShavingDelivered(
                    site_id=site,
                    interval_start=command.interval_start,
                    interval_minutes=command.interval_minutes,
                    avoided_peak_kw=command.avoided_peak_kw,
                    demand_charge_eur_per_kw_month=command.demand_charge_eur_per_kw_month,
                )
            ]
    raise CommandRejected(f"the dispatcher does not handle {type(command).__name__}")


DISPATCH: Decider[DispatchState] = Decider(
    kind="dispatch",
    command_types=(
        ConfigureDispatcher,
        AdoptPlan,
        IssueSetpoints,
        RecordOrphanedDecision,
        RecordGridSignal,
        IssueFrequencyResponse,
        TripWatchdog,
        ResumeControl,
        ActivateEmergencyStop,
        ClearEmergencyStop,
        TripAntiIslanding,
        ReconnectGrid,
        ReserveRegulationCapacity,
        RecordRegulationEnergy,
        RecordPeakShaving,
    ),
    state_type=DispatchState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)


# ---------------------------------------------------------------------------
# Policy: the vehicles as the dispatcher sees them


@dataclass(frozen=True, slots=True)
class VehicleView:
    """One vehicle at one instant, in grid-side kW and kWh."""

    vehicle_id: str
    transformer_id: str
    charger_id: str | None
    soc: float  # lower bound, 0..1
    capacity_kwh: float
    efficiency: float
    soc_floor: float
    rated_charge_kw: float  # min(vehicle, charger): nameplate, not energy-limited
    rated_discharge_kw: float
    max_charge_kw: float  # 0 when it may not charge
    max_discharge_kw: float  # 0 when excluded (SoH, heat, budget, charger), derated when hot
    charge_room_kwh: float  # grid-side energy until full
    discharge_room_kwh: float  # grid-side energy above the reserve
    cycles: float  # discharged kWh / capacity
    departure_at: datetime | None
    departure_energy_kwh: float
    controlled: bool  # our lease is live
    foreign: bool  # another controller's lease is live

    def charge_limit_kw(self, hours: float) -> float:
        if hours <= 0:
            return 0.0
        return max(0.0, min(self.max_charge_kw, self.charge_room_kwh / hours)) * (1 - _LIMIT_MARGIN)

    def discharge_limit_kw(self, hours: float) -> float:
        if hours <= 0:
            return 0.0
        limit = min(self.max_discharge_kw, self.discharge_room_kwh / hours)
        return max(0.0, limit) * (1 - _LIMIT_MARGIN)

    def clamp(self, power_kw: float, hours: float) -> float:
        if power_kw >= 0:
            return min(power_kw, self.charge_limit_kw(hours))
        return -min(-power_kw, self.discharge_limit_kw(hours))


def vehicle_view(
    state: VehicleState, at: datetime, controller_id: str, transformer_of: Mapping[str, str]
) -> VehicleView | None:
    """What the policy needs of a plugged-in vehicle with telemetry, or None."""
    spec, connection = state.spec, state.connection
    if spec is None or connection is None or state.reading is None:
        return None
    lease = state.lease
    live = lease is not None and lease.live(at)
    derating = thermal_derating(state)
    max_discharge = 0.0
    if discharge_refusal(state) is None:
        max_discharge = min(spec.max_discharge_kw * derating, connection.max_discharge_kw)
    max_charge = min(spec.max_charge_kw, connection.max_charge_kw)
    low, _ = soc_bounds(state, at)
    trip = state.trip
    return VehicleView(
        vehicle_id=state.vehicle_id,
        transformer_id=transformer_of.get(connection.charger_id, transformer_of.get("", "")),
        charger_id=connection.charger_id,
        soc=min(1.0, max(0.0, low)),
        capacity_kwh=spec.battery_capacity_kwh,
        efficiency=min(spec.charge_efficiency, spec.discharge_efficiency),
        soc_floor=spec.soc_floor,
        rated_charge_kw=min(spec.max_charge_kw, connection.max_charge_kw),
        rated_discharge_kw=min(spec.max_discharge_kw, connection.max_discharge_kw),
        max_charge_kw=max_charge,
        max_discharge_kw=max_discharge,
        charge_room_kwh=available_charge_kwh(state, at) / spec.charge_efficiency,
        discharge_room_kwh=available_discharge_kwh(state, at) * spec.discharge_efficiency,
        cycles=state.discharged_kwh_total / spec.battery_capacity_kwh,
        departure_at=None if trip is None else trip.departure_at,
        departure_energy_kwh=0.0 if trip is None else trip.energy_needed_kwh,
        controlled=live and lease is not None and lease.controller_id == controller_id,
        foreign=live and lease is not None and lease.controller_id != controller_id,
    )


def transformer_map(config: DispatcherConfigured) -> dict[str, str]:
    """charger id -> transformer id; the key "" names the default (first) transformer."""
    mapping = {"": config.transformers[0].transformer_id}
    for t in config.transformers:
        for charger in t.charger_ids:
            mapping[charger] = t.transformer_id
    return mapping


# ---------------------------------------------------------------------------
# Policy: frequency response


def droop_export_kw(
    frequency_hz: float,
    rated_kw: float,
    nominal_hz: float = 50.0,
    droop: float = 0.05,
    deadband_hz: float = 0.036,
) -> float:
    """Extra export (kW, > 0 = feed the grid more) for a frequency, IEEE 1547-2018 droop.

    ΔP = -(Δf - deadband·sign(Δf)) / (droop · f_nom) · P_rated, 0 inside the deadband.
    """
    delta_hz = frequency_hz - nominal_hz
    if abs(delta_hz) <= deadband_hz:
        return 0.0
    beyond_hz = delta_hz - math.copysign(deadband_hz, delta_hz)
    return -beyond_hz / (droop * nominal_hz) * rated_kw


def split_by_headroom(
    export_kw: float, base_kw: Mapping[str, float], views: Mapping[str, VehicleView], hours: float
) -> dict[str, float]:
    """Move `export_kw` (> 0: more export) across vehicles in proportion to their headroom.

    Returns new setpoints (every key of `base_kw`), each within its vehicle's limits.
    """
    room: dict[str, float] = {}
    for vid, base in base_kw.items():
        v = views[vid]
        if export_kw > 0:
            room[vid] = max(0.0, base + v.discharge_limit_kw(hours))
        else:
            room[vid] = max(0.0, v.charge_limit_kw(hours) - base)
    total = sum(room.values())
    if total <= 0 or export_kw == 0:
        return {vid: views[vid].clamp(p, hours) for vid, p in base_kw.items()}
    share = min(1.0, abs(export_kw) / total)
    sign = -1.0 if export_kw > 0 else 1.0
    return {
        vid: views[vid].clamp(base + sign * share * room[vid], hours)
        for vid, base in base_kw.items()
    }


@dataclass(frozen=True, slots=True)
class ArmedResponse:
    """The droop response prepared for one set of base setpoints (pre-armed).

    Built once per base (each tick), so answering a frequency event is a few vector
    operations instead of a pass over every vehicle's view: only the droop's size
    and the time left change between events. Per vehicle, in `vehicle_ids` order,
    the base setpoint and what its limits are made of (`VehicleView`'s fields).
    """

    vehicle_ids: tuple[str, ...]
    base_kw: np.ndarray
    max_charge_kw: np.ndarray
    charge_room_kwh: np.ndarray
    max_discharge_kw: np.ndarray
    discharge_room_kwh: np.ndarray
    rated_charge_kw: float  # P_rated of the droop, summed per direction
    rated_discharge_kw: float

    def limits_kw(self, hours: float) -> tuple[np.ndarray, np.ndarray]:
        """`VehicleView.charge_limit_kw` and `discharge_limit_kw` of every vehicle."""
        if hours <= 0:
            zero = np.zeros_like(self.base_kw)
            return zero, zero
        charge = np.maximum(0.0, np.minimum(self.max_charge_kw, self.charge_room_kwh / hours))
        discharge = np.maximum(
            0.0, np.minimum(self.max_discharge_kw, self.discharge_room_kwh / hours)
        )
        return charge * (1 - _LIMIT_MARGIN), discharge * (1 - _LIMIT_MARGIN)

    def split(self, export_kw: float, hours: float) -> np.ndarray:
        """`split_by_headroom` on the armed vectors: new setpoints, in `vehicle_ids` order."""
        charge, discharge = self.limits_kw(hours)
        base = self.base_kw
        if export_kw > 0:
            room = np.maximum(0.0, base + discharge)
        else:
            room = np.maximum(0.0, charge - base)
        total = float(room.sum())
        target = base
        if total > 0 and export_kw != 0:
            share = min(1.0, abs(export_kw) / total)
            target = base + (-share if export_kw > 0 else share) * room
        clamped: np.ndarray = np.where(
            target >= 0, np.minimum(target, charge), -np.minimum(-target, discharge)
        )
        return clamped


def arm_response(base_kw: Mapping[str, float], views: Mapping[str, VehicleView]) -> ArmedResponse:
    """Prepare the droop response around `base_kw` (vehicles without a view are left out)."""
    ids = tuple(sorted(vid for vid in base_kw if vid in views))
    chosen = [views[vid] for vid in ids]

    def column(values: Iterable[float]) -> np.ndarray:
        return np.fromiter(values, dtype=float, count=len(ids))

    return ArmedResponse(
        vehicle_ids=ids,
        base_kw=column(base_kw[vid] for vid in ids),
        max_charge_kw=column(v.max_charge_kw for v in chosen),
        charge_room_kwh=column(v.charge_room_kwh for v in chosen),
        max_discharge_kw=column(v.max_discharge_kw for v in chosen),
        discharge_room_kwh=column(v.discharge_room_kwh for v in chosen),
        rated_charge_kw=sum(v.rated_charge_kw for v in chosen),
        rated_discharge_kw=sum(v.rated_discharge_kw for v in chosen),
    )


# ---------------------------------------------------------------------------
# Policy: real-time allocation


def discharge_order(views: Iterable[VehicleView]) -> list[VehicleView]:
    """Discharge preference: highest SoC first, then lowest cycle count."""
    return sorted(views, key=lambda v: (-v.soc, v.cycles, v.vehicle_id))


def allocate(
    export_kw: float,
    power_kw: dict[str, float],
    views: Mapping[str, VehicleView],
    hours: float,
    transformer_room_kw: dict[str, tuple[float, float]] | None = None,
) -> float:
    """Move `export_kw` (> 0: more export) greedily in preference order; mutates `power_kw`.

    More export is taken first from the highest SoC / fewest cycles; more import goes
    first to the lowest SoC. `transformer_room_kw[t] = (import_room, export_room)` is
    respected and updated. Returns the export actually moved.
    """
    moved = 0.0
    if abs(export_kw) < 1e-9:
        return 0.0
    candidates = [views[vid] for vid in power_kw]
    order = discharge_order(candidates) if export_kw > 0 else discharge_order(candidates)[::-1]
    for v in order:
        remaining = abs(export_kw) - moved
        if remaining <= 1e-9:
            break
        current = power_kw[v.vehicle_id]
        if export_kw > 0:
            step = current + v.discharge_limit_kw(hours)
        else:
            step = v.charge_limit_kw(hours) - current
        step = min(max(0.0, step), remaining)
        if transformer_room_kw is not None and v.transformer_id in transformer_room_kw:
            imp, exp = transformer_room_kw[v.transformer_id]
            step = min(step, max(0.0, exp if export_kw > 0 else imp))
            if export_kw > 0:
                transformer_room_kw[v.transformer_id] = (imp + step, exp - step)
            else:
                transformer_room_kw[v.transformer_id] = (imp - step, exp + step)
        if step <= 0:
            continue
        power_kw[v.vehicle_id] = current - step if export_kw > 0 else current + step
        moved += step
    return moved if export_kw > 0 else -moved


def transformer_loads_kw(
    power_kw: Mapping[str, float], views: Mapping[str, VehicleView]
) -> dict[str, float]:
    loads: dict[str, float] = {}
    for vid, p in power_kw.items():
        t = views[vid].transformer_id
        loads[t] = loads.get(t, 0.0) + p
    return loads


def enforce_transformers(
    power_kw: dict[str, float],
    views: Mapping[str, VehicleView],
    transformers: Sequence[TransformerLimit],
    hours: float,
    near: float = 0.95,
) -> None:
    """Keep every transformer within `near` x its limits; mutates `power_kw`.

    Export cut on a transformer near its export limit is moved to vehicles on less
    loaded transformers (as far as their own room allows); import above a limit is
    cut from the vehicles with the most SoC first (they need it least).
    """
    loads = transformer_loads_kw(power_kw, views)
    moved_export_kw = 0.0
    for t in transformers:
        on_t = [views[vid] for vid in power_kw if views[vid].transformer_id == t.transformer_id]
        load = loads.get(t.transformer_id, 0.0)
        excess = -load - near * t.export_kw
        for v in discharge_order(on_t)[::-1]:  # least preferred discharger first
            if excess <= 1e-9:
                break
            cut = min(excess, max(0.0, -power_kw[v.vehicle_id]))
            power_kw[v.vehicle_id] += cut
            excess -= cut
            moved_export_kw += cut
        excess = load - near * t.import_kw
        for v in discharge_order(on_t):  # fullest battery first
            if excess <= 1e-9:
                break
            cut = min(excess, max(0.0, power_kw[v.vehicle_id]))
            power_kw[v.vehicle_id] -= cut
            excess -= cut
    if moved_export_kw > 1e-9:
        loads = transformer_loads_kw(power_kw, views)
        room = {
            t.transformer_id: (
                near * t.import_kw - loads.get(t.transformer_id, 0.0),
                near * t.export_kw + loads.get(t.transformer_id, 0.0),
            )
            for t in transformers
        }
        allocate(moved_export_kw, power_kw, views, hours, room)


# ---------------------------------------------------------------------------
# Policy: the plan


@dataclass(frozen=True)
class SitePlan:
    plan_seq: int
    horizon_start: datetime
    interval_minutes: int
    vehicle_ids: tuple[str, ...]
    power_kw: np.ndarray  # (N, T)
    energy_kwh: np.ndarray  # (N, T+1), planned stored energy
    objective_eur: float
    inputs: dict[str, tuple[Any, ...]]  # per vehicle what the plan assumed (for re-planning)
    price_key: tuple[tuple[str, float], ...]

    @property
    def horizon_end(self) -> datetime:
        return self.horizon_start + timedelta(
            minutes=self.interval_minutes * self.power_kw.shape[1]
        )

    def interval_at(self, at: datetime) -> int:
        return int((at - self.horizon_start).total_seconds() // (self.interval_minutes * 60))

    @cached_property
    def row_of(self) -> dict[str, int]:
        # a tick asks for every vehicle's row: a tuple's index() made that O(N^2)
        # (12 ms of a 1,000-vehicle tick, all of it under the dispatcher's lock)
        return {vid: i for i, vid in enumerate(self.vehicle_ids)}

    def power_at(self, vehicle_id: str, at: datetime) -> float:
        k = self.interval_at(at)
        row = self.row_of.get(vehicle_id)
        if row is None or not 0 <= k < self.power_kw.shape[1]:
            return 0.0
        return float(self.power_kw[row, k])

    def planned_soc(self, vehicle_id: str, at: datetime, capacity_kwh: float) -> float | None:
        k = self.interval_at(at)
        row = self.row_of.get(vehicle_id)
        if row is None or not 0 <= k <= self.power_kw.shape[1]:
            return None
        return float(self.energy_kwh[row, k]) / capacity_kwh


def plan_inputs(v: VehicleView) -> tuple[Any, ...]:
    return (v.departure_at, round(v.departure_energy_kwh, 6), v.charger_id)


def build_problem(
    views: Sequence[VehicleView],
    prices_eur_per_mwh: np.ndarray,
    horizon_start: datetime,
    interval_minutes: int,
    config: DispatcherConfigured,
) -> PlanningProblem:
    """The planner's arrays for the site, with each stream's share of the SoC budget.

    Regulation keeps `regulation_share` of each vehicle's power and half of that share
    of its usable energy at each end; peak shaving keeps `peak_shaving_share` of the
    usable energy at the bottom; arbitrage plans within what is left.
    """
    n, t = len(views), prices_eur_per_mwh.size
    reg, peak = config.regulation_share, config.peak_shaving_share
    cap = np.array([v.capacity_kwh for v in views], dtype=float)
    floor = np.array([v.soc_floor for v in views], dtype=float)
    usable = cap * (1 - floor)
    bottom = floor * cap + usable * (peak + reg / 2)
    top_keep = usable * reg / 2
    plan_cap = cap - top_keep
    soc_now = np.array([v.soc for v in views], dtype=float) * cap
    # The planner needs soc <= 1 of its (smaller) capacity; above it, it may only discharge.
    soc = np.clip(soc_now / plan_cap, 0.0, 1.0)
    tr_ids = [tr.transformer_id for tr in config.transformers]
    available = np.zeros((n, t), dtype=bool)
    departure = np.full(n, t + 1, dtype=np.int64)
    dep_energy = np.zeros(n)
    for i, v in enumerate(views):
        if v.departure_at is None:
            available[i, :] = True
            continue
        k = int((v.departure_at - horizon_start).total_seconds() // (interval_minutes * 60))
        available[i, : max(0, min(k, t))] = True
        if 1 <= k <= t:
            departure[i] = k
            dep_energy[i] = min(v.departure_energy_kwh, plan_cap[i])
    return PlanningProblem(
        capacity_kwh=plan_cap,
        soc=soc,
        soc_floor=np.clip(bottom / plan_cap, 0.0, 1.0),
        max_charge_kw=np.array([v.max_charge_kw for v in views], dtype=float) * (1 - reg),
        max_discharge_kw=np.array([v.max_discharge_kw for v in views], dtype=float) * (1 - reg),
        efficiency=np.array([v.efficiency for v in views], dtype=float),
        available=available,
        departure_interval=departure,
        departure_energy_kwh=dep_energy,
        transformer=np.array([tr_ids.index(v.transformer_id) for v in views], dtype=np.int64),
        price_eur_per_mwh=prices_eur_per_mwh,
        # the plan keeps 5 % of each transformer for real-time moves
        transformer_import_kw=np.array([tr.import_kw for tr in config.transformers]) * 0.95,
        transformer_export_kw=np.array([tr.export_kw for tr in config.transformers]) * 0.95,
        degradation_eur_per_kwh=config.degradation_eur_per_kwh,
        interval_minutes=interval_minutes,
    )


def solve_site(problem: PlanningProblem) -> tuple[np.ndarray, np.ndarray, float]:
    """The planner's schedule; if forced charging cannot fit, trips are relaxed to the floor."""
    if problem.n_vehicles == 0:
        t = problem.n_intervals
        return np.zeros((0, t)), np.zeros((0, t + 1)), 0.0
    try:
        result = plan(problem)
    except InfeasiblePlan:
        relaxed = PlanningProblem(
            **{
                **{k: getattr(problem, k) for k in problem.__dataclass_fields__},
                "departure_energy_kwh": np.zeros(problem.n_vehicles),
            }
        )
        result = plan(relaxed)
    # Back to the vehicles' own capacities: the planner saw capacity minus the top band.
    return result.power_kw, result.energy_kwh, float(result.objective_eur)


@dataclass(frozen=True)
class PlanJob:
    """A re-plan's inputs, taken from the policy so the solve can run outside its lock.

    Solving is the slow part of a tick (0.1-1 s at 1,000 vehicles); a frequency event
    waiting for it would wait that long. `SitePolicy.tick` adopts a `SolvedPlan` only
    if its inputs are still exactly the ones it would solve for, so the result is the
    same as solving inline.
    """

    start: datetime
    chosen: tuple[VehicleView, ...]
    prices: np.ndarray
    config: DispatcherConfigured
    interval_minutes: int

    def solve(self) -> SolvedPlan:
        problem = build_problem(
            list(self.chosen), self.prices, self.start, self.interval_minutes, self.config
        )
        power, energy, objective = solve_site(problem)
        # the plan's record rounds every vehicle x interval (1,000 x 144 at a big site)
        setpoints_kw = tuple(tuple(round(float(x), 4) for x in row) for row in power)
        return SolvedPlan(self, power, energy, objective, setpoints_kw)

    def same_inputs(self, other: PlanJob) -> bool:
        return (
            self.start == other.start
            and self.interval_minutes == other.interval_minutes
            and self.config is other.config
            and self.chosen == other.chosen
            and np.array_equal(self.prices, other.prices)
        )


@dataclass(frozen=True)
class SolvedPlan:
    job: PlanJob
    power_kw: np.ndarray
    energy_kwh: np.ndarray
    objective_eur: float
    setpoints_kw: tuple[tuple[float, ...], ...]  # power_kw as the plan's record states it


# ---------------------------------------------------------------------------
# Policy: the site, folded from the log


@dataclass
class Decision:
    """What the dispatcher decided at one instant: commands for its stream and the vehicles."""

    at: datetime
    dispatch: list[Command] = field(default_factory=list)
    vehicle: list[Command] = field(default_factory=list)
    # Vehicle setpoints as columns (a frequency response): sent to the shards as they
    # are, they come after `vehicle` in every list of commands or results.
    setpoints: list[RequestSetpoints] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.dispatch and not self.vehicle and not self.setpoints

    def vehicle_commands(self) -> list[Command]:
        """Every vehicle command, the batched setpoints expanded, in the order they are sent."""
        return [*self.vehicle, *(c for batch in self.setpoints for c in batch.commands())]

    def extend(self, other: Decision) -> None:
        self.dispatch.extend(other.dispatch)
        self.vehicle.extend(other.vehicle)
        self.setpoints.extend(other.setpoints)
        self.reasons.extend(other.reasons)


_VEHICLE_TYPES = frozenset(
    {
        "VehicleRegistered",
        "VehiclePluggedIn",
        "VehicleUnplugged",
        "VehicleTelemetryReported",
        "VehicleTripPlanned",
        "VehicleTripCancelled",
        "VehicleControlGranted",
        "VehicleControlRefused",
        "VehicleControlReleased",
        "VehicleEnergyRecorded",
        "VehicleSetpointAccepted",
        "VehicleSetpointRejected",
        "VehicleSetpointCurtailed",
        "VehicleSafeStateEntered",
    }
)
_PRICE_TYPES = frozenset({"PricePublished", "PriceRevised"})
_CHARGER_SEEN = {
    "ChargerHeartbeatReceived": "received_at",
    "ChargerBooted": "booted_at",
    "ChargerMeterValuesRecorded": "sampled_at",
    "ConnectorStatusChanged": "reported_at",
    "ChargerCameOnline": "at",
}


class SitePolicy:
    """One site's dispatcher policy: fold events in, ask for a `Decision` at a time.

    Pure: the caller feeds it log rows (`apply_rows`) and keep-alives, and passes the
    time to every decision. It never writes: it returns commands. Its own stream's
    state advances as it decides (it runs the `DISPATCH` decider on what it sends),
    so consecutive decisions are numbered without waiting for the log. A number the
    log shows in its own vehicle commands but not in its stream (a record lost in a
    crash) is recorded as orphaned before the next decision, never used again; so are
    the numbers a restart reserves (`reserve_in_flight`) because a previous incarnation
    may still have had them in flight.

    Args:
        site_id: the site this dispatcher controls.
        market_id: the price feed the plan follows.
        watched: keep-alive sources whose silence trips the watchdog.
        interval_minutes: the plan's interval.
        horizon_hours: the longest rolling horizon.
    """

    def __init__(
        self,
        site_id: str,
        market_id: str = "nl-day-ahead",
        watched: Sequence[KeepAliveSource] = (),
        interval_minutes: int = 15,
        horizon_hours: float = 36.0,
    ) -> None:
        self.site_id = site_id
        self.controller_id = f"dispatch-{site_id}"
        self.market_id = market_id
        self.watched = tuple(watched)
        self.interval_minutes = interval_minutes
        self.horizon_intervals = int(horizon_hours * 60 // interval_minutes)
        self.state = initial_state(site_id)
        self.stream_version = 0
        self.vehicles: dict[str, VehicleState] = {}  # stream id -> state, this site only
        self._other_vehicles: set[str] = set()
        self.prices: dict[datetime, tuple[int, float]] = {}  # interval start -> (minutes, price)
        self.plan: SitePlan | None = None
        self.last_seen: dict[KeepAliveSource, datetime] = {}
        self.charger_seen: dict[str, datetime] = {}
        self.unreachable_since: dict[str, datetime] = {}
        self.target_kw: float | None = None
        self.site_load_kw = 0.0
        self.base_kw: dict[str, float] = {}  # the last real-time setpoints (before frequency)
        self.base_valid_until: datetime | None = None
        self.issued_kw: dict[str, float] = {}  # what we last asked each vehicle for
        self.issued_until: dict[str, datetime] = {}
        self.response: tuple[datetime, dict[str, float]] | None = None  # frequency deltas
        # Energy the frequency responses delivered, booked at the next tick: price
        # interval start -> (first response start, price, kWh by vehicle).
        self.unbooked: dict[datetime, tuple[datetime, float, dict[str, float]]] = {}
        self._setpoint_template: RequestSetpoint | None = None
        self._armed: tuple[dict[str, VehicleView], dict[str, float], ArmedResponse] | None = None
        self.in_band_since: datetime | None = None
        self.started_at: datetime | None = None
        self.last_frequency_hz: float | None = None
        self._views: tuple[datetime, dict[str, VehicleView]] | None = None
        # decision seq -> vehicles: our vehicle commands numbered above our own stream's
        # decision_seq when folded (a restart after a record was lost)
        self.orphans: dict[int, set[str]] = {}
        # numbers a previous incarnation may have had in flight (`reserve_in_flight`)
        self._maybe_in_flight: set[int] = set()
        self.position = 0

    # ------------------------------------------------------------------ input

    def apply_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Fold log rows (position, stream_id, stream_version, type, schema_version, payload,
        command_id; without command_id a lost decision record goes unnoticed)."""
        own = f"{self.controller_id}:"
        for row in rows:
            self.position = max(self.position, int(row["position"]))
            sid, kind = row["stream_id"], row["type"]
            if sid.startswith("vehicle-"):
                command_id = row.get("command_id")
                if command_id and command_id.startswith(own):
                    self._note_own_command(sid, command_id[len(own) :])
                if kind in _VEHICLE_TYPES:
                    self._apply_vehicle(sid, row)
            elif kind in _PRICE_TYPES and sid == f"market-{self.market_id}":
                event = load_event(kind, row["schema_version"], row["payload"])
                price = getattr(event, "price_eur_per_mwh", None)
                if price is None:
                    price = event.new_price_eur_per_mwh  # type: ignore[attr-defined]
                start = utc(event.interval_start)  # type: ignore[attr-defined]
                self.prices[start] = (event.interval_minutes, float(price))  # type: ignore[attr-defined]
            elif sid.startswith("charger-"):
                self._apply_charger(sid[len("charger-") :], row)
            elif sid == self.controller_id and row["stream_version"] > self.stream_version:
                event = load_event(kind, row["schema_version"], row["payload"])
                self.state = evolve(self.state, event)
                self.stream_version = int(row["stream_version"])

    def _note_own_command(self, sid: str, rest: str) -> None:
        """A vehicle event caused by our command `<controller>:<rest>`; keep seqs ahead of us.

        Our own decisions are numbered before they are sent, so in a running policy
        their vehicle events are never ahead; after a restart they are when the log
        lost the decision's record but kept its vehicle commands.
        """
        head = rest.partition(":")[0]
        if head.isdigit() and int(head) > self.state.decision_seq:
            self.orphans.setdefault(int(head), set()).add(sid[len("vehicle-") :])

    def _apply_vehicle(self, sid: str, row: Mapping[str, Any]) -> None:
        if sid in self._other_vehicles:
            return
        state = self.vehicles.get(sid)
        if state is None:
            if row["type"] != "VehicleRegistered":
                return
            event = load_event(row["type"], row["schema_version"], row["payload"])
            assert isinstance(event, VehicleRegistered)
            if event.site_id != self.site_id:
                self._other_vehicles.add(sid)
                return
            state = VEHICLE.initial_state(sid[len("vehicle-") :])
        event = load_event(row["type"], row["schema_version"], row["payload"])
        self.vehicles[sid] = VEHICLE.evolve(state, event)

    def _apply_charger(self, charger_id: str, row: Mapping[str, Any]) -> None:
        kind = row["type"]
        if kind in ("ChargerWentOffline", "ChargerSetpointRejected"):
            event = load_event(kind, row["schema_version"], row["payload"])
            if isinstance(event, ChargerWentOffline):
                self.charger_unreachable(charger_id, event.detected_at)
            elif isinstance(event, ChargerSetpointRejected) and event.reason in (
                "timeout",
                "station offline",
            ):
                self.charger_unreachable(charger_id, event.rejected_at)
            return
        if kind not in _CHARGER_SEEN:
            return
        event = load_event(kind, row["schema_version"], row["payload"])
        self.see_charger(charger_id, getattr(event, _CHARGER_SEEN[kind]))

    def see_charger(self, charger_id: str, at: datetime) -> None:
        """The charger spoke at `at`: it is reachable (again)."""
        at = utc(at)
        if charger_id not in self.charger_seen or at > self.charger_seen[charger_id]:
            self.charger_seen[charger_id] = at
        since = self.unreachable_since.get(charger_id)
        if since is not None and at >= since:
            del self.unreachable_since[charger_id]

    def charger_unreachable(self, charger_id: str, since: datetime) -> None:
        """The gateway found the charger unreachable at `since` (kept until it speaks)."""
        since = utc(since)
        seen = self.charger_seen.get(charger_id)
        if seen is not None and seen > since:
            return  # it spoke after that
        self.unreachable_since.setdefault(charger_id, since)

    def keep_alive(self, source: KeepAliveSource, at: datetime) -> Decision:
        """A keep-alive from `source`; resumes control if its silence had tripped the watchdog."""
        at = utc(at)
        self.last_seen[source] = max(at, self.last_seen.get(source, at))
        decision = Decision(at)
        if source in self.state.watchdog_tripped:
            self._record(
                decision,
                ResumeControl(
                    command_id=f"{self.controller_id}:resume:{source}:{at.isoformat()}",
                    issued_at=at,
                    site_id=self.site_id,
                    source=source,
                ),
            )
        return decision

    def set_target(self, target_kw: float | None) -> None:
        """A site power target from the coordinator (> 0 import), or None to follow the plan."""
        self.target_kw = target_kw

    # ------------------------------------------------------------------ helpers

    @property
    def config(self) -> DispatcherConfigured:
        if self.state.config is None:
            raise RuntimeError(f"dispatcher {self.site_id!r} is not configured")
        return self.state.config

    def reserve_in_flight(self, count: int) -> None:
        """Never reuse the next `count` decision numbers: a restart's call, after folding.

        A previous incarnation sends a decision's vehicle commands and its record at
        once; commands still in flight when it stopped reach the hosts only later, so
        folding the log cannot see them. Had this policy reused their number, the hosts
        would answer its new commands as repeats of the old ones and apply nothing.
        `count` is how many decisions one incarnation can have in flight (its
        concurrent calls); the next decision records them as orphaned first.
        """
        first = self.state.decision_seq + 1
        self._maybe_in_flight = set(range(first, first + count))
        for seq in self._maybe_in_flight:
            self.orphans.setdefault(seq, set())

    def _next_decision_seq(self, decision: Decision, at: datetime) -> int:
        """The seq of a new decision, after recording every orphaned one below it.

        Vehicle hosts answer a command id they have seen as a repeat, whatever it
        asks: a new decision reusing an orphan's seq would silently not be applied.
        """
        if self.orphans:
            self._record_orphans(decision, at)
        return self.state.decision_seq + 1

    def _record_orphans(self, decision: Decision, at: datetime) -> None:
        found = {seq: ids for seq, ids in self.orphans.items() if seq > self.state.decision_seq}
        self.orphans.clear()
        if not found:
            return  # their records were folded after their vehicle events
        first = self.state.decision_seq + 1
        for seq in range(first, max(found) + 1):  # the decider takes them one at a time
            ids = tuple(sorted(found.get(seq, ())))
            if ids:
                reason = (
                    f"decision {seq} reached {len(ids)} vehicle(s) but its own record is not "
                    "in the log (lost between the appends); its number is not reused"
                )
            elif seq in self._maybe_in_flight:
                reason = (
                    f"decision {seq} may have been in flight when the previous dispatcher "
                    "stopped (nothing of it in the log yet); its number is not reused"
                )
            else:
                reason = f"decision {seq} left no record and no vehicle command in the log"
            self._record(
                decision,
                RecordOrphanedDecision(
                    command_id=f"{self.controller_id}:orphan:{seq}",
                    issued_at=at,
                    site_id=self.site_id,
                    decision_seq=seq,
                    vehicle_ids=ids,
                    reason=reason,
                ),
            )
        self._maybe_in_flight.clear()
        decision.reasons.append(f"orphaned decisions recorded: {first}..{max(found)}")

    def _record(self, decision: Decision, command: Command) -> None:
        events = decide(command, self.state)  # type: ignore[arg-type]
        for event in events:
            self.state = evolve(self.state, event)
            self.stream_version += 1
        if events:
            decision.dispatch.append(command)

    def views(self, at: datetime) -> dict[str, VehicleView]:
        tmap = transformer_map(self.config)
        out: dict[str, VehicleView] = {}
        for state in self.vehicles.values():
            v = vehicle_view(state, at, self.controller_id, tmap)
            if v is not None:
                out[v.vehicle_id] = v
        return out

    def _plugged_ids(self) -> list[str]:
        return sorted(
            s.vehicle_id
            for s in self.vehicles.values()
            if s.connection is not None or s.lease is not None or s.setpoint is not None
        )

    def _unreachable(self, views: Mapping[str, VehicleView], at: datetime) -> set[str]:
        timeout = timedelta(seconds=self.config.charger_timeout_s)
        out = set()
        for v in views.values():
            c = v.charger_id
            if c is None:
                continue
            since = self.unreachable_since.get(c)
            if since is not None and at - since > timeout:
                out.add(v.vehicle_id)
        return out

    def price_at(self, at: datetime) -> float | None:
        interval = self._price_interval(at)
        return None if interval is None else interval[1]

    def _price_interval(self, at: datetime) -> tuple[datetime, float] | None:
        """The start and price of the price interval holding `at`."""
        for start, (minutes, price) in self.prices.items():
            if start <= at < start + timedelta(minutes=minutes):
                return start, price
        return None

    def interval_start(self, at: datetime) -> datetime:
        step = self.interval_minutes * 60
        epoch = at.timestamp()
        return datetime.fromtimestamp(epoch - epoch % step, at.tzinfo)

    def _horizon_prices(self, start: datetime) -> np.ndarray:
        out = []
        for k in range(self.horizon_intervals):
            price = self.price_at(start + timedelta(minutes=k * self.interval_minutes))
            if price is None:
                break
            out.append(price)
        return np.asarray(out, dtype=float)

    def _safe_state(
        self, decision: Decision, vehicle_ids: Iterable[str], at: datetime, reason: str
    ) -> None:
        seq = self.state.decision_seq
        for vid in vehicle_ids:
            decision.vehicle.append(
                EnforceSafeState(
                    command_id=f"{self.controller_id}:{seq}:{vid}",
                    issued_at=at,
                    vehicle_id=vid,
                    reason=reason,
                )
            )
            self.issued_kw.pop(vid, None)
            self.issued_until.pop(vid, None)
        self.base_kw = {}
        self._close_response(at)

    # ------------------------------------------------------------------ safety

    def emergency_stop(self, at: datetime, reason: str) -> Decision:
        """All discharge halts: every vehicle of the site to the safe state."""
        at = utc(at)
        decision = Decision(at, reasons=[f"emergency stop: {reason}"])
        ids = tuple(self._plugged_ids())
        seq = self._next_decision_seq(decision, at)
        self._record(
            decision,
            ActivateEmergencyStop(
                command_id=f"{self.controller_id}:{seq}",
                issued_at=at,
                site_id=self.site_id,
                decision_seq=seq,
                reason=reason,
                vehicle_ids=ids,
            ),
        )
        if decision.dispatch:
            self._safe_state(decision, ids, at, f"emergency stop: {reason}")
        return decision

    def clear_emergency_stop(self, at: datetime, reason: str) -> Decision:
        at = utc(at)
        decision = Decision(at)
        self._record(
            decision,
            ClearEmergencyStop(
                command_id=f"{self.controller_id}:clear-estop:{at.isoformat()}",
                issued_at=at,
                site_id=self.site_id,
                reason=reason,
            ),
        )
        return decision

    def check_watchdog(self, at: datetime) -> Decision:
        at = utc(at)
        decision = Decision(at)
        if self.started_at is None:
            self.started_at = at
        timeout = self.config.watchdog_timeout_s
        for source in self.watched:
            last = self.last_seen.get(source)
            since = last or self.started_at
            if (at - since).total_seconds() <= timeout or source in self.state.watchdog_tripped:
                continue
            ids = tuple(self._plugged_ids())
            seq = self._next_decision_seq(decision, at)
            self._record(
                decision,
                TripWatchdog(
                    command_id=f"{self.controller_id}:{seq}",
                    issued_at=at,
                    site_id=self.site_id,
                    decision_seq=seq,
                    source=source,
                    last_seen_at=last,
                    timeout_s=timeout,
                    vehicle_ids=ids,
                ),
            )
            reason = f"watchdog: no keep-alive from the {source} for {timeout:g} s"
            decision.reasons.append(reason)
            self._safe_state(decision, ids, at, reason)
        return decision

    # ------------------------------------------------------------------ grid signal

    def on_grid_signal(
        self,
        at: datetime,
        frequency_hz: float | None,
        regulation_signal: float = 0.0,
        site_load_kw: float | None = None,
        record: bool = True,
    ) -> Decision:
        """A grid measurement: anti-islanding, reconnection, droop response."""
        at = utc(at)
        cfg = self.config
        decision = self.keep_alive("grid_signal", at)
        if site_load_kw is not None:
            self.site_load_kw = site_load_kw
        if record:
            self._record(
                decision,
                RecordGridSignal(
                    command_id=f"{self.controller_id}:grid:{at.isoformat()}",
                    issued_at=at,
                    site_id=self.site_id,
                    frequency_hz=frequency_hz,
                    regulation_signal=regulation_signal,
                    site_load_kw=self.site_load_kw,
                ),
            )
        in_band = frequency_hz is not None and cfg.trip_low_hz <= frequency_hz <= cfg.trip_high_hz
        if not in_band:
            self.in_band_since = None
            if not self.state.islanded:
                lost = (
                    "grid frequency lost"
                    if frequency_hz is None
                    else (
                        f"frequency {frequency_hz:.3f} Hz outside {cfg.trip_low_hz:g}-"
                        f"{cfg.trip_high_hz:g} Hz"
                    )
                )
                reason = f"anti-islanding: {lost}"
                ids = tuple(self._plugged_ids())
                seq = self._next_decision_seq(decision, at)
                self._record(
                    decision,
                    TripAntiIslanding(
                        command_id=f"{self.controller_id}:{seq}",
                        issued_at=at,
                        site_id=self.site_id,
                        decision_seq=seq,
                        frequency_hz=frequency_hz,
                        reason=reason,
                        vehicle_ids=ids,
                    ),
                )
                decision.reasons.append(reason)
                self._safe_state(decision, ids, at, reason)
            return decision
        if self.state.islanded:
            self.in_band_since = self.in_band_since or at
            if (at - self.in_band_since).total_seconds() >= cfg.reconnect_delay_s:
                self._record(
                    decision,
                    ReconnectGrid(
                        command_id=f"{self.controller_id}:reconnect:{at.isoformat()}",
                        issued_at=at,
                        site_id=self.site_id,
                    ),
                )
            return decision
        assert frequency_hz is not None
        decision.extend(self.frequency_response(at, frequency_hz))
        return decision

    def _respond(self, armed: ArmedResponse, hours: float, f_hz: float) -> tuple[np.ndarray, bool]:
        """The droop response around the armed base, and whether discharge is throttled."""
        cfg = self.config
        # P_rated: the nameplate of the direction asked for (export below nominal frequency)
        rated_kw = armed.rated_discharge_kw if f_hz < cfg.nominal_hz else armed.rated_charge_kw
        export_kw = droop_export_kw(f_hz, rated_kw, cfg.nominal_hz, cfg.droop, cfg.deadband_hz)
        reserved_kw = rated_kw * cfg.regulation_share if cfg.regulation_share > 0 else rated_kw
        export_kw = max(-reserved_kw, min(reserved_kw, export_kw))
        new = armed.split(export_kw, hours)
        throttle = f_hz >= cfg.alert_high_hz
        if throttle:
            new = np.maximum(0.0, new)
        return new, throttle

    def armed_response(self, at: datetime) -> ArmedResponse:
        """The droop response prepared for the current base and views (built when they change)."""
        views = self._cached_views(at)
        if self._armed is None or self._armed[0] is not views or self._armed[1] is not self.base_kw:
            self._armed = (views, self.base_kw, arm_response(self.base_kw, views))
        return self._armed[2]

    def frequency_response(self, at: datetime, frequency_hz: float) -> Decision:
        """Droop around the real-time setpoints; discharge throttled on over-frequency alert.

        The fast path of the dispatcher: the response is pre-armed at each tick, and the
        energy it delivers is booked at the next tick, so a frequency event costs its
        own record and one `RequestSetpoint` per vehicle whose power moves.
        """
        decision = Decision(at)
        self.last_frequency_hz = frequency_hz
        if self.state.halted is not None or self.base_valid_until is None:
            return decision
        if at >= self.base_valid_until or not self.base_kw:
            return decision
        armed = self.armed_response(at)
        hours = (self.base_valid_until - at).total_seconds() / 3600.0
        new, throttle = self._respond(armed, hours, frequency_hz)
        delta = armed.base_kw - new
        moved = np.flatnonzero(np.abs(delta) > 1e-9)
        ids = armed.vehicle_ids
        deltas = dict(zip([ids[i] for i in moved], delta[moved].tolist(), strict=True))
        if not deltas and self.response is None:
            return decision
        self._close_response(at)
        self.response = (at, deltas) if deltas else None
        seq = self._next_decision_seq(decision, at)
        self._record(
            decision,
            IssueFrequencyResponse(
                command_id=f"{self.controller_id}:{seq}",
                issued_at=at,
                site_id=self.site_id,
                decision_seq=seq,
                frequency_hz=frequency_hz,
                export_kw=round(sum(deltas.values()), 6),
                throttled_discharge=throttle,
                vehicle_count=len(deltas),
            ),
        )
        self._frequency_setpoints(decision, ids, new.tolist(), self.base_valid_until, at)
        return decision

    def _frequency_setpoints(
        self,
        decision: Decision,
        vehicle_ids: Sequence[str],
        power_kw: Sequence[float],
        valid_until: datetime,
        at: datetime,
    ) -> None:
        """RequestSetpoint where the power moved; named by the frequency decision's seq."""
        seq = self.state.decision_seq
        issued_kw, issued_until = self.issued_kw, self.issued_until
        moved_ids: list[str] = []
        moved_kw: list[float] = []
        for vid, power in zip(vehicle_ids, power_kw, strict=True):
            p = round(power, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
            last = issued_kw.get(vid)
            if last is None:
                if p == 0.0 and self.vehicles[f"vehicle-{vid}"].setpoint is None:
                    continue  # idle and never asked: nothing to say
            elif abs(last - p) < 1e-9:
                continue
            moved_ids.append(vid)
            moved_kw.append(p)
            issued_kw[vid] = p
            issued_until[vid] = valid_until
        if not moved_ids:
            return
        # The same commands `_setpoint` builds, as columns sharing the decision's
        # fields: on the path of every frequency event (1,000 vehicles), they reach
        # the shards without one object per command. Not validated again, as in
        # `_setpoint`: the vehicle decider judges every one.
        decision.setpoints.append(
            RequestSetpoints.model_construct(
                command_id_prefix=f"{self.controller_id}:{seq}:",
                issued_at=at,
                correlation_id="",
                traceparent="",
                controller_id=self.controller_id,
                valid_until=valid_until,
                vehicle_ids=tuple(moved_ids),
                power_kw=tuple(moved_kw),
            )
        )

    def _setpoint(
        self, seq: int, vehicle_id: str, power_kw: float, valid_until: datetime, at: datetime
    ) -> RequestSetpoint:
        # Built from the policy's own validated state, so not validated again (the
        # vehicle decider checks every limit anyway). Copying one template per decision
        # is ~2.5 us a command against ~4 for `model_construct`; a frequency event
        # builds 1,000 of them.
        template = self._setpoint_template
        if template is None or template.issued_at != at or template.valid_until != valid_until:
            template = RequestSetpoint.model_construct(
                command_id=self.controller_id,
                issued_at=at,
                correlation_id="",
                vehicle_id="",
                controller_id=self.controller_id,
                power_kw=0.0,
                valid_until=valid_until,
            )
            self._setpoint_template = template
        return template.model_copy(
            update={
                "command_id": f"{self.controller_id}:{seq}:{vehicle_id}",
                "vehicle_id": vehicle_id,
                "power_kw": power_kw,
            }
        )

    def _close_response(self, at: datetime) -> None:
        """End the active frequency response; its energy waits, per vehicle, for the tick.

        Booking is per vehicle, so booking every response as it closes would put a
        command per vehicle on each frequency event's path (and in the log): the
        energy is summed per price interval instead and booked by `tick`.
        """
        if self.response is None:
            return
        started, deltas = self.response
        self.response = None
        hours = (at - started).total_seconds() / 3600.0
        interval = self._price_interval(started)
        if hours <= 0 or interval is None:
            return
        interval_start, price = interval
        _, _, energy = self.unbooked.setdefault(interval_start, (started, price, {}))
        for vid, delta_kw in deltas.items():
            energy[vid] = energy.get(vid, 0.0) + delta_kw * hours

    def _book_regulation_energy(self, decision: Decision, at: datetime) -> None:
        """Book the energy the frequency responses delivered since the last booking."""
        for started, price, energy in self.unbooked.values():
            for vid, energy_kwh in sorted(energy.items()):
                if energy_kwh == 0.0:
                    continue
                self._record(
                    decision,
                    RecordRegulationEnergy(
                        command_id=f"{self.controller_id}:reg-energy:{started.isoformat()}:{vid}",
                        issued_at=at,
                        site_id=self.site_id,
                        vehicle_id=vid,
                        interval_start=started,
                        energy_kwh=energy_kwh,
                        price_eur_per_mwh=price,
                    ),
                )
        self.unbooked.clear()

    # ------------------------------------------------------------------ the tick

    def replan_reasons(self, views: Mapping[str, VehicleView], at: datetime) -> list[str]:
        p = self.plan
        if p is None:
            return ["no plan yet"]
        reasons = []
        if at >= p.horizon_end:
            reasons.append("horizon ended")
        controllable = {vid for vid, v in views.items() if not v.foreign}
        if controllable != set(p.vehicle_ids):
            reasons.append("vehicles plugged in or unplugged")
        if any(plan_inputs(views[vid]) != p.inputs.get(vid) for vid in controllable):
            reasons.append("trip plans changed")
        for vid in sorted(controllable & set(p.vehicle_ids)):
            planned = p.planned_soc(vid, at, views[vid].capacity_kwh)
            if planned is not None and abs(planned - views[vid].soc) > _SOC_DEPARTURE:
                reasons.append("telemetry departs from the plan")
                break
        start = self.interval_start(at)
        known = self._price_key(start)
        planned_prices = p.price_key[max(0, p.interval_at(start)) :]
        overlap = min(len(known), len(planned_prices))
        if known[:overlap] != planned_prices[:overlap]:
            reasons.append("prices revised")
        elif len(known) > len(planned_prices) and len(p.price_key) < self.horizon_intervals:
            reasons.append("new prices published")
        return reasons

    def _price_key(self, start: datetime) -> tuple[tuple[str, float], ...]:
        prices = self._horizon_prices(start)
        return tuple(
            ((start + timedelta(minutes=k * self.interval_minutes)).isoformat(), float(p))
            for k, p in enumerate(prices)
        )

    def plan_job(self, at: datetime) -> PlanJob | None:
        """What `tick(at)` would solve, if it would re-plan now; changes nothing."""
        at = utc(at)
        if self.state.config is None or self.state.halted is not None:
            return None
        views = self.views(at)
        if not self.replan_reasons(views, at):
            return None
        return self._plan_job(views, at)

    def _plan_job(self, views: Mapping[str, VehicleView], at: datetime) -> PlanJob | None:
        start = self.interval_start(at)
        prices = self._horizon_prices(start)
        if prices.size == 0:
            return None
        chosen = tuple(views[vid] for vid in sorted(views) if not views[vid].foreign)
        return PlanJob(start, chosen, prices, self.config, self.interval_minutes)

    def _replan(
        self,
        decision: Decision,
        views: Mapping[str, VehicleView],
        at: datetime,
        reasons: list[str],
        solved: SolvedPlan | None = None,
    ) -> None:
        cfg = self.config
        job = self._plan_job(views, at)
        if job is None:
            return
        if solved is None or not solved.job.same_inputs(job):
            solved = job.solve()
        start, chosen, prices = job.start, job.chosen, job.prices
        power, energy, objective = solved.power_kw, solved.energy_kwh, solved.objective_eur
        # The planner's energies are in its reduced capacity; shift back by nothing: the
        # bottom of the band is the same energy, so energy_kwh is the stored energy.
        ids = tuple(v.vehicle_id for v in chosen)
        seq = self.state.plan_seq + 1
        arbitrage = 1.0 - cfg.regulation_share - cfg.peak_shaving_share
        self.plan = SitePlan(
            plan_seq=seq,
            horizon_start=start,
            interval_minutes=self.interval_minutes,
            vehicle_ids=ids,
            power_kw=power,
            energy_kwh=energy,
            objective_eur=objective,
            inputs={v.vehicle_id: plan_inputs(v) for v in chosen},
            price_key=self._price_key(start),
        )
        self._record(
            decision,
            AdoptPlan(
                command_id=f"{self.controller_id}:plan:{seq}",
                issued_at=at,
                site_id=self.site_id,
                plan_seq=seq,
                horizon_start=start,
                interval_minutes=self.interval_minutes,
                horizon_intervals=int(prices.size),
                arbitrage_share=max(0.0, arbitrage),
                regulation_share=cfg.regulation_share,
                peak_shaving_share=cfg.peak_shaving_share,
                objective_eur=round(objective, 6),
                replan_reasons=tuple(reasons),
                vehicle_ids=ids,
                setpoints_kw=solved.setpoints_kw,
            ),
        )
        decision.reasons.append("re-planned: " + ", ".join(reasons))

    def _cached_views(self, at: datetime) -> dict[str, VehicleView]:
        # A frequency event must be answered in milliseconds: the views of the last tick
        # (seconds old) are good enough, and the vehicle decider re-checks every limit.
        if self._views is None or abs((at - self._views[0]).total_seconds()) > 5.0:
            self._views = (at, self.views(at))
        return self._views[1]

    def tick(
        self, at: datetime, valid_for_s: float | None = None, solved: SolvedPlan | None = None
    ) -> Decision:
        """Decide the site's setpoints at `at`: safety, leases, (re-)plan, real-time allocation.

        Setpoints hold until the interval ends, at most half a lease (`lease_s`) and at
        most `valid_for_s`; leases are renewed when less than half is left. `solved`:
        a plan solved ahead from `plan_job(at)`, used if a re-plan needs exactly it.
        """
        at = utc(at)
        cfg = self.config
        decision = self.check_watchdog(at)
        if self.state.halted is not None:
            decision.reasons.append(self.state.halted)
            self._book_regulation_energy(decision, at)
            return decision
        views = self.views(at)
        self._views = (at, views)
        unreachable = self._unreachable(views, at)
        reasons = self.replan_reasons(views, at)
        if reasons:
            self._replan(decision, views, at, reasons, solved)
        interval_start = self.interval_start(at)
        valid_until = min(
            interval_start + timedelta(minutes=self.interval_minutes),
            at + timedelta(seconds=cfg.lease_s / 2),
        )
        if valid_for_s is not None:
            valid_until = min(valid_until, at + timedelta(seconds=valid_for_s))
        hours = (valid_until - at).total_seconds() / 3600.0
        usable = {vid: v for vid, v in views.items() if not v.foreign}
        self._renew_leases(decision, usable, at)
        # The plan's power, then the coordinator's target, then the peak threshold.
        power: dict[str, float] = {}
        for vid, v in usable.items():
            planned = self.plan.power_at(vid, at) if self.plan else 0.0
            power[vid] = 0.0 if vid in unreachable else v.clamp(planned, hours)
        movable = {vid: p for vid, p in power.items() if vid not in unreachable}
        if self.target_kw is not None:
            allocate(sum(movable.values()) - self.target_kw, movable, usable, hours)
        avoided_kw = 0.0
        threshold = cfg.peak_threshold_kw
        if threshold is not None:
            site_kw = self.site_load_kw + sum(movable.values())
            if site_kw > threshold:
                avoided_kw = allocate(site_kw - threshold, movable, usable, hours)
        power.update(movable)
        enforce_transformers(power, usable, cfg.transformers, hours)
        power = {vid: usable[vid].clamp(p, hours) for vid, p in power.items()}
        self._close_response(at)
        self.base_kw = {vid: p for vid, p in power.items() if vid not in unreachable}
        self.base_valid_until = valid_until
        kind: DecisionKind = "peak_shaving" if avoided_kw > 0 else "plan"
        if self.target_kw is not None:
            kind = "target"
        if unreachable:
            decision.reasons.append(f"chargers unreachable: {sorted(unreachable)}")
        self._setpoint_commands(decision, power, valid_until, at, kind=kind)
        if self.last_frequency_hz is not None:
            decision.extend(self.frequency_response(at, self.last_frequency_hz))
        elif self.base_kw:
            self.armed_response(at)  # pre-armed: the next frequency event only scales it
        self._book_regulation_energy(decision, at)
        if avoided_kw > 1e-6 and threshold is not None:
            self._record(
                decision,
                RecordPeakShaving(
                    command_id=f"{self.controller_id}:peak:{interval_start.isoformat()}",
                    issued_at=at,
                    site_id=self.site_id,
                    interval_start=interval_start,
                    interval_minutes=self.interval_minutes,
                    avoided_peak_kw=round(avoided_kw, 6),
                    demand_charge_eur_per_kw_month=cfg.demand_charge_eur_per_kw_month,
                ),
            )
        if cfg.regulation_share > 0 and cfg.regulation_price_eur_per_mw_per_h > 0:
            live = [v for vid, v in usable.items() if vid not in unreachable]
            up_kw = cfg.regulation_share * sum(v.rated_discharge_kw for v in live)
            down_kw = cfg.regulation_share * sum(v.rated_charge_kw for v in live)
            reserved_kw = up_kw + down_kw
            if reserved_kw > 0:
                self._record(
                    decision,
                    ReserveRegulationCapacity(
                        command_id=f"{self.controller_id}:reserve:{interval_start.isoformat()}",
                        issued_at=at,
                        site_id=self.site_id,
                        interval_start=interval_start,
                        interval_minutes=self.interval_minutes,
                        up_kw=round(up_kw, 6),
                        down_kw=round(down_kw, 6),
                        price_eur_per_mw_per_h=cfg.regulation_price_eur_per_mw_per_h,
                    ),
                )
        return decision

    def _renew_leases(
        self, decision: Decision, usable: Mapping[str, VehicleView], at: datetime
    ) -> None:
        """GrantControl where our lease is missing or has less than half left."""
        lease_s = self.config.lease_s
        lease_until = at + timedelta(seconds=lease_s)
        for vid, v in sorted(usable.items()):
            lease = self.vehicles[f"vehicle-{vid}"].lease
            if (
                v.controlled
                and lease is not None
                and (lease.lease_until - at).total_seconds() >= lease_s / 2
            ):
                continue
            decision.vehicle.append(
                GrantControl(
                    command_id=f"{self.controller_id}:grant:{lease_until.isoformat()}:{vid}",
                    issued_at=at,
                    vehicle_id=vid,
                    controller_id=self.controller_id,
                    lease_until=lease_until,
                )
            )

    def _setpoint_commands(
        self,
        decision: Decision,
        power: Mapping[str, float],
        valid_until: datetime,
        at: datetime,
        kind: DecisionKind = "plan",
    ) -> None:
        """RequestSetpoint where power changed or the last one runs short; records the decision.

        (A frequency response has its own path, `_frequency_setpoints`.)
        """
        refresh_s = self.config.lease_s / 4
        changed: list[VehicleSetpoint] = []
        for vid in sorted(power):
            p = round(power[vid], 6) + 0.0  # + 0.0 turns -0.0 into 0.0
            last = self.issued_kw.get(vid)
            until = self.issued_until.get(vid)
            if last is None and p == 0.0 and self.vehicles[f"vehicle-{vid}"].setpoint is None:
                continue  # idle and never asked: nothing to say
            running_short = until is None or (until - at).total_seconds() < refresh_s
            if last is not None and abs(last - p) < _SAME_KW and not running_short:
                continue
            changed.append(VehicleSetpoint(vehicle_id=vid, power_kw=p))
        if not changed:
            return
        seq = self._next_decision_seq(decision, at)
        self._record(
            decision,
            IssueSetpoints(
                command_id=f"{self.controller_id}:{seq}",
                issued_at=at,
                site_id=self.site_id,
                decision_seq=seq,
                kind=kind,
                valid_until=valid_until,
                setpoints=tuple(changed),
            ),
        )
        for s in changed:
            decision.vehicle.append(self._setpoint(seq, s.vehicle_id, s.power_kw, valid_until, at))
            self.issued_kw[s.vehicle_id] = s.power_kw
            self.issued_until[s.vehicle_id] = valid_until


__all__ = [
    "DISPATCH",
    "ActivateEmergencyStop",
    "AdoptPlan",
    "ArmedResponse",
    "ClearEmergencyStop",
    "ConfigureDispatcher",
    "Decision",
    "DispatchCommand",
    "DispatchState",
    "IssueFrequencyResponse",
    "IssueSetpoints",
    "PlanJob",
    "ReconnectGrid",
    "RecordGridSignal",
    "RecordOrphanedDecision",
    "RecordPeakShaving",
    "RecordRegulationEnergy",
    "ReserveRegulationCapacity",
    "ResumeControl",
    "SitePlan",
    "SitePolicy",
    "SolvedPlan",
    "TripAntiIslanding",
    "TripWatchdog",
    "VehicleView",
    "allocate",
    "arm_response",
    "build_problem",
    "decide",
    "discharge_order",
    "droop_export_kw",
    "enforce_transformers",
    "evolve",
    "initial_state",
    "split_by_headroom",
    "transformer_loads_kw",
    "vehicle_view",
]
