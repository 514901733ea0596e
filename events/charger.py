"""Events of a charger (one OCPP charging station) and of the OCPP gateway.

A charger's stream is `charger-{charger_id}`; its commands live in
`actors/charger.py`. Connections and messages the CSMS gateway refuses (unknown
station, wrong password, plaintext on a TLS endpoint, malformed OCPP) are facts an
operator must see; they live on the gateway's stream `ocpp-gateway-{gateway_id}`,
because the station may be one we do not know.

Event type names are global in the log, so names a vehicle or inverter could also
want carry a `Charger`/`Ocpp` prefix. Power sign: `power_kw > 0` charges the
vehicle, `< 0` discharges it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime

from events.base import Event

OcppVersion = Literal["2.0.1", "2.1"]
SetpointRejectionReason = Literal[
    "station refused",
    "timeout",
    "station offline",
    "station speaks 2.0.1: no discharge",
]


class ChargerRegistered(Event):
    charger_id: str
    site_id: str
    max_charge_kw: float
    max_discharge_kw: float
    ocpp_version: OcppVersion
    divergence_tolerance_kw: float
    divergence_tolerance_ratio: float
    divergence_samples: int


class ChargerBooted(Event):
    vendor: str
    model: str
    firmware_version: str
    serial_number: str
    reason: str
    ocpp_version: OcppVersion
    booted_at: AwareDatetime


class ChargerHeartbeatReceived(Event):
    received_at: AwareDatetime


class ConnectorStatusChanged(Event):
    evse_id: int
    connector_id: int
    status: str
    reported_at: AwareDatetime


class ChargerAuthorizationRecorded(Event):
    id_token: str
    token_type: str
    status: str


class ChargingTransactionStarted(Event):
    transaction_id: str
    evse_id: int | None
    id_token: str
    trigger_reason: str
    started_at: AwareDatetime


class ChargingTransactionUpdated(Event):
    transaction_id: str
    seq_no: int
    trigger_reason: str
    reported_at: AwareDatetime


class ChargingTransactionEnded(Event):
    transaction_id: str
    trigger_reason: str
    stopped_reason: str
    ended_at: AwareDatetime


class ChargerMeterValuesRecorded(Event):
    evse_id: int
    transaction_id: str
    sampled_at: AwareDatetime
    power_kw: float | None
    energy_import_kwh: float | None
    energy_export_kwh: float | None
    soc: float | None


class ChargerPowerDivergenceDetected(Event):
    """Metered power stayed outside the tolerance around the setpoint for `samples` samples."""

    evse_id: int
    setpoint_kw: float
    metered_kw: float
    tolerance_kw: float
    samples: int
    detected_at: AwareDatetime


class ChargerPowerDivergenceCleared(Event):
    evse_id: int
    setpoint_kw: float
    metered_kw: float
    cleared_at: AwareDatetime


class ChargingNeedsRecorded(Event):
    """ISO 15118-20 needs relayed by the station: when the driver leaves, how much energy."""

    evse_id: int
    requested_energy_transfer: str
    departure_at: AwareDatetime | None
    energy_kwh: float | None
    id_token: str


class AllowedEnergyTransferRecorded(Event):
    transaction_id: str
    modes: tuple[str, ...]


class ChargerSetpointSent(Event):
    """The station accepted a charging profile for `power_kw` until `valid_until`."""

    evse_id: int
    power_kw: float
    valid_until: AwareDatetime
    profile_id: int
    accepted_at: AwareDatetime


class ChargerSetpointRejected(Event):
    evse_id: int
    power_kw: float
    reason: SetpointRejectionReason
    detail: str
    rejected_at: AwareDatetime


class ChargerWentOffline(Event):
    last_seen_at: AwareDatetime
    detected_at: AwareDatetime


class ChargerCameOnline(Event):
    at: AwareDatetime


class OcppConnectionRejected(Event):
    station_id: str
    http_status: int | None
    reason: str
    peer: str
    rejected_at: AwareDatetime


class OcppMessageRejected(Event):
    station_id: str
    action: str
    unique_id: str
    error_code: str
    reason: str
    rejected_at: AwareDatetime


__all__ = [
    "AllowedEnergyTransferRecorded",
    "ChargerAuthorizationRecorded",
    "ChargerBooted",
    "ChargerCameOnline",
    "ChargerHeartbeatReceived",
    "ChargerMeterValuesRecorded",
    "ChargerPowerDivergenceCleared",
    "ChargerPowerDivergenceDetected",
    "ChargerRegistered",
    "ChargerSetpointRejected",
    "ChargerSetpointSent",
    "ChargerWentOffline",
    "ChargingNeedsRecorded",
    "ChargingTransactionEnded",
    "ChargingTransactionStarted",
    "ChargingTransactionUpdated",
    "ConnectorStatusChanged",
    "OcppConnectionRejected",
    "OcppMessageRejected",
    "OcppVersion",
    "SetpointRejectionReason",
]
