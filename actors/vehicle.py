"""The vehicle: a pure decider over one vehicle's stream (`vehicle-<vehicle_id>`).

The safety rules of the fleet live here, not in the schedulers: a setpoint is
clamped or refused so that the battery never plans to end below its reserve —
max(SoC floor, the energy its next trip needs) — never charges past 100 %, stays
within the vehicle's and the charger's power, is derated when hot and refused when
too hot, degraded or out of warranty throughput, and comes only from the one
controller holding a live lease.

How the SoC is planned. Telemetry reports the SoC now and then; setpoints move it
in between. The decider keeps two bounds on the battery energy: the lower one
assumes every discharge setpoint since the last reading ran at full power and no
charge happened, the upper one the reverse. Discharge is judged on the lower bound,
charge on the upper one, so a late or missing reading can only make the decider
more careful. `power_kw` is measured at the charger (grid side): charging stores
`power_kw x hours x charge_efficiency` in the battery, discharging takes
`|power_kw| x hours / discharge_efficiency` out of it.

Thermal derating (discharge only): full power up to `derate_above_c`, then linear
to zero at `refuse_discharge_above_c`, refused from there on. Charging is left to
the car's own battery management, which already limits charge current by
temperature; V2G export is the optional load we add, so that is what we derate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from operator import itemgetter
from typing import Annotated, Any, ClassVar, TypeVar, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from actors.decider import ColumnDecision, CommandRejected, Decider, UnknownEntity
from actors.presets import preset
from events.base import ENVELOPE_FIELDS, Command, Event, utc
from events.vehicle import (
    Celsius,
    Days,
    Efficiency,
    Fraction,
    KilowattHours,
    LimitReason,
    Reason,
    TelemetrySource,
    VehicleControlGranted,
    VehicleControlRefused,
    VehicleControlReleased,
    VehicleEnergyRecorded,
    VehiclePluggedIn,
    VehicleRegistered,
    VehicleSafeStateEntered,
    VehicleSetpointAccepted,
    VehicleSetpointCurtailed,
    VehicleSetpointRejected,
    VehicleTelemetryReported,
    VehicleTripCancelled,
    VehicleTripPlanned,
    VehicleUnplugged,
)

# Below this a clamped power is "nothing available": no charger acts on 1 W.
MIN_POWER_KW = 0.001
# A clamped discharge is shaved by this fraction so float rounding can never put
# the planned SoC a hair below the reserve.
_SAFETY_MARGIN = 1e-9
# Two setpoint powers closer than this are the same setpoint (recomputing a clamp
# later gives the same power up to float rounding).
_SAME_POWER_KW = 1e-6

VehicleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")]
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")]
PowerLimit = Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)]
Power = Annotated[float, Field(ge=-1000, le=1000, allow_inf_nan=False)]


# ---------------------------------------------------------------------------
# Commands


class _VehicleCommand(Command):
    vehicle_id: VehicleId

    @property
    def stream_id(self) -> str:
        return f"vehicle-{self.vehicle_id}"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Commands cross Ray a thousand at a time. Pydantic's default pickling (a
        # state dict, each datetime an object of its own that Ray's pickler sends
        # through Python hooks) cost ~6 µs a command to send and ~3 µs to receive.
        # Sent as a tuple of plain values, UTC times as integer microseconds, it
        # stays in pickle's C code; nothing is validated again on arrival, exactly
        # as with pydantic's own unpickling.
        cls = type(self)
        values = list(itemgetter(*_field_names(cls))(self.__dict__))
        utc_mask = 0
        for i, value in enumerate(values):
            if type(value) is datetime and value.tzinfo is UTC and not value.fold:
                values[i] = (value - _EPOCH) // _ONE_US
                utc_mask |= 1 << i
        fields_set = tuple(self.__pydantic_fields_set__)
        return (_unpickle_command, (cls, tuple(values), utc_mask, fields_set))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


@cache
def _field_names(cls: type[_VehicleCommand]) -> tuple[str, ...]:
    return tuple(cls.model_fields)


@cache
def _utc_fields(cls: type[_VehicleCommand], utc_mask: int) -> tuple[tuple[int, str], ...]:
    return tuple((i, n) for i, n in enumerate(_field_names(cls)) if utc_mask >> i & 1)


_set = object.__setattr__
_M = TypeVar("_M", bound=BaseModel)


def _assembled(cls: type[_M], values: dict[str, Any], fields_set: set[str]) -> _M:
    """A `cls` holding `values` as they are, without validation (see `_trusted`): for
    values that were validated already, e.g. a command's own, sent across Ray."""
    model = cls.__new__(cls)
    _set(model, "__dict__", values)
    _set(model, "__pydantic_fields_set__", fields_set)
    _set(model, "__pydantic_extra__", None)
    _set(model, "__pydantic_private__", None)
    return model


def _unpickle_command(
    cls: type[_VehicleCommand],
    values: tuple[Any, ...],
    utc_mask: int,
    fields_set: tuple[str, ...],
) -> _VehicleCommand:
    fields = dict(zip(_field_names(cls), values, strict=True))
    for i, name in _utc_fields(cls, utc_mask):
        fields[name] = _EPOCH + _ONE_US * values[i]
    return _assembled(cls, fields, set(fields_set))


class RegisterVehicle(_VehicleCommand):
    """Add a vehicle to the fleet.

    `model` names a preset (e.g. "Tesla Model 3", see `actors.presets`) that fills
    battery_capacity_kwh, max_charge_kw, max_discharge_kw and the efficiencies;
    fields given explicitly override it. Registering again with the same data
    changes nothing; with different data it is rejected (settings are not edited
    by re-registering; a reconfiguration would be its own command and event).

    `battery_age_days` and `battery_throughput_kwh` are the pack's history when it
    joins the fleet (days since it was new; battery-side kWh charged plus discharged
    since new); the default, 0 and 0, is a new battery. The ageing model prices wear
    in the fleet from there, so a used pack is not charged the steep first weeks.
    """

    model: str | None = None
    site_id: Identifier
    battery_capacity_kwh: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]
    max_charge_kw: PowerLimit
    max_discharge_kw: PowerLimit
    soc_floor: Fraction = 0.20
    derate_above_c: Celsius = 45.0
    refuse_discharge_above_c: Celsius = 65.0
    min_soh_for_discharge: Fraction = 0.70
    discharge_throughput_budget_kwh: KilowattHours | None = None
    charge_efficiency: Efficiency = 0.90
    discharge_efficiency: Efficiency = 0.90
    battery_age_days: Days = 0.0
    battery_throughput_kwh: KilowattHours = 0.0

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("model") is None:
            return data
        car = preset(data["model"])  # UnknownPreset is a ValueError: a validation error
        from_preset = {
            "battery_capacity_kwh": car.battery_capacity_kwh,
            "max_charge_kw": car.ac_max_charge_kw,
            "max_discharge_kw": car.ac_max_discharge_kw,
            "charge_efficiency": car.charge_efficiency,
            "discharge_efficiency": car.charge_efficiency,
        }
        return {**from_preset, **data}


class PlugIn(_VehicleCommand):
    charger_id: Identifier
    charger_max_charge_kw: PowerLimit
    charger_max_discharge_kw: PowerLimit  # 0 for a charge-only charger


class Unplug(_VehicleCommand):
    pass


