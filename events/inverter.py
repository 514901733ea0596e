"""Facts about a grid-tied bidirectional inverter (Modbus TCP at the edge).

Sign convention: `power_kw > 0` charges the battery behind the inverter (import
from the grid), `power_kw < 0` discharges it (export, V2G).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime

from events.base import Event

FaultKind = Literal["modbus_exception", "timeout", "connection_lost"]


class InverterRegistered(Event):
    inverter_id: str
    site_id: str
    rated_power_kw: float
    derate_above_c: float
    safe_state_above_c: float


class InverterSetpointAccepted(Event):
    """The setpoint the inverter should run; `power_kw` may be less than asked.

    `reason` explains every difference between `requested_power_kw` and `power_kw`
    (clamped to the rating, derated for temperature); empty when none.
    """

    inverter_id: str
    requested_power_kw: float
    power_kw: float
    temperature_c: float | None
    reason: str


class InverterSetpointRefused(Event):
    inverter_id: str
    requested_power_kw: float
    reason: str


class InverterSetpointDerated(Event):
    """A measured temperature forced the running setpoint down (no request asked)."""

    inverter_id: str
    previous_power_kw: float
    power_kw: float
    temperature_c: float
    reason: str


class InverterSafeStateEntered(Event):
    """Over-temperature: setpoint forced to 0 kW, new setpoints refused until it cools."""

    inverter_id: str
    temperature_c: float
    reason: str


class InverterSafeStateLeft(Event):
    inverter_id: str
    temperature_c: float


class InverterMeasured(Event):
    inverter_id: str
    measured_at: AwareDatetime
    active_power_kw: float
    dc_voltage_v: float
    temperature_c: float
    status: int
    fault_code: int


class InverterFaulted(Event):
    """The device or the link to it failed; `retry_count` counts attempts so far."""

    inverter_id: str
    observed_at: AwareDatetime
    fault_kind: FaultKind
    detail: str
    exception_code: int | None
    retry_count: int


class InverterSetpointConfirmed(Event):
    """The register read back after the write holds the setpoint that was written."""

    inverter_id: str
    power_kw: float
    confirmed_at: AwareDatetime


class InverterSetpointMismatched(Event):
    inverter_id: str
    expected_power_kw: float
    read_back_power_kw: float
    observed_at: AwareDatetime


__all__ = [
    "FaultKind",
    "InverterFaulted",
    "InverterMeasured",
    "InverterRegistered",
    "InverterSafeStateEntered",
    "InverterSafeStateLeft",
    "InverterSetpointAccepted",
    "InverterSetpointConfirmed",
    "InverterSetpointDerated",
    "InverterSetpointMismatched",
    "InverterSetpointRefused",
]
