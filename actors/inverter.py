"""The inverter: a pure decider over one bidirectional grid-tied inverter.

Safety lives here, not in the gateway or the dispatcher: a setpoint is clamped to
the rating, derated linearly between `derate_above_c` (full power) and
`safe_state_above_c` (zero), and refused while the inverter is in its safe state.
A measurement above `safe_state_above_c` puts it in the safe state (setpoint 0 kW);
it leaves it once a measurement is back at or below `derate_above_c` (hysteresis).

Sign: `power_kw > 0` charges (import), `power_kw < 0` discharges (export).
"""

from __future__ import annotations

import math

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from actors.decider import CommandRejected, Decider, UnknownEntity
from events.base import Command, Event
from events.inverter import (
    FaultKind,
    InverterFaulted,
    InverterMeasured,
    InverterRegistered,
    InverterSafeStateEntered,
    InverterSafeStateLeft,
    InverterSetpointAccepted,
    InverterSetpointConfirmed,
    InverterSetpointDerated,
    InverterSetpointMismatched,
    InverterSetpointRefused,
)

_KW_RESOLUTION = 3  # decimals kept in a granted setpoint (1 W)


# --- commands --------------------------------------------------------------------


class InverterCommand(Command):
    inverter_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")

    @property
    def stream_id(self) -> str:
        return f"inverter-{self.inverter_id}"