class ReportTelemetry(_VehicleCommand):
    measured_at: AwareDatetime
    soc: Fraction
    battery_temp_c: Celsius
    soh: Fraction
    source: TelemetrySource = "operator"  # gateways say "mqtt" / "ocpp"

    @classmethod
    def pack_batch(cls, commands: Sequence[Command]) -> ReportTelemetryBatch | None:
        """A host shard's readings as one columnar batch (see `ReportTelemetryBatch`)."""
        return ReportTelemetryBatch.of(commands)


class PlanTrip(_VehicleCommand):
    departure_at: AwareDatetime
    energy_needed_kwh: KilowattHours


class CancelTrip(_VehicleCommand):
    pass


class GrantControl(_VehicleCommand):
    controller_id: Identifier
    lease_until: AwareDatetime


class ReleaseControl(_VehicleCommand):
    controller_id: Identifier


class RecordEnergy(_VehicleCommand):
    """Energy metered at the charger over [interval_start, interval_end), grid side."""

    interval_start: AwareDatetime
    interval_end: AwareDatetime
    charged_kwh: KilowattHours
    discharged_kwh: KilowattHours


class RequestSetpoint(_VehicleCommand):
    """Ask for `power_kw` (> 0 charge, < 0 discharge) from issued_at until valid_until."""

    controller_id: Identifier
    power_kw: Power
    valid_until: AwareDatetime

    @classmethod
    def pack_batch(cls, commands: Sequence[Command]) -> RequestSetpoints | None:
        """A host shard's setpoints as one columnar batch (see `RequestSetpoints`)."""
        return RequestSetpoints.of(commands)


_NO_CONTROL = r"^[^\x00-\x1f]+$"
_SETPOINT_REQUIRED = frozenset(
    {"command_id", "issued_at", "vehicle_id", "controller_id", "power_kw", "valid_until"}
)


