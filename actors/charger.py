"""The charger: a pure decider over one OCPP charging station.

The station is the authority on what happened at the plug (boots, connector
status, transactions, meter readings, the EV's charging needs); the gateway turns
each OCPP message into a `Record*` command with a deterministic id, and this
module turns it into facts. What the fleet *asks* of the station is recorded once
the station answered (`RecordSetpointSent` / `RecordSetpointRejected`).

Power divergence: while a setpoint is in force, a metered power further from it
than `max(divergence_tolerance_kw, divergence_tolerance_ratio * |setpoint|)` for
`divergence_samples` consecutive samples emits `ChargerPowerDivergenceDetected`
once; the first sample back inside the tolerance emits
`ChargerPowerDivergenceCleared`.

The second decider here, `OCPP_GATEWAY`, records what the CSMS gateway refused
(connections and messages) on `ocpp-gateway-{gateway_id}` and counts it.

Sign: `power_kw > 0` charges the vehicle, `< 0` discharges it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from actors.decider import CommandRejected, Decider, UnknownEntity
from events.base import Command, Event
from events.charger import (
    AllowedEnergyTransferRecorded,
    ChargerAuthorizationRecorded,
    ChargerBooted,
    ChargerCameOnline,
    ChargerHeartbeatReceived,
    ChargerMeterValuesRecorded,
    ChargerPowerDivergenceCleared,
    ChargerPowerDivergenceDetected,
    ChargerRegistered,
    ChargerSetpointRejected,
    ChargerSetpointSent,
    ChargerWentOffline,
    ChargingNeedsRecorded,
    ChargingTransactionEnded,
    ChargingTransactionStarted,
    ChargingTransactionUpdated,
    ConnectorStatusChanged,
    OcppConnectionRejected,
    OcppMessageRejected,
    OcppVersion,
    SetpointRejectionReason,
)

_ID = r"^[A-Za-z0-9_.:*+|@-]+$"  # OCPP identifierString, minus characters a URL path mangles

# --- commands --------------------------------------------------------------------


class ChargerCommand(Command):
    charger_id: str = Field(min_length=1, max_length=48, pattern=_ID)

    @property
    def stream_id(self) -> str:
        return f"charger-{self.charger_id}"


class RegisterCharger(ChargerCommand):
    site_id: str = Field(min_length=1, max_length=100)
    max_charge_kw: float = Field(gt=0, allow_inf_nan=False)
    max_discharge_kw: float = Field(ge=0, allow_inf_nan=False)
    ocpp_version: OcppVersion
    divergence_tolerance_kw: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    divergence_tolerance_ratio: float = Field(default=0.10, ge=0, le=1)
    divergence_samples: int = Field(default=3, ge=1)


class RecordBoot(ChargerCommand):
    vendor: str = Field(max_length=50)
    model: str = Field(max_length=50)
    firmware_version: str = Field(default="", max_length=50)
    serial_number: str = Field(default="", max_length=50)
    reason: str = Field(max_length=50)
    ocpp_version: OcppVersion


class RecordHeartbeat(ChargerCommand):
    pass


class RecordStatus(ChargerCommand):
    evse_id: int = Field(ge=0)
    connector_id: int = Field(ge=0)
    status: Literal["Available", "Occupied", "Reserved", "Unavailable", "Faulted"]
    reported_at: AwareDatetime


class RecordAuthorization(ChargerCommand):
    id_token: str = Field(max_length=255)
    token_type: str = Field(max_length=50)
    status: str = Field(max_length=50)


class RecordTransactionEvent(ChargerCommand):
    event_type: Literal["Started", "Updated", "Ended"]
    transaction_id: str = Field(min_length=1, max_length=36)
    seq_no: int = Field(ge=0)
    evse_id: int | None = Field(default=None, ge=0)
    id_token: str = Field(default="", max_length=255)
    trigger_reason: str = Field(max_length=50)
    stopped_reason: str = Field(default="", max_length=50)
    reported_at: AwareDatetime


class RecordMeterValues(ChargerCommand):
    evse_id: int = Field(ge=0)
    transaction_id: str = Field(default="", max_length=36)
    sampled_at: AwareDatetime
    power_kw: float | None = Field(default=None, allow_inf_nan=False)
    energy_import_kwh: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    energy_export_kwh: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    soc: float | None = Field(default=None, ge=0, le=1)


class RecordChargingNeeds(ChargerCommand):
    evse_id: int = Field(ge=0)
    requested_energy_transfer: str = Field(max_length=50)
    departure_at: AwareDatetime | None = None
    energy_kwh: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    id_token: str = Field(default="", max_length=255)


class RecordAllowedEnergyTransfer(ChargerCommand):
    transaction_id: str = Field(min_length=1, max_length=36)
    modes: tuple[str, ...] = Field(min_length=1)


class RecordSetpointSent(ChargerCommand):
    """The station accepted a profile asking for `power_kw` until `valid_until`."""

    evse_id: int = Field(ge=0)
    power_kw: float = Field(allow_inf_nan=False)
    valid_until: AwareDatetime
    profile_id: int


class RecordSetpointRejected(ChargerCommand):
    evse_id: int = Field(ge=0)
    power_kw: float = Field(allow_inf_nan=False)
    reason: SetpointRejectionReason
    detail: str = Field(default="", max_length=500)


class MarkOffline(ChargerCommand):
    last_seen_at: AwareDatetime


class MarkOnline(ChargerCommand):
    pass


class OcppGatewayCommand(Command):
    gateway_id: str = Field(min_length=1, max_length=100, pattern=_ID)

    @property
    def stream_id(self) -> str:
        return f"ocpp-gateway-{self.gateway_id}"


class RecordConnectionRejected(OcppGatewayCommand):
    """The gateway refused a connection at the WebSocket handshake or the TLS layer."""

    station_id: str = Field(default="", max_length=200)
    http_status: int | None = None
    reason: str = Field(min_length=1, max_length=500)
    peer: str = Field(default="", max_length=100)


class RecordMessageRejected(OcppGatewayCommand):
    """The gateway answered an OCPP message with a CallError; nothing else changed."""

    station_id: str = Field(max_length=200)
    action: str = Field(default="", max_length=100)
    unique_id: str = Field(default="", max_length=100)
    error_code: str = Field(min_length=1, max_length=50)
    reason: str = Field(min_length=1, max_length=1000)


# --- state -----------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvseState(_Frozen):
    connector_status: dict[int, str] = {}
    setpoint_kw: float | None = None
    setpoint_valid_until: datetime | None = None
    last_sampled_at: datetime | None = None
    power_kw: float | None = None
    energy_import_kwh: float | None = None
    energy_export_kwh: float | None = None
    off_setpoint_samples: int = 0
    diverging: bool = False
    needs: tuple[str, datetime | None, float | None] | None = None


class ChargerState(_Frozen):
    charger_id: str
    registered: bool = False
    site_id: str = ""
    max_charge_kw: float = 0.0
    max_discharge_kw: float = 0.0
    ocpp_version: OcppVersion = "2.0.1"
    divergence_tolerance_kw: float = 1.0
    divergence_tolerance_ratio: float = 0.10
    divergence_samples: int = 3
    online: bool = False
    booted_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    evses: dict[int, EvseState] = {}
    active_transactions: dict[str, int] = {}  # transaction id -> last seq_no


def initial_state(charger_id: str) -> ChargerState:
    return ChargerState(charger_id=charger_id)


# --- evolve ----------------------------------------------------------------------


def _tolerance_kw(state: ChargerState, setpoint_kw: float) -> float:
    return max(state.divergence_tolerance_kw, state.divergence_tolerance_ratio * abs(setpoint_kw))


def _setpoint_in_force(evse: EvseState, at: datetime) -> float | None:
    if evse.setpoint_kw is None or evse.setpoint_valid_until is None:
        return None
    return evse.setpoint_kw if at < evse.setpoint_valid_until else None


def _off_setpoint(
    state: ChargerState, evse: EvseState, power_kw: float | None, at: datetime
) -> bool:
    setpoint = _setpoint_in_force(evse, at)
    if power_kw is None or setpoint is None:
        return False
    return abs(power_kw - setpoint) > _tolerance_kw(state, setpoint)


def _with_evse(state: ChargerState, evse_id: int, **changes: object) -> ChargerState:
    evse = state.evses.get(evse_id, EvseState()).model_copy(update=changes)
    return state.model_copy(update={"evses": {**state.evses, evse_id: evse}})


def evolve(state: ChargerState, event: Event) -> ChargerState:
    match event:
        case ChargerRegistered():
            return state.model_copy(
                update={
                    "registered": True,
                    **event.model_dump(exclude={"charger_id"}),
                }
            )
        case ChargerBooted():
            return state.model_copy(update={"booted_at": event.booted_at})
        case ChargerHeartbeatReceived():
            return state.model_copy(update={"last_heartbeat_at": event.received_at})
        case ConnectorStatusChanged():
            evse = state.evses.get(event.evse_id, EvseState())
            statuses = {**evse.connector_status, event.connector_id: event.status}
            return _with_evse(state, event.evse_id, connector_status=statuses)
        case ChargingTransactionStarted():
            active = {**state.active_transactions, event.transaction_id: 0}
            return state.model_copy(update={"active_transactions": active})
        case ChargingTransactionUpdated():
            active = {**state.active_transactions, event.transaction_id: event.seq_no}
            return state.model_copy(update={"active_transactions": active})
        case ChargingTransactionEnded():
            active = dict(state.active_transactions)
            active.pop(event.transaction_id, None)
            return state.model_copy(update={"active_transactions": active})
        case ChargerMeterValuesRecorded():
            evse = state.evses.get(event.evse_id, EvseState())
            off = _off_setpoint(state, evse, event.power_kw, event.sampled_at)
            changes: dict[str, object] = {
                "last_sampled_at": event.sampled_at,
                "off_setpoint_samples": evse.off_setpoint_samples + 1 if off else 0,
            }
            for name in ("power_kw", "energy_import_kwh", "energy_export_kwh"):
                if getattr(event, name) is not None:
                    changes[name] = getattr(event, name)
            return _with_evse(state, event.evse_id, **changes)
        case ChargerPowerDivergenceDetected():
            return _with_evse(state, event.evse_id, diverging=True)
        case ChargerPowerDivergenceCleared():
            return _with_evse(state, event.evse_id, diverging=False)
        case ChargingNeedsRecorded():
            needs = (event.requested_energy_transfer, event.departure_at, event.energy_kwh)
            return _with_evse(state, event.evse_id, needs=needs)
        case ChargerSetpointSent():
            return _with_evse(
                state,
                event.evse_id,
                setpoint_kw=event.power_kw,
                setpoint_valid_until=event.valid_until,
                off_setpoint_samples=0,
            )
        case ChargerWentOffline():
            return state.model_copy(update={"online": False})
        case ChargerCameOnline():
            return state.model_copy(update={"online": True})
        case _:
            return state  # AuthorizationRecorded, SetpointRejected, ...: facts, no state


# --- decide ----------------------------------------------------------------------


def _register(command: RegisterCharger, state: ChargerState) -> list[Event]:
    if command.ocpp_version == "2.0.1" and command.max_discharge_kw > 0:
        raise CommandRejected("an OCPP 2.0.1 station cannot discharge: max_discharge_kw must be 0")
    registered = ChargerRegistered(
        **command.model_dump(include=set(ChargerRegistered.model_fields))
    )
    if state.registered:
        current = ChargerRegistered(
            charger_id=state.charger_id,
            **state.model_dump(include=set(ChargerRegistered.model_fields) - {"charger_id"}),
        )
        if current == registered:
            return []
        raise CommandRejected(f"charger {state.charger_id} is already registered differently")
    return [registered]


def _transaction(command: RecordTransactionEvent, state: ChargerState) -> list[Event]:
    active = state.active_transactions
    tx = command.transaction_id
    if command.event_type == "Started":
        if tx in active:
            return []
        return [
            ChargingTransactionStarted(
                transaction_id=tx,
                evse_id=command.evse_id,
                id_token=command.id_token,
                trigger_reason=command.trigger_reason,
                started_at=command.reported_at,
            )
        ]
    if command.event_type == "Updated":
        if tx in active and command.seq_no <= active[tx]:
            return []
        return [
            ChargingTransactionUpdated(
                transaction_id=tx,
                seq_no=command.seq_no,
                trigger_reason=command.trigger_reason,
                reported_at=command.reported_at,
            )
        ]
    if tx not in active:
        return []
    return [
        ChargingTransactionEnded(
            transaction_id=tx,
            trigger_reason=command.trigger_reason,
            stopped_reason=command.stopped_reason,
            ended_at=command.reported_at,
        )
    ]


def _meter_values(command: RecordMeterValues, state: ChargerState) -> list[Event]:
    evse = state.evses.get(command.evse_id, EvseState())
    if evse.last_sampled_at is not None and command.sampled_at <= evse.last_sampled_at:
        return []  # a sample we already hold, or one older than it
    recorded = ChargerMeterValuesRecorded(
        **command.model_dump(include=set(ChargerMeterValuesRecorded.model_fields))
    )
    events: list[Event] = [recorded]
    setpoint = _setpoint_in_force(evse, command.sampled_at)
    if command.power_kw is None or setpoint is None:
        return events
    off = _off_setpoint(state, evse, command.power_kw, command.sampled_at)
    samples = evse.off_setpoint_samples + 1 if off else 0
    if not evse.diverging and samples >= state.divergence_samples:
        events.append(
            ChargerPowerDivergenceDetected(
                evse_id=command.evse_id,
                setpoint_kw=setpoint,
                metered_kw=command.power_kw,
                tolerance_kw=_tolerance_kw(state, setpoint),
                samples=samples,
                detected_at=command.sampled_at,
            )
        )
    elif evse.diverging and not off:
        events.append(
            ChargerPowerDivergenceCleared(
                evse_id=command.evse_id,
                setpoint_kw=setpoint,
                metered_kw=command.power_kw,
                cleared_at=command.sampled_at,
            )
        )
    return events


def _setpoint_sent(command: RecordSetpointSent, state: ChargerState) -> list[Event]:
    if command.power_kw < 0 and state.ocpp_version == "2.0.1":
        raise CommandRejected("station speaks 2.0.1: no discharge")
    evse = state.evses.get(command.evse_id, EvseState())
    if (evse.setpoint_kw, evse.setpoint_valid_until) == (command.power_kw, command.valid_until):
        return []
    return [
        ChargerSetpointSent(
            evse_id=command.evse_id,
            power_kw=command.power_kw,
            valid_until=command.valid_until,
            profile_id=command.profile_id,
            accepted_at=command.issued_at,
        )
    ]


def decide(command: ChargerCommand, state: ChargerState) -> list[Event]:
    if isinstance(command, RegisterCharger):
        return _register(command, state)
    if not state.registered:
        raise UnknownEntity(f"charger {command.charger_id} is not registered")
    match command:
        case RecordBoot():
            return [
                ChargerBooted(
                    **command.model_dump(include=set(ChargerBooted.model_fields)),
                    booted_at=command.issued_at,
                )
            ]
        case RecordHeartbeat():
            last = state.last_heartbeat_at
            if last is not None and command.issued_at <= last:
                return []
            return [ChargerHeartbeatReceived(received_at=command.issued_at)]
        case RecordStatus():
            evse = state.evses.get(command.evse_id, EvseState())
            if evse.connector_status.get(command.connector_id) == command.status:
                return []
            return [
                ConnectorStatusChanged(
                    **command.model_dump(include=set(ConnectorStatusChanged.model_fields))
                )
            ]
        case RecordAuthorization():
            return [
                ChargerAuthorizationRecorded(
                    id_token=command.id_token, token_type=command.token_type, status=command.status
                )
            ]
        case RecordTransactionEvent():
            return _transaction(command, state)
        case RecordMeterValues():
            return _meter_values(command, state)
        case RecordChargingNeeds():
            evse = state.evses.get(command.evse_id, EvseState())
            needs = (command.requested_energy_transfer, command.departure_at, command.energy_kwh)
            if evse.needs == needs:
                return []
            return [
                ChargingNeedsRecorded(
                    **command.model_dump(include=set(ChargingNeedsRecorded.model_fields))
                )
            ]
        case RecordAllowedEnergyTransfer():
            return [
                AllowedEnergyTransferRecorded(
                    transaction_id=command.transaction_id, modes=command.modes
                )
            ]
        case RecordSetpointSent():
            return _setpoint_sent(command, state)
        case RecordSetpointRejected():
            return [
                ChargerSetpointRejected(
                    evse_id=command.evse_id,
                    power_kw=command.power_kw,
                    reason=command.reason,
                    detail=command.detail,
                    rejected_at=command.issued_at,
                )
            ]
        case MarkOffline():
            if not state.online:
                return []
            return [
                ChargerWentOffline(last_seen_at=command.last_seen_at, detected_at=command.issued_at)
            ]
        case MarkOnline():
            return [] if state.online else [ChargerCameOnline(at=command.issued_at)]
    raise CommandRejected(f"a charger does not handle {type(command).__name__}")


CHARGER: Decider[ChargerState] = Decider(
    kind="charger",
    command_types=(
        RegisterCharger,
        RecordBoot,
        RecordHeartbeat,
        RecordStatus,
        RecordAuthorization,
        RecordTransactionEvent,
        RecordMeterValues,
        RecordChargingNeeds,
        RecordAllowedEnergyTransfer,
        RecordSetpointSent,
        RecordSetpointRejected,
        MarkOffline,
        MarkOnline,
    ),
    state_type=ChargerState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)


# --- the gateway's rejection record ----------------------------------------------


class OcppGatewayState(_Frozen):
    gateway_id: str
    connections_rejected: int = 0
    messages_rejected: int = 0


def initial_gateway_state(gateway_id: str) -> OcppGatewayState:
    return OcppGatewayState(gateway_id=gateway_id)


def evolve_gateway(state: OcppGatewayState, event: Event) -> OcppGatewayState:
    if isinstance(event, OcppConnectionRejected):
        return state.model_copy(update={"connections_rejected": state.connections_rejected + 1})
    if isinstance(event, OcppMessageRejected):
        return state.model_copy(update={"messages_rejected": state.messages_rejected + 1})
    return state


def decide_gateway(command: OcppGatewayCommand, state: OcppGatewayState) -> list[Event]:
    if isinstance(command, RecordConnectionRejected):
        return [
            OcppConnectionRejected(
                station_id=command.station_id,
                http_status=command.http_status,
                reason=command.reason,
                peer=command.peer,
                rejected_at=command.issued_at,
            )
        ]
    if isinstance(command, RecordMessageRejected):
        return [
            OcppMessageRejected(
                station_id=command.station_id,
                action=command.action,
                unique_id=command.unique_id,
                error_code=command.error_code,
                reason=command.reason,
                rejected_at=command.issued_at,
            )
        ]
    raise CommandRejected(f"the OCPP gateway does not handle {type(command).__name__}")


OCPP_GATEWAY: Decider[OcppGatewayState] = Decider(
    kind="ocpp-gateway",
    command_types=(RecordConnectionRejected, RecordMessageRejected),
    state_type=OcppGatewayState,
    initial_state=initial_gateway_state,
    evolve=evolve_gateway,
    decide=decide_gateway,
)


__all__ = [
    "CHARGER",
    "OCPP_GATEWAY",
    "ChargerCommand",
    "ChargerState",
    "EvseState",
    "MarkOffline",
    "MarkOnline",
    "OcppGatewayCommand",
    "OcppGatewayState",
    "RecordAllowedEnergyTransfer",
    "RecordAuthorization",
    "RecordBoot",
    "RecordChargingNeeds",
    "RecordConnectionRejected",
    "RecordHeartbeat",
    "RecordMessageRejected",
    "RecordMeterValues",
    "RecordSetpointRejected",
    "RecordSetpointSent",
    "RecordStatus",
    "RecordTransactionEvent",
    "RegisterCharger",
    "decide",
    "decide_gateway",
    "evolve",
    "evolve_gateway",
    "initial_gateway_state",
    "initial_state",
]