class RegisterInverter(InverterCommand):
    site_id: str = Field(min_length=1, max_length=100)
    rated_power_kw: float = Field(gt=0, allow_inf_nan=False)
    derate_above_c: float = Field(default=65.0, allow_inf_nan=False)
    safe_state_above_c: float = Field(default=85.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> RegisterInverter:
        if not self.derate_above_c < self.safe_state_above_c:
            raise ValueError("derate_above_c must be below safe_state_above_c")
        return self


class RequestInverterSetpoint(InverterCommand):
    power_kw: float = Field(allow_inf_nan=False)


class RecordInverterMeasurement(InverterCommand):
    measured_at: AwareDatetime
    active_power_kw: float = Field(allow_inf_nan=False)
    dc_voltage_v: float = Field(ge=0, allow_inf_nan=False)
    temperature_c: float = Field(ge=-60, le=200, allow_inf_nan=False)
    status: int = Field(ge=0, le=0xFFFF)
    fault_code: int = Field(ge=0, le=0xFFFF)


class RecordInverterFault(InverterCommand):
    """A failed exchange with the device; `issued_at` is when it was observed."""

    fault_kind: FaultKind
    detail: str = Field(max_length=500)
    exception_code: int | None = Field(default=None, ge=1, le=0xFF)
    retry_count: int = Field(ge=0)


class RecordSetpointConfirmed(InverterCommand):
    power_kw: float = Field(allow_inf_nan=False)


class RecordSetpointMismatch(InverterCommand):
    expected_power_kw: float = Field(allow_inf_nan=False)
    read_back_power_kw: float = Field(allow_inf_nan=False)


InverterCommands = (
    RegisterInverter
    | RequestInverterSetpoint
    | RecordInverterMeasurement
    | RecordInverterFault
    | RecordSetpointConfirmed
    | RecordSetpointMismatch
)


# --- state -----------------------------------------------------------------------


class InverterState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    inverter_id: str
    registered: bool = False
    site_id: str = ""
    rated_power_kw: float = 0.0
    derate_above_c: float = 65.0
    safe_state_above_c: float = 85.0
    setpoint_kw: float = 0.0
    confirmed_setpoint_kw: float | None = None
    safe_state: bool = False
    last_measured_at: AwareDatetime | None = None
    active_power_kw: float | None = None
    dc_voltage_v: float | None = None
    temperature_c: float | None = None
    status: int | None = None
    fault_code: int | None = None
    last_fault: tuple[AwareDatetime, str, int] | None = None
    fault_count: int = 0
    last_refusal: tuple[float, str] | None = None
    last_mismatch: tuple[float, float] | None = None


def initial_state(inverter_id: str) -> InverterState:
    return InverterState(inverter_id=inverter_id)


def thermal_limit_kw(state: InverterState, temperature_c: float | None) -> float:
    """The largest |power| the inverter may run at this temperature."""
    if temperature_c is None or temperature_c <= state.derate_above_c:
        return state.rated_power_kw
    if temperature_c > state.safe_state_above_c:
        return 0.0
    span = state.safe_state_above_c - state.derate_above_c
    return state.rated_power_kw * (state.safe_state_above_c - temperature_c) / span


# --- evolve ----------------------------------------------------------------------


def evolve(state: InverterState, event: Event) -> InverterState:
    match event:
        case InverterRegistered():
            return state.model_copy(
                update={
                    "registered": True,
                    "site_id": event.site_id,
                    "rated_power_kw": event.rated_power_kw,
                    "derate_above_c": event.derate_above_c,
                    "safe_state_above_c": event.safe_state_above_c,
                }
            )
        case InverterSetpointAccepted():
            return state.model_copy(update={"setpoint_kw": event.power_kw, "last_refusal": None})
        case InverterSetpointRefused():
            return state.model_copy(
                update={"last_refusal": (event.requested_power_kw, event.reason)}
            )
        case InverterSetpointDerated():
            return state.model_copy(update={"setpoint_kw": event.power_kw})
        case InverterSafeStateEntered():
            return state.model_copy(update={"safe_state": True, "setpoint_kw": 0.0})
        case InverterSafeStateLeft():
            return state.model_copy(update={"safe_state": False, "last_refusal": None})
        case InverterMeasured():
            return state.model_copy(
                update={
                    "last_measured_at": event.measured_at,
                    "active_power_kw": event.active_power_kw,
                    "dc_voltage_v": event.dc_voltage_v,
                    "temperature_c": event.temperature_c,
                    "status": event.status,
                    "fault_code": event.fault_code,
                }
            )
        case InverterFaulted():
            return state.model_copy(
                update={
                    "last_fault": (event.observed_at, event.fault_kind, event.retry_count),
                    "fault_count": state.fault_count + 1,
                }
            )
        case InverterSetpointConfirmed():
            return state.model_copy(
                update={"confirmed_setpoint_kw": event.power_kw, "last_mismatch": None}
            )
        case InverterSetpointMismatched():
            return state.model_copy(
                update={
                    "confirmed_setpoint_kw": None,
                    "last_mismatch": (event.expected_power_kw, event.read_back_power_kw),
                }
            )
    return state


# --- decide ----------------------------------------------------------------------


def decide(command: InverterCommands, state: InverterState) -> list[Event]:
    if isinstance(command, RegisterInverter):
        return _register(command, state)
    if not state.registered:
        raise UnknownEntity(f"inverter {command.inverter_id!r} is not registered")
    match command:
        case RequestInverterSetpoint():
            return _request_setpoint(command, state)
        case RecordInverterMeasurement():
            return _record_measurement(command, state)
        case RecordInverterFault():
            key = (command.issued_at, command.fault_kind, command.retry_count)
            if state.last_fault == key:
                return []
            return [
                InverterFaulted(
                    inverter_id=command.inverter_id,
                    observed_at=command.issued_at,
                    fault_kind=command.fault_kind,
                    detail=command.detail,
                    exception_code=command.exception_code,
                    retry_count=command.retry_count,
                )
            ]
        case RecordSetpointConfirmed():
            if state.confirmed_setpoint_kw == command.power_kw:
                return []
            return [
                InverterSetpointConfirmed(
                    inverter_id=command.inverter_id,
                    power_kw=command.power_kw,
                    confirmed_at=command.issued_at,
                )
            ]
        case RecordSetpointMismatch():
            if state.last_mismatch == (command.expected_power_kw, command.read_back_power_kw):
                return []
            return [
                InverterSetpointMismatched(
                    inverter_id=command.inverter_id,
                    expected_power_kw=command.expected_power_kw,
                    read_back_power_kw=command.read_back_power_kw,
                    observed_at=command.issued_at,
                )
            ]
    raise CommandRejected(f"the inverter does not handle {type(command).__name__}")


def _register(command: RegisterInverter, state: InverterState) -> list[Event]:
    wanted = (
        command.site_id,
        command.rated_power_kw,
        command.derate_above_c,
        command.safe_state_above_c,
    )
    if state.registered:
        held = (
            state.site_id,
            state.rated_power_kw,
            state.derate_above_c,
            state.safe_state_above_c,
        )
        if held == wanted:
            return []
        raise CommandRejected(
            f"inverter {command.inverter_id!r} is already registered with "
            f"site {state.site_id!r}, {state.rated_power_kw} kW, derate above "
            f"{state.derate_above_c} °C, safe state above {state.safe_state_above_c} °C"
        )
    return [
        InverterRegistered(
            inverter_id=command.inverter_id,
            site_id=command.site_id,
            rated_power_kw=command.rated_power_kw,
            derate_above_c=command.derate_above_c,
            safe_state_above_c=command.safe_state_above_c,
        )
    ]


def _request_setpoint(command: RequestInverterSetpoint, state: InverterState) -> list[Event]:
    requested = command.power_kw
    if state.safe_state:
        reason = (
            f"inverter is in its safe state (temperature {state.temperature_c} °C "
            f"above {state.safe_state_above_c} °C); setpoints are refused until it cools "
            f"to {state.derate_above_c} °C"
        )
        if state.last_refusal == (requested, reason):
            return []
        return [
            InverterSetpointRefused(
                inverter_id=command.inverter_id, requested_power_kw=requested, reason=reason
            )
        ]
    reasons = []
    limit_kw = state.rated_power_kw
    if abs(requested) > limit_kw:
        reasons.append(f"clamped to the rating of {state.rated_power_kw} kW")
    thermal_kw = thermal_limit_kw(state, state.temperature_c)
    if thermal_kw < limit_kw and abs(requested) > thermal_kw:
        reasons.append(
            f"derated to {round(thermal_kw, _KW_RESOLUTION)} kW at {state.temperature_c} °C "
            f"(linear from {state.derate_above_c} °C to {state.safe_state_above_c} °C)"
        )
    limit_kw = min(limit_kw, thermal_kw)
    granted = round(math.copysign(min(abs(requested), limit_kw), requested), _KW_RESOLUTION)
    granted = granted + 0.0  # no negative zero in the log
    if granted == state.setpoint_kw:
        return []
    return [
        InverterSetpointAccepted(
            inverter_id=command.inverter_id,
            requested_power_kw=requested,
            power_kw=granted,
            temperature_c=state.temperature_c,
            reason="; ".join(reasons),
        )
    ]


def _record_measurement(command: RecordInverterMeasurement, state: InverterState) -> list[Event]:
    if state.last_measured_at is not None and command.measured_at <= state.last_measured_at:
        return []  # a repeated or late sample: the state already holds a newer one
    temperature_c = command.temperature_c
    events: list[Event] = [
        InverterMeasured(
            inverter_id=command.inverter_id,
            measured_at=command.measured_at,
            active_power_kw=command.active_power_kw,
            dc_voltage_v=command.dc_voltage_v,
            temperature_c=temperature_c,
            status=command.status,
            fault_code=command.fault_code,
        )
    ]
    if not state.safe_state and temperature_c > state.safe_state_above_c:
        events.append(
            InverterSafeStateEntered(
                inverter_id=command.inverter_id,
                temperature_c=temperature_c,
                reason=(
                    f"temperature {temperature_c} °C above {state.safe_state_above_c} °C: "
                    "setpoint forced to 0 kW"
                ),
            )
        )
    elif state.safe_state and temperature_c <= state.derate_above_c:
        events.append(
            InverterSafeStateLeft(inverter_id=command.inverter_id, temperature_c=temperature_c)
        )
    elif not state.safe_state:
        limit_kw = thermal_limit_kw(state, temperature_c)
        if abs(state.setpoint_kw) > limit_kw:
            power_kw = round(math.copysign(limit_kw, state.setpoint_kw), _KW_RESOLUTION) + 0.0
            events.append(
                InverterSetpointDerated(
                    inverter_id=command.inverter_id,
                    previous_power_kw=state.setpoint_kw,
                    power_kw=power_kw,
                    temperature_c=temperature_c,
                    reason=(
                        f"derated to {power_kw} kW at {temperature_c} °C (linear from "
                        f"{state.derate_above_c} °C to {state.safe_state_above_c} °C)"
                    ),
                )
            )
    return events


INVERTER: Decider[InverterState] = Decider(
    kind="inverter",
    command_types=(
        RegisterInverter,
        RequestInverterSetpoint,
        RecordInverterMeasurement,
        RecordInverterFault,
        RecordSetpointConfirmed,
        RecordSetpointMismatch,
    ),
    state_type=InverterState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)

__all__ = [
    "INVERTER",
    "InverterCommand",
    "InverterState",
    "RecordInverterFault",
    "RecordInverterMeasurement",
    "RecordSetpointConfirmed",
    "RecordSetpointMismatch",
    "RegisterInverter",
    "RequestInverterSetpoint",
    "decide",
    "evolve",
    "initial_state",
    "thermal_limit_kw",
]