class RequestSetpoints(BaseModel):
    """One controller's `RequestSetpoint`s for many vehicles at one instant, as columns.

    A frequency event moves every vehicle of a site at once: sent as one command
    object per vehicle, building, pickling and unpickling 500 of them for a host
    shard cost more wall time than the host's deciding. This carries the shared
    fields once; the host expands it (`commands`) into the same `RequestSetpoint`s,
    each with its own `command_id` (`command_id_prefix` + vehicle id), which the
    decider judges and the log deduplicates one by one. Validated once for all.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id_prefix: Annotated[str, Field(min_length=1, max_length=100, pattern=_NO_CONTROL)]
    issued_at: AwareDatetime
    correlation_id: Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f]*$")] = ""
    traceparent: Annotated[str, Field(max_length=55, pattern=r"^([0-9a-f-]{55})?$")] = ""
    controller_id: Identifier
    valid_until: AwareDatetime
    vehicle_ids: tuple[VehicleId, ...]
    power_kw: tuple[Power, ...]

    @model_validator(mode="after")
    def _one_power_per_vehicle(self) -> RequestSetpoints:
        if len(self.vehicle_ids) != len(self.power_kw):
            raise ValueError(
                f"{len(self.vehicle_ids)} vehicle_ids but {len(self.power_kw)} power_kw values"
            )
        return self

    command_type: ClassVar[type[Command]] = RequestSetpoint

    def __len__(self) -> int:
        return len(self.vehicle_ids)

    def stream_ids(self) -> list[str]:
        """The stream of each command, in order (for routing to shards without expanding)."""
        return [f"vehicle-{vehicle_id}" for vehicle_id in self.vehicle_ids]

    def take(self, indices: Sequence[int]) -> RequestSetpoints:
        """The batch of the commands at `indices`, in that order (a shard's share)."""
        vehicle_ids, power_kw = self.vehicle_ids, self.power_kw
        return self.model_copy(
            update={
                "vehicle_ids": tuple(vehicle_ids[i] for i in indices),
                "power_kw": tuple(power_kw[i] for i in indices),
            }
        )

    def commands(self) -> list[RequestSetpoint]:
        """The vehicles' commands, in order; equal to validating each one on its own."""
        shared = dict.fromkeys(_field_names(RequestSetpoint))
        shared |= {
            "issued_at": self.issued_at,
            "correlation_id": self.correlation_id,
            "traceparent": self.traceparent,
            "controller_id": self.controller_id,
            "valid_until": self.valid_until,
        }
        given = frozenset(_SETPOINT_REQUIRED | {"correlation_id", "traceparent"})
        if not self.correlation_id:
            given -= {"correlation_id"}
        if not self.traceparent:
            given -= {"traceparent"}
        prefix = self.command_id_prefix
        commands = []
        for vehicle_id, power_kw in zip(self.vehicle_ids, self.power_kw, strict=True):
            fields = shared.copy()
            fields["command_id"] = prefix + vehicle_id
            fields["vehicle_id"] = vehicle_id
            fields["power_kw"] = power_kw
            commands.append(_assembled(RequestSetpoint, fields, set(given)))
        return commands

    @classmethod
    def of(cls, commands: Sequence[Command]) -> RequestSetpoints | None:
        """These commands as one batch, or None when they do not share what a batch shares.

        Not validated again: the commands are (pydantic does not validate what it
        unpickles either, which is how they would otherwise reach the host).
        """
        if not commands or not all(type(c) is RequestSetpoint for c in commands):
            return None
        first = commands[0]
        assert isinstance(first, RequestSetpoint)
        prefix = first.command_id[: len(first.command_id) - len(first.vehicle_id)]
        shared = (
            first.issued_at,
            first.correlation_id,
            first.traceparent,
            first.controller_id,
            first.valid_until,
        )
        vehicle_ids, power_kw = [], []
        for c in commands:
            assert isinstance(c, RequestSetpoint)
            vid = c.vehicle_id
            if (
                c.command_id != prefix + vid
                or (c.issued_at, c.correlation_id, c.traceparent, c.controller_id, c.valid_until)
                != shared
            ):
                return None
            vehicle_ids.append(vid)
            power_kw.append(c.power_kw)
        if not prefix:
            return None
        return cls.model_construct(
            command_id_prefix=prefix,
            issued_at=first.issued_at,
            correlation_id=first.correlation_id,
            traceparent=first.traceparent,
            controller_id=first.controller_id,
            valid_until=first.valid_until,
            vehicle_ids=tuple(vehicle_ids),
            power_kw=tuple(power_kw),
        )


_TELEMETRY_REQUIRED = frozenset(
    {"command_id", "issued_at", "vehicle_id", "measured_at", "soc", "battery_temp_c", "soh"}
)


_CommandId = Annotated[str, Field(min_length=1, max_length=200, pattern=_NO_CONTROL)]


class ReportTelemetryBatch(BaseModel):
    """Many `ReportTelemetry` as columns, one row per reading: a gateway's batch.

    Telemetry is most of what a fleet sends. As command objects, each reading cost
    more to pickle, unpickle and route than the vehicle's deciding; as columns it
    crosses Ray in a few arrays, and the host judges the common case (a registered
    vehicle, a newer reading, no discharge to curtail) in the decider's columnar twin
    (`VEHICLE.columnar`). Each row keeps its own `command_id`, which the log
    deduplicates one by one. Source and correlation id are shared. Validated once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_ids: tuple[_CommandId, ...]
    issued_at: tuple[AwareDatetime, ...]
    vehicle_ids: tuple[VehicleId, ...]
    measured_at: tuple[AwareDatetime, ...]
    soc: tuple[Fraction, ...]
    battery_temp_c: tuple[Celsius, ...]
    soh: tuple[Fraction, ...]
    source: TelemetrySource = "operator"
    correlation_id: Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f]*$")] = ""

    @model_validator(mode="after")
    def _one_value_per_row(self) -> ReportTelemetryBatch:
        n = len(self.command_ids)
        for name in ("issued_at", "vehicle_ids", "measured_at", "soc", "battery_temp_c", "soh"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{n} command_ids but {len(getattr(self, name))} {name}")
        return self

    command_type: ClassVar[type[Command]] = ReportTelemetry

    def __len__(self) -> int:
        return len(self.command_ids)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Crosses Ray as plain columns, UTC times as integer microseconds (a datetime
        # object is pickled through Python hooks, one at a time); not validated again
        # on arrival, like the commands themselves.
        times = (self.issued_at, self.measured_at)
        if not all(t.tzinfo is UTC and not t.fold for column in times for t in column):
            default = super().__reduce__()
            assert isinstance(default, tuple)
            return default
        return (
            _telemetry_batch,
            (
                self.command_ids,
                [(t - _EPOCH) // _ONE_US for t in self.issued_at],
                self.vehicle_ids,
                [(t - _EPOCH) // _ONE_US for t in self.measured_at],
                self.soc,
                self.battery_temp_c,
                self.soh,
                self.source,
                self.correlation_id,
            ),
        )

    def stream_ids(self) -> list[str]:
        """The stream of each row, in order (for routing to shards without expanding)."""
        return [f"vehicle-{vehicle_id}" for vehicle_id in self.vehicle_ids]

    def take(self, indices: Sequence[int]) -> ReportTelemetryBatch:
        """The batch of the rows at `indices`, in that order (a shard's share)."""
        return self.model_copy(
            update={
                name: tuple(getattr(self, name)[i] for i in indices) for name in _COMMAND_TO_BATCH
            }
        )

    def commands(self) -> list[ReportTelemetry]:
        """The rows as commands, in order; equal to validating each one on its own."""
        given = set(_TELEMETRY_REQUIRED)
        if self.source != "operator":
            given.add("source")
        if self.correlation_id:
            given.add("correlation_id")
        commands = []
        for row in zip(
            self.command_ids,
            self.issued_at,
            self.vehicle_ids,
            self.measured_at,
            self.soc,
            self.battery_temp_c,
            self.soh,
            strict=True,
        ):
            fields = dict.fromkeys(_field_names(ReportTelemetry))
            fields.update(zip(_BATCH_TO_COMMAND, row, strict=True))
            fields.update(source=self.source, correlation_id=self.correlation_id, traceparent="")
            commands.append(_assembled(ReportTelemetry, fields, set(given)))
        return commands

    @classmethod
    def of(cls, commands: Sequence[Command]) -> ReportTelemetryBatch | None:
        """These readings as one batch, or None when they do not share what a batch shares
        (source and correlation id) or one is traced (it keeps its own span).

        Not validated again: the commands are.
        """
        if not commands or not all(type(c) is ReportTelemetry for c in commands):
            return None
        first = commands[0]
        assert isinstance(first, ReportTelemetry)
        shared = (first.source, first.correlation_id)
        columns: list[list[Any]] = [[] for _ in _BATCH_TO_COMMAND]
        for c in commands:
            assert isinstance(c, ReportTelemetry)
            if (c.source, c.correlation_id) != shared or c.traceparent:
                return None
            for column, name in zip(columns, _BATCH_TO_COMMAND, strict=True):
                column.append(getattr(c, name))
        values: dict[str, Any] = {
            field: tuple(column) for field, column in zip(_COMMAND_TO_BATCH, columns, strict=True)
        }
        return cls.model_construct(
            None, source=first.source, correlation_id=first.correlation_id, **values
        )


# A row's values in batch column order, named as the command's fields.
_BATCH_TO_COMMAND = (
    "command_id",
    "issued_at",
    "vehicle_id",
    "measured_at",
    "soc",
    "battery_temp_c",
    "soh",
)
_COMMAND_TO_BATCH = (
    "command_ids",
    "issued_at",
    "vehicle_ids",
    "measured_at",
    "soc",
    "battery_temp_c",
    "soh",
)


def _telemetry_batch(
    command_ids: tuple[str, ...],
    issued_at_us: list[int],
    vehicle_ids: tuple[str, ...],
    measured_at_us: list[int],
    soc: tuple[float, ...],
    battery_temp_c: tuple[float, ...],
    soh: tuple[float, ...],
    source: TelemetrySource,
    correlation_id: str,
) -> ReportTelemetryBatch:
    return ReportTelemetryBatch.model_construct(
        command_ids=command_ids,
        issued_at=tuple(_EPOCH + _ONE_US * t for t in issued_at_us),
        vehicle_ids=vehicle_ids,
        measured_at=tuple(_EPOCH + _ONE_US * t for t in measured_at_us),
        soc=soc,
        battery_temp_c=battery_temp_c,
        soh=soh,
        source=source,
        correlation_id=correlation_id,
    )


class EnforceSafeState(_VehicleCommand):
    """Power 0 and no controller, from anyone (watchdog, e-stop, anti-islanding)."""

    reason: Reason


VehicleCommand = (
    RegisterVehicle
    | PlugIn
    | Unplug
    | ReportTelemetry
    | PlanTrip
    | CancelTrip
    | GrantControl
    | ReleaseControl
    | RecordEnergy
    | RequestSetpoint
    | EnforceSafeState
)


# ---------------------------------------------------------------------------
# State


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _trusted(cls: type[_M], values: dict[str, Any]) -> _M:
    """A `cls` from values that have passed the same validation already: a validated
    command's or event's fields, or a state's own.

    What `model_construct` does, without its per-field Python loop (which costs more
    than validating). `evolve` and `decide` run once per event on every command and
    every replay, so this is the hot path. Every field must be given, in the order
    the class declares them (an event's JSON follows it); the tests compare what
    this builds with what validation builds.
    """
    return _assembled(cls, values, set(values))


def _replaced(model: _M, changes: dict[str, Any]) -> _M:
    """`model.model_copy(update=changes)` at a fraction of the cost; `changes` are trusted."""
    return _assembled(
        model.__class__,
        {**model.__dict__, **changes},
        model.__pydantic_fields_set__ | changes.keys(),
    )


class VehicleSpec(_Frozen):
    model: str | None
    site_id: str
    battery_capacity_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    soc_floor: float
    derate_above_c: float
    refuse_discharge_above_c: float
    min_soh_for_discharge: float
    discharge_throughput_budget_kwh: float | None
    charge_efficiency: float
    discharge_efficiency: float
    # Defaults: a snapshot written before registrations carried the battery's history.
    battery_age_days: float = 0.0
    battery_throughput_kwh: float = 0.0


class Connection(_Frozen):
    charger_id: str
    max_charge_kw: float
    max_discharge_kw: float
    since: datetime


class Reading(_Frozen):
    measured_at: datetime
    soc: float
    battery_temp_c: float
    soh: float


class Trip(_Frozen):
    departure_at: datetime
    energy_needed_kwh: float


class Lease(_Frozen):
    controller_id: str
    lease_until: datetime

    def live(self, at: datetime) -> bool:
        # Half-open: a lease is live while at < lease_until; at lease_until it is expired.
        return at < self.lease_until


class Setpoint(_Frozen):
    controller_id: str
    requested_power_kw: float
    power_kw: float
    since: datetime
    valid_until: datetime
    limited_by: tuple[LimitReason, ...] = ()


class VehicleState(_Frozen):
    vehicle_id: str
    spec: VehicleSpec | None = None
    connection: Connection | None = None
    reading: Reading | None = None
    trip: Trip | None = None
    lease: Lease | None = None
    setpoint: Setpoint | None = None
    safe_state_reason: str | None = None
    # Metered at the charger (grid side); the warranty budget counts discharged_kwh.
    charged_kwh_total: float = 0.0
    discharged_kwh_total: float = 0.0
    metered_until: datetime | None = None
    # Battery-side energy that ended setpoints may have moved since `reading`,
    # assuming full power; reset by a reading newer than everything booked.
    charged_since_reading_kwh: float = 0.0
    discharged_since_reading_kwh: float = 0.0
    booked_until: datetime | None = None
    # The last refusal event, as a key: repeating the same refused request with
    # nothing changed in between adds nothing. Any other event clears it.
    last_refusal: str | None = None

    @property
    def registered(self) -> bool:
        return self.spec is not None


# Queries a dispatcher may reuse: what the state implies, at a given time.


def _setpoint_energy_kwh(state: VehicleState, setpoint: Setpoint, until: datetime) -> float:
    """Battery-side energy (signed) the setpoint moves after the last reading, up to `until`."""
    assert state.spec is not None
    start = setpoint.since
    if state.reading is not None and state.reading.measured_at > start:
        start = state.reading.measured_at
    end = min(until, setpoint.valid_until)
    hours = (end - start).total_seconds() / 3600.0
    if hours <= 0 or setpoint.power_kw == 0:
        return 0.0
    if setpoint.power_kw > 0:
        return setpoint.power_kw * hours * state.spec.charge_efficiency
    return setpoint.power_kw * hours / state.spec.discharge_efficiency


def energy_bounds_kwh(state: VehicleState, at: datetime) -> tuple[float, float]:
    """(lower, upper) bound on the battery energy at `at`, from the last reading.

    Raises:
        ValueError: no telemetry has been reported yet.
    """
    if state.spec is None or state.reading is None:
        raise ValueError(f"vehicle {state.vehicle_id!r}: soc unknown, no telemetry reported")
    energy_kwh = state.reading.soc * state.spec.battery_capacity_kwh
    low = energy_kwh - state.discharged_since_reading_kwh
    high = energy_kwh + state.charged_since_reading_kwh
    if state.setpoint is not None:
        moved = _setpoint_energy_kwh(state, state.setpoint, at)
        if moved < 0:
            low += moved
        else:
            high += moved
    return low, high


def soc_bounds(state: VehicleState, at: datetime) -> tuple[float, float]:
    """(lower, upper) bound on the SoC (0..1, unclamped) at `at`."""
    assert state.spec is not None
    low, high = energy_bounds_kwh(state, at)
    return low / state.spec.battery_capacity_kwh, high / state.spec.battery_capacity_kwh


def reserve_kwh(state: VehicleState) -> float:
    """Battery energy no discharge may touch: max(SoC floor, the next trip's energy)."""
    assert state.spec is not None
    floor_kwh = state.spec.soc_floor * state.spec.battery_capacity_kwh
    if state.trip is None:
        return floor_kwh
    return max(floor_kwh, state.trip.energy_needed_kwh)


def reserve_soc(state: VehicleState) -> float:
    assert state.spec is not None
    return reserve_kwh(state) / state.spec.battery_capacity_kwh


def available_discharge_kwh(state: VehicleState, at: datetime) -> float:
    """Battery-side energy above the reserve at `at` (0 without telemetry).

    Grid-side exportable energy is this times `discharge_efficiency`.
    """
    if state.reading is None:
        return 0.0
    low, _ = energy_bounds_kwh(state, at)
    return max(0.0, low - reserve_kwh(state))


def available_charge_kwh(state: VehicleState, at: datetime) -> float:
    """Battery-side room below 100 % at `at` (0 without telemetry)."""
    if state.spec is None or state.reading is None:
        return 0.0
    _, high = energy_bounds_kwh(state, at)
    return max(0.0, state.spec.battery_capacity_kwh - high)


def thermal_derating(state: VehicleState) -> float:
    """Factor 0..1 on the vehicle's discharge power for the last battery temperature."""
    assert state.spec is not None
    if state.reading is None:
        return 1.0
    spec, temp_c = state.spec, state.reading.battery_temp_c
    if temp_c <= spec.derate_above_c:
        return 1.0
    if temp_c >= spec.refuse_discharge_above_c:
        return 0.0
    span_c = spec.refuse_discharge_above_c - spec.derate_above_c
    return (spec.refuse_discharge_above_c - temp_c) / span_c


def discharge_refusal(state: VehicleState) -> str | None:
    """Why this vehicle may not discharge at all right now, or None.

    Energy (the reserve) and the lease are judged per setpoint, not here.
    """
    spec = state.spec
    if spec is None:
        return f"vehicle {state.vehicle_id!r} is not registered"
    if state.connection is None:
        return "not plugged in: a nonzero power_kw needs a charger"
    if state.reading is None:
        return "soc unknown: no telemetry reported yet"
    if state.reading.soh < spec.min_soh_for_discharge:
        return (
            f"soh {state.reading.soh:.3f} is below min_soh_for_discharge "
            f"{spec.min_soh_for_discharge:.3f}: the battery is excluded from discharge"
        )
    if state.reading.battery_temp_c >= spec.refuse_discharge_above_c:
        return (
            f"battery_temp_c {state.reading.battery_temp_c:.1f} is at or above "
            f"refuse_discharge_above_c {spec.refuse_discharge_above_c:.1f}"
        )
    budget = spec.discharge_throughput_budget_kwh
    if budget is not None and state.discharged_kwh_total >= budget:
        return (
            f"battery throughput exceeded: discharged_kwh {state.discharged_kwh_total:.1f} "
            f"of the {budget:.1f} kWh warranty budget"
        )
    if spec.max_discharge_kw == 0:
        return "vehicle cannot discharge: max_discharge_kw is 0"
    if state.connection.max_discharge_kw == 0:
        return (
            f"charger {state.connection.charger_id!r} cannot discharge: "
            "charger_max_discharge_kw is 0"
        )
    return None


def _discharge_limits_kw(
    state: VehicleState, at: datetime, hours: float
) -> str | list[tuple[LimitReason, float]]:
    refusal = discharge_refusal(state)
    if refusal is not None:
        return refusal
    spec, connection = state.spec, state.connection
    assert spec is not None and connection is not None
    limits: list[tuple[LimitReason, float]] = [
        ("vehicle_power", spec.max_discharge_kw),
        ("charger_power", connection.max_discharge_kw),
    ]
    derating = thermal_derating(state)
    if derating < 1.0:
        limits.append(("thermal_derating", spec.max_discharge_kw * derating))
    available = available_discharge_kwh(state, at)
    reserve_limit_kw = available * spec.discharge_efficiency / hours * (1.0 - _SAFETY_MARGIN)
    if reserve_limit_kw < MIN_POWER_KW:
        return _reserve_reason(state, at)
    limits.append(("soc_reserve", reserve_limit_kw))
    budget = spec.discharge_throughput_budget_kwh
    if budget is not None:
        budget_limit_kw = (budget - state.discharged_kwh_total) / hours
        if budget_limit_kw < MIN_POWER_KW:
            return (
                f"battery throughput exceeded: {budget - state.discharged_kwh_total:.4f} kWh "
                f"left of the {budget:.1f} kWh warranty budget"
            )
        limits.append(("throughput_budget", budget_limit_kw))
    return limits


def _reserve_reason(state: VehicleState, at: datetime) -> str:
    assert state.spec is not None
    low, _ = soc_bounds(state, at)
    floor_kwh = state.spec.soc_floor * state.spec.battery_capacity_kwh
    if state.trip is not None and state.trip.energy_needed_kwh > floor_kwh:
        held_for = (
            f"the trip at {state.trip.departure_at.isoformat()} needs "
            f"{state.trip.energy_needed_kwh:.1f} kWh"
        )
    else:
        held_for = f"soc_floor {state.spec.soc_floor:.3f}"
    return (
        f"soc reserve: soc (lower bound {low:.3f}) leaves nothing above the reserve "
        f"{reserve_soc(state):.3f} ({held_for})"
    )


def _charge_limits_kw(
    state: VehicleState, at: datetime, hours: float
) -> str | list[tuple[LimitReason, float]]:
    spec, connection = state.spec, state.connection
    assert spec is not None
    if connection is None:
        return "not plugged in: a nonzero power_kw needs a charger"
    if state.reading is None:
        return "soc unknown: no telemetry reported yet"
    if spec.max_charge_kw == 0:
        return "vehicle cannot charge: max_charge_kw is 0"
    if connection.max_charge_kw == 0:
        return f"charger {connection.charger_id!r} cannot charge: charger_max_charge_kw is 0"
    room_limit_kw = available_charge_kwh(state, at) / spec.charge_efficiency / hours
    if room_limit_kw < MIN_POWER_KW:
        _, high = soc_bounds(state, at)
        return f"battery full: soc (upper bound {high:.3f}) leaves no room to charge"
    return [
        ("vehicle_power", spec.max_charge_kw),
        ("charger_power", connection.max_charge_kw),
        ("soc_full", room_limit_kw),
    ]


def _lease_refusal(state: VehicleState, controller_id: str, at: datetime) -> str | None:
    lease = state.lease
    if lease is not None and lease.controller_id == controller_id and lease.live(at):
        return None
    prefix = f"controller {controller_id!r} does not hold the control lease"
    if lease is None:
        return f"{prefix}: no controller holds it"
    if not lease.live(at):
        return (
            f"{prefix}: the lease of {lease.controller_id!r} expired at "
            f"{lease.lease_until.isoformat()}"
        )
    return f"{prefix}: {lease.controller_id!r} holds it until {lease.lease_until.isoformat()}"


def _rejected_setpoint(
    state: VehicleState,
    controller_id: str,
    power_kw: float,
    valid_until: datetime,
    at: datetime,
    reason: str,
) -> VehicleSetpointRejected:
    return VehicleSetpointRejected(
        vehicle_id=state.vehicle_id,
        at=at,
        controller_id=controller_id,
        requested_power_kw=power_kw,
        valid_until=valid_until,
        reason=reason,
    )


def _accepted_setpoint(
    state: VehicleState,
    controller_id: str,
    power_kw: float,
    valid_until: datetime,
    at: datetime,
    granted_kw: float,
    limited_by: tuple[LimitReason, ...],
) -> VehicleSetpointAccepted:
    # Not validated again (a third of a setpoint's decision; a frequency event
    # decides 500 a shard): ids and times come from the validated command, times
    # go to UTC as the event's type does, and the granted power is the minimum of
    # the request and finite limits. Finiteness is checked all the same, because
    # a dispatcher may build its commands without validation.
    if not (math.isfinite(power_kw) and math.isfinite(granted_kw)):
        raise CommandRejected(f"power_kw: {power_kw!r} is not a finite number")
    return _trusted(
        VehicleSetpointAccepted,
        {
            "vehicle_id": state.vehicle_id,
            "at": _in_utc(at),
            "controller_id": controller_id,
            "requested_power_kw": float(power_kw),
            "power_kw": float(granted_kw),
            "valid_until": _in_utc(valid_until),
            "limited_by": limited_by,
        },
    )


def _in_utc(dt: datetime) -> datetime:
    # `utc` converts (a new object) even what is in UTC already, as commands' times are
    return dt if dt.tzinfo is UTC else utc(dt)


def _judge_setpoint(
    state: VehicleState, controller_id: str, power_kw: float, valid_until: datetime, at: datetime
) -> VehicleSetpointAccepted | VehicleSetpointRejected:
    lease_refusal = _lease_refusal(state, controller_id, at)
    if lease_refusal is not None:
        return _rejected_setpoint(state, controller_id, power_kw, valid_until, at, lease_refusal)
    if power_kw == 0:
        return _accepted_setpoint(state, controller_id, power_kw, valid_until, at, 0.0, ())
    assert state.lease is not None
    if valid_until > state.lease.lease_until:
        return _rejected_setpoint(
            state,
            controller_id,
            power_kw,
            valid_until,
            at,
            f"valid_until {valid_until.isoformat()} is after the control lease ends at "
            f"{state.lease.lease_until.isoformat()}: renew the lease first",
        )
    hours = (valid_until - at).total_seconds() / 3600.0
    if power_kw < 0:
        limits = _discharge_limits_kw(state, at, hours)
    else:
        limits = _charge_limits_kw(state, at, hours)
    if isinstance(limits, str):
        return _rejected_setpoint(state, controller_id, power_kw, valid_until, at, limits)
    requested_kw = abs(power_kw)
    granted_kw = requested_kw
    for _, limit_kw in limits:
        if limit_kw < granted_kw:
            granted_kw = limit_kw
    # Name the limits that set the power (each of them on a tie), not every limit
    # that happened to be below the request.
    limited_by: tuple[LimitReason, ...] = ()
    if granted_kw < requested_kw:
        tie_kw = granted_kw + _SAME_POWER_KW
        limited_by = tuple(reason for reason, limit_kw in limits if limit_kw <= tie_kw)
    return _accepted_setpoint(
        state,
        controller_id,
        power_kw,
        valid_until,
        at,
        math.copysign(granted_kw, power_kw),
        limited_by,
    )


def _refusal_key(event: VehicleSetpointRejected | VehicleControlRefused) -> str:
    if isinstance(event, VehicleSetpointRejected):
        return (
            f"setpoint|{event.controller_id}|{event.requested_power_kw!r}|"
            f"{event.valid_until.isoformat()}|{event.reason}"
        )
    return f"control|{event.controller_id}|{event.reason}"


# ---------------------------------------------------------------------------
# initial_state and evolve


def initial_state(vehicle_id: str) -> VehicleState:
    return VehicleState(vehicle_id=vehicle_id)


def _ending_setpoint(state: VehicleState, at: datetime) -> dict[str, Any]:
    """The state changes that end the active setpoint at `at`, booking what it moved."""
    setpoint = state.setpoint
    if setpoint is None:
        return {"setpoint": None}
    moved_kwh = _setpoint_energy_kwh(state, setpoint, at)
    ended_at = min(at, setpoint.valid_until)
    booked_until = state.booked_until
    changes: dict[str, Any] = {
        "setpoint": None,
        "booked_until": ended_at if booked_until is None else max(booked_until, ended_at),
    }
    if moved_kwh < 0:
        changes["discharged_since_reading_kwh"] = state.discharged_since_reading_kwh - moved_kwh
    elif moved_kwh > 0:
        changes["charged_since_reading_kwh"] = state.charged_since_reading_kwh + moved_kwh
    return changes


def _changed(state: VehicleState, **changes: Any) -> VehicleState:
    return _replaced(state, {"last_refusal": None, **changes})


def _with_reading(
    state: VehicleState, measured_at: datetime, soc: float, battery_temp_c: float, soh: float
) -> VehicleState:
    """The state after a `VehicleTelemetryReported` (`evolve`, and the columnar twin)."""
    reading = _trusted(
        Reading,
        {"measured_at": measured_at, "soc": soc, "battery_temp_c": battery_temp_c, "soh": soh},
    )
    # A reading newer than every booked setpoint already includes what they moved.
    # An older one does not, so the bookings stay (counted twice at worst, which only
    # makes the bounds wider).
    if state.booked_until is None or measured_at >= state.booked_until:
        return _replaced(
            state,
            {
                "reading": reading,
                "charged_since_reading_kwh": 0.0,
                "discharged_since_reading_kwh": 0.0,
                "booked_until": None,
                "last_refusal": None,
            },
        )
    return _replaced(state, {"reading": reading, "last_refusal": None})


def evolve(state: VehicleState, event: Event) -> VehicleState:
    # States are built with `_trusted` and `_replaced`: their values come from an
    # event that pydantic has already validated, and evolve runs once per event on
    # every command and every replay.
    match event:
        case VehicleTelemetryReported():
            return _with_reading(
                state, event.measured_at, event.soc, event.battery_temp_c, event.soh
            )
        case VehicleSetpointAccepted():
            setpoint = _trusted(
                Setpoint,
                {
                    "controller_id": event.controller_id,
                    "requested_power_kw": event.requested_power_kw,
                    "power_kw": event.power_kw,
                    "since": event.at,
                    "valid_until": event.valid_until,
                    "limited_by": event.limited_by,
                },
            )
            ending = _ending_setpoint(state, event.at)
            ending["setpoint"] = setpoint
            ending["last_refusal"] = None
            return _replaced(state, ending)
        case VehicleSetpointRejected():
            changes: dict[str, Any] = {"last_refusal": _refusal_key(event)}
            if state.setpoint is not None and state.setpoint.controller_id == event.controller_id:
                changes |= _ending_setpoint(state, event.at)
            return _replaced(state, changes)
        case VehicleSetpointCurtailed():
            assert state.setpoint is not None
            curtailed = _replaced(state.setpoint, {"power_kw": event.power_kw, "since": event.at})
            return _changed(state, **{**_ending_setpoint(state, event.at), "setpoint": curtailed})
        case VehicleEnergyRecorded():
            return _changed(
                state,
                charged_kwh_total=state.charged_kwh_total + event.charged_kwh,
                discharged_kwh_total=state.discharged_kwh_total + event.discharged_kwh,
                metered_until=event.interval_end,
            )
        case VehicleControlGranted():
            changes = {
                "lease": _trusted(
                    Lease, {"controller_id": event.controller_id, "lease_until": event.lease_until}
                ),
                "safe_state_reason": None,
            }
            if state.setpoint is not None and state.setpoint.controller_id != event.controller_id:
                changes |= _ending_setpoint(state, event.at)
            return _changed(state, **changes)
        case VehicleControlRefused():
            return _replaced(state, {"last_refusal": _refusal_key(event)})
        case VehicleControlReleased():
            return _changed(state, lease=None, **_ending_setpoint(state, event.at))
        case VehicleSafeStateEntered():
            return _changed(
                state,
                lease=None,
                safe_state_reason=event.reason,
                **_ending_setpoint(state, event.at),
            )
        case VehiclePluggedIn():
            connection = _trusted(
                Connection,
                {
                    "charger_id": event.charger_id,
                    "max_charge_kw": event.charger_max_charge_kw,
                    "max_discharge_kw": event.charger_max_discharge_kw,
                    "since": event.at,
                },
            )
            trip = state.trip
            # Plugged in again after the trip's departure: that trip has been driven.
            if trip is not None and trip.departure_at <= event.at:
                trip = None
            return _changed(
                state, connection=connection, trip=trip, **_ending_setpoint(state, event.at)
            )
        case VehicleUnplugged():
            return _changed(state, connection=None, **_ending_setpoint(state, event.at))
        case VehicleTripPlanned():
            trip = _trusted(
                Trip,
                {"departure_at": event.departure_at, "energy_needed_kwh": event.energy_needed_kwh},
            )
            return _changed(state, trip=trip)
        case VehicleTripCancelled():
            return _changed(state, trip=None)
        case VehicleRegistered():
            spec = VehicleSpec.model_validate(event.model_dump(exclude={"vehicle_id", "at"}))
            return _changed(state, spec=spec)
    raise TypeError(f"vehicle cannot evolve with {type(event).__name__}")


# ---------------------------------------------------------------------------
# decide


def _register(command: RegisterVehicle, state: VehicleState) -> list[Event]:
    if command.refuse_discharge_above_c <= command.derate_above_c:
        raise CommandRejected(
            f"refuse_discharge_above_c {command.refuse_discharge_above_c} must be above "
            f"derate_above_c {command.derate_above_c}"
        )
    spec = VehicleSpec.model_validate(command.model_dump(exclude={*ENVELOPE_FIELDS, "vehicle_id"}))
    if state.spec == spec:
        return []
    if state.spec is not None:
        registered = state.spec.model_dump()
        differing = ", ".join(
            f"{name} {registered[name]!r} != {value!r}"
            for name, value in spec.model_dump().items()
            if registered[name] != value
        )
        raise CommandRejected(
            f"vehicle {state.vehicle_id!r} is already registered with different data "
            f"({differing}); re-registering does not change settings"
        )
    return [
        VehicleRegistered(vehicle_id=state.vehicle_id, at=command.issued_at, **spec.model_dump())
    ]


def _plug_in(command: PlugIn, state: VehicleState) -> list[Event]:
    connection = state.connection
    if (
        connection is not None
        and connection.charger_id == command.charger_id
        and connection.max_charge_kw == command.charger_max_charge_kw
        and connection.max_discharge_kw == command.charger_max_discharge_kw
    ):
        return []
    # A plug-in without the unplug before it (a lost message, a new charger, new
    # charger limits) is the newer fact: it replaces the connection.
    return [
        VehiclePluggedIn(
            vehicle_id=state.vehicle_id,
            at=command.issued_at,
            charger_id=command.charger_id,
            charger_max_charge_kw=command.charger_max_charge_kw,
            charger_max_discharge_kw=command.charger_max_discharge_kw,
        )
    ]


def _unplug(command: Unplug, state: VehicleState) -> list[Event]:
    if state.connection is None:
        return []
    return [
        VehicleUnplugged(
            vehicle_id=state.vehicle_id,
            at=command.issued_at,
            charger_id=state.connection.charger_id,
        )
    ]


def _curtailment(state: VehicleState, at: datetime) -> VehicleSetpointCurtailed | None:
    """Curtail the active discharge if the state no longer allows it at its power."""
    setpoint = state.setpoint
    if setpoint is None or setpoint.power_kw >= 0 or at >= setpoint.valid_until:
        return None
    judged = _judge_setpoint(
        state, setpoint.controller_id, setpoint.power_kw, setpoint.valid_until, at
    )
    if isinstance(judged, VehicleSetpointRejected):
        power_kw, reason = 0.0, judged.reason
    elif abs(judged.power_kw) < abs(setpoint.power_kw) - _SAME_POWER_KW:
        power_kw = judged.power_kw
        reason = "discharge limits changed: limited by " + ", ".join(judged.limited_by)
    else:
        return None
    return VehicleSetpointCurtailed(
        vehicle_id=state.vehicle_id,
        at=at,
        controller_id=setpoint.controller_id,
        previous_power_kw=setpoint.power_kw,
        power_kw=power_kw,
        reason=reason,
    )


def _may_curtail(state: VehicleState) -> bool:
    """Whether new limits could curtail the setpoint: only an active discharge is."""
    return state.setpoint is not None and state.setpoint.power_kw < 0


def _with_curtailment(state: VehicleState, events: list[Event], at: datetime) -> list[Event]:
    if not _may_curtail(state):
        return events
    after = state
    for event in events:
        after = evolve(after, event)
    curtailed = _curtailment(after, at)
    return events if curtailed is None else [*events, curtailed]


def _is_stale(state: VehicleState, measured_at: datetime) -> bool:
    return state.reading is not None and measured_at <= state.reading.measured_at


def _report_telemetry(command: ReportTelemetry, state: VehicleState) -> list[Event]:
    # MQTT redelivers and reorders. A reading no newer than the last one is a
    # duplicate or superseded: the state is "the latest known battery", and letting
    # an old SoC overwrite a newer one would hand the planner a battery that no
    # longer exists. Not an error for the gateway, so no rejection either.
    if _is_stale(state, command.measured_at):
        return []
    # The command's fields were validated with the event's own types (the same
    # Fraction, Celsius and TelemetrySource); only the times still go to UTC.
    reported = _trusted(
        VehicleTelemetryReported,
        {
            "vehicle_id": state.vehicle_id,
            "at": utc(command.issued_at),
            "measured_at": utc(command.measured_at),
            "soc": command.soc,
            "battery_temp_c": command.battery_temp_c,
            "soh": command.soh,
            "source": command.source,
        },
    )
    return _with_curtailment(state, [reported], command.issued_at)


def _telemetry_columns(
    batch: ReportTelemetryBatch, states: Sequence[VehicleState | None]
) -> ColumnDecision[VehicleState]:
    """`decide` then `evolve` for a batch of readings, without command objects.

    Judges the common case only: a registered vehicle, a reading newer than its last
    (else "unchanged", as `_report_telemetry` says), and no active discharge (which a
    reading can curtail). Every other row is left to `decide` (`scalar`), and so is
    one whose JSON could differ from pydantic's (below). The states evolve row by
    row; the payloads are written as columns, the event's JSON as `model_dump_json`
    writes it (tests compare the two byte for byte).
    """
    n = len(states)
    after: list[VehicleState | None] = [None] * n
    scalar: list[int] = []
    judged: list[int] = []
    at_us: list[int] = []
    measured_us: list[int] = []
    rows = zip(
        states,
        batch.issued_at,
        batch.measured_at,
        batch.soc,
        batch.battery_temp_c,
        batch.soh,
        strict=True,
    )
    for i, (state, issued_at, measured_at, soc, temp_c, soh) in enumerate(rows):
        if state is None or state.spec is None or _may_curtail(state):
            scalar.append(i)
        elif not _is_stale(state, measured_at):
            measured = measured_at if measured_at.tzinfo is UTC else utc(measured_at)
            after[i] = _with_reading(state, measured, soc, temp_c, soh)
            judged.append(i)
            at_us.append((issued_at - _EPOCH) // _ONE_US)
            measured_us.append((measured - _EPOCH) // _ONE_US)
    payloads: list[str | None] = [None] * n
    if judged:
        texts = _telemetry_payloads(batch, judged, at_us, measured_us)
        for i, text in zip(judged, texts, strict=True):
            if text is None:
                after[i] = None
                scalar.append(i)
            else:
                payloads[i] = text
    return ColumnDecision(VehicleTelemetryReported, payloads, after, sorted(scalar))


def _telemetry_payloads(
    batch: ReportTelemetryBatch, rows: list[int], at_us: list[int], measured_us: list[int]
) -> list[str | None]:
    """The `VehicleTelemetryReported` JSON of `rows`, in Arrow kernels; None where
    Arrow's text of a value could differ from pydantic's (see `_json_numbers`)."""
    if batch.source not in _TELEMETRY_SOURCES:  # built without validation: not certain
        return [None] * len(rows)
    soc, soc_ok = _json_numbers([batch.soc[i] for i in rows])
    temp, temp_ok = _json_numbers([batch.battery_temp_c[i] for i in rows])
    soh, soh_ok = _json_numbers([batch.soh[i] for i in rows])
    at, at_ok = _json_times(at_us)
    measured, measured_ok = _json_times(measured_us)
    vehicle_ids = pa.array([batch.vehicle_ids[i] for i in rows], pa.string())
    # what `VehicleId` allows needs no escaping in JSON; anything else (a batch built
    # without validation) is left to pydantic's writer
    plain_ids = pc.match_substring_regex(vehicle_ids, _PLAIN_ID).to_numpy(zero_copy_only=False)
    text = pc.binary_join_element_wise(
        '{"vehicle_id":"',
        vehicle_ids,
        '","at":"',
        at,
        '","measured_at":"',
        measured,
        '","soc":',
        soc,
        ',"battery_temp_c":',
        temp,
        ',"soh":',
        soh,
        f',"source":"{batch.source}"}}',
        "",
    )
    ok = soc_ok & temp_ok & soh_ok & at_ok & measured_ok & plain_ids
    return [t if good else None for t, good in zip(text.to_pylist(), ok.tolist(), strict=True)]


_TELEMETRY_SOURCES = frozenset(get_args(TelemetrySource))
_PLAIN_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"


def _json_numbers(values: list[float]) -> tuple[pa.Array, np.ndarray]:
    """Floats as pydantic's JSON writes them, and where that is certain.

    Arrow and pydantic both write the shortest digits that read back as the same
    double; Arrow drops the ".0" of a whole number, which is put back. They switch
    to exponent form at different sizes (1e-6 is "0.000001" to Arrow, "1e-6" to
    pydantic): values below 1e-4 or from 1e15 on (other than 0) are not certain.
    """
    numbers = np.asarray(values, dtype=np.float64)
    text = pc.cast(pa.array(numbers), pa.string())
    whole = pc.invert(pc.match_substring(text, "."))
    text = pc.if_else(whole, pc.binary_join_element_wise(text, ".0", ""), text)
    size = np.abs(numbers)
    return text, (size == 0) | ((size >= 1e-4) & (size < 1e15))


# Years pydantic writes as four digits, as Arrow does.
_JSON_YEARS_US = ((datetime(1000, 1, 1, tzinfo=UTC) - _EPOCH) // _ONE_US, 253402300799999999)


def _json_times(micros_utc: list[int]) -> tuple[pa.Array, np.ndarray]:
    """UTC times as pydantic's JSON writes them: ISO 8601, microseconds only when not
    zero, then "Z"; and where that is certain (years 1000 to 9999)."""
    us = np.asarray(micros_utc, dtype=np.int64)
    # numpy's ISO text: ~0.2 us a value, against ~1.2 for Arrow's strftime
    text = pa.array(np.datetime_as_string(us.astype("datetime64[us]"), unit="us"))
    text = pc.replace_substring_regex(text, r"\.000000$", "")
    low, high = _JSON_YEARS_US
    return pc.binary_join_element_wise(text, "Z", ""), (us >= low) & (us <= high)


def _plan_trip(command: PlanTrip, state: VehicleState) -> list[Event]:
    assert state.spec is not None
    if command.departure_at <= command.issued_at:
        raise CommandRejected(
            f"departure_at {command.departure_at.isoformat()} must be after issued_at "
            f"{command.issued_at.isoformat()}"
        )
    if command.energy_needed_kwh > state.spec.battery_capacity_kwh:
        raise CommandRejected(
            f"energy_needed_kwh {command.energy_needed_kwh} exceeds battery_capacity_kwh "
            f"{state.spec.battery_capacity_kwh}"
        )
    trip = state.trip
    if (
        trip is not None
        and trip.departure_at == command.departure_at
        and trip.energy_needed_kwh == command.energy_needed_kwh
    ):
        return []
    planned = VehicleTripPlanned(
        vehicle_id=state.vehicle_id,
        at=command.issued_at,
        departure_at=command.departure_at,
        energy_needed_kwh=command.energy_needed_kwh,
    )
    return _with_curtailment(state, [planned], command.issued_at)


def _cancel_trip(command: CancelTrip, state: VehicleState) -> list[Event]:
    if state.trip is None:
        return []
    return [VehicleTripCancelled(vehicle_id=state.vehicle_id, at=command.issued_at)]


def _grant_control(command: GrantControl, state: VehicleState) -> list[Event]:
    at = command.issued_at
    if command.lease_until <= at:
        raise CommandRejected(
            f"lease_until {command.lease_until.isoformat()} must be after issued_at "
            f"{at.isoformat()}"
        )
    lease = state.lease
    if lease is not None and lease.live(at) and lease.controller_id != command.controller_id:
        refused = VehicleControlRefused(
            vehicle_id=state.vehicle_id,
            at=at,
            controller_id=command.controller_id,
            holder_id=lease.controller_id,
            reason=(
                f"controller {lease.controller_id!r} holds the control lease until "
                f"{lease.lease_until.isoformat()}; one controller at a time"
            ),
        )
        return [] if state.last_refusal == _refusal_key(refused) else [refused]
    if (
        lease is not None
        and lease.live(at)
        and lease.controller_id == command.controller_id
        and lease.lease_until == command.lease_until
    ):
        return []
    granted = VehicleControlGranted(
        vehicle_id=state.vehicle_id,
        at=at,
        controller_id=command.controller_id,
        lease_until=command.lease_until,
    )
    # A renewal may shorten the lease below the active setpoint's valid_until.
    return _with_curtailment(state, [granted], at)


def _release_control(command: ReleaseControl, state: VehicleState) -> list[Event]:
    lease = state.lease
    if lease is None:
        return []
    if lease.controller_id != command.controller_id:
        raise CommandRejected(
            f"controller {command.controller_id!r} cannot release control: "
            f"{lease.controller_id!r} holds the lease"
        )
    return [
        VehicleControlReleased(
            vehicle_id=state.vehicle_id, at=command.issued_at, controller_id=lease.controller_id
        )
    ]


def _record_energy(command: RecordEnergy, state: VehicleState) -> list[Event]:
    if command.interval_end <= command.interval_start:
        raise CommandRejected(
            f"interval_end {command.interval_end.isoformat()} must be after interval_start "
            f"{command.interval_start.isoformat()}"
        )
    metered_until = state.metered_until
    if metered_until is not None and command.interval_end <= metered_until:
        return []  # already counted (a redelivery) or older than what is counted
    if metered_until is not None and command.interval_start < metered_until:
        raise CommandRejected(
            f"interval_start {command.interval_start.isoformat()} overlaps energy already "
            f"metered up to {metered_until.isoformat()}: it would be counted twice"
        )
    recorded = VehicleEnergyRecorded(
        vehicle_id=state.vehicle_id,
        at=command.issued_at,
        interval_start=command.interval_start,
        interval_end=command.interval_end,
        charged_kwh=command.charged_kwh,
        discharged_kwh=command.discharged_kwh,
    )
    return _with_curtailment(state, [recorded], command.issued_at)


def _request_setpoint(command: RequestSetpoint, state: VehicleState) -> list[Event]:
    if command.valid_until <= command.issued_at:
        raise CommandRejected(
            f"valid_until {command.valid_until.isoformat()} must be after issued_at "
            f"{command.issued_at.isoformat()}"
        )
    judged = _judge_setpoint(
        state, command.controller_id, command.power_kw, command.valid_until, command.issued_at
    )
    if isinstance(judged, VehicleSetpointRejected):
        return [] if state.last_refusal == _refusal_key(judged) else [judged]
    active = state.setpoint
    if (
        active is not None
        and active.controller_id == judged.controller_id
        and active.requested_power_kw == judged.requested_power_kw
        and active.valid_until == judged.valid_until
        and abs(active.power_kw - judged.power_kw) <= _SAME_POWER_KW
        and active.limited_by == judged.limited_by
    ):
        return []
    return [judged]


def _enforce_safe_state(command: EnforceSafeState, state: VehicleState) -> list[Event]:
    if state.safe_state_reason is not None and state.lease is None and state.setpoint is None:
        return []
    return [
        VehicleSafeStateEntered(
            vehicle_id=state.vehicle_id, at=command.issued_at, reason=command.reason
        )
    ]


def decide(command: VehicleCommand, state: VehicleState) -> list[Event]:
    if command.vehicle_id != state.vehicle_id:
        raise CommandRejected(
            f"vehicle_id {command.vehicle_id!r} does not match the stream of {state.vehicle_id!r}"
        )
    if isinstance(command, RegisterVehicle):
        return _register(command, state)
    if state.spec is None:
        raise UnknownEntity(f"vehicle {state.vehicle_id!r} is not registered")
    match command:
        case ReportTelemetry():
            return _report_telemetry(command, state)
        case RequestSetpoint():
            return _request_setpoint(command, state)
        case RecordEnergy():
            return _record_energy(command, state)
        case GrantControl():
            return _grant_control(command, state)
        case ReleaseControl():
            return _release_control(command, state)
        case EnforceSafeState():
            return _enforce_safe_state(command, state)
        case PlugIn():
            return _plug_in(command, state)
        case Unplug():
            return _unplug(command, state)
        case PlanTrip():
            return _plan_trip(command, state)
        case CancelTrip():
            return _cancel_trip(command, state)
    raise CommandRejected(f"the vehicle does not handle {type(command).__name__}")


VEHICLE: Decider[VehicleState] = Decider(
    kind="vehicle",
    command_types=(
        RegisterVehicle,
        PlugIn,
        Unplug,
        ReportTelemetry,
        PlanTrip,
        CancelTrip,
        GrantControl,
        ReleaseControl,
        RecordEnergy,
        RequestSetpoint,
        EnforceSafeState,
    ),
    state_type=VehicleState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
    columnar={ReportTelemetryBatch: _telemetry_columns},
)

__all__ = [
    "MIN_POWER_KW",
    "VEHICLE",
    "CancelTrip",
    "Connection",
    "EnforceSafeState",
    "GrantControl",
    "Lease",
    "PlanTrip",
    "PlugIn",
    "Reading",
    "RecordEnergy",
    "RegisterVehicle",
    "ReleaseControl",
    "ReportTelemetry",
    "ReportTelemetryBatch",
    "RequestSetpoint",
    "RequestSetpoints",
    "Setpoint",
    "Trip",
    "Unplug",
    "VehicleCommand",
    "VehicleSpec",
    "VehicleState",
    "available_charge_kwh",
    "available_discharge_kwh",
    "decide",
    "discharge_refusal",
    "energy_bounds_kwh",
    "evolve",
    "initial_state",
    "reserve_kwh",
    "reserve_soc",
    "soc_bounds",
    "thermal_derating",
]
