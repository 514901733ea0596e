"""A charging station that speaks real OCPP 2.0.1 or 2.1, for demos and tests.

Built on the ocpp library's own charge-point side. It connects with HTTP Basic
auth (and TLS when given an `ssl.SSLContext`), boots, heartbeats at the interval
the CSMS told it, plugs a vehicle in (StatusNotification Occupied + TransactionEvent
Started), streams MeterValues that follow the power it was last told, and answers
SetChargingProfile as configured: `obey`, `reject`, `ignore` (never answer) or
`malformed` (an answer its schema refuses, as a faulty firmware might send).
It can go silent, drop and re-open its connection, and replay its last message
with the same unique id (as a real station retries after a dropped connection).

Example::

    station = SimulatedStation("CS-001", "s3cret", "ws://127.0.0.1:8080/ocpp", version="2.1")
    async with station:
        await station.boot()
        await station.plug_in(evse_id=1, id_token="04A1B2C3")
        await station.start_metering(interval_s=1.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ocpp import v21, v201
from ocpp.messages import MessageType, unpack
from ocpp.routing import on
from ocpp.v21.enums import Action
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.headers import build_authorization_basic

ProfileMode = Literal["obey", "reject", "ignore", "malformed"]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class ReceivedProfile:
    evse_id: int
    power_kw: float
    operation_mode: str | None
    profile: dict[str, Any]


class _StationSide:
    """SetChargingProfile handling shared by both versions; mixed into ocpp's ChargePoint."""

    station: SimulatedStation

    async def route_message(self, raw_msg: str | bytes) -> None:
        if self.station.profile_mode in ("ignore", "malformed"):
            with contextlib.suppress(Exception):
                msg = unpack(raw_msg)
                if msg.message_type_id == MessageType.Call and msg.action == "SetChargingProfile":
                    self.station.profiles_ignored += 1
                    if self.station.profile_mode == "malformed":  # a status no schema allows
                        await self._send(json.dumps([3, msg.unique_id, {"status": "Maybe"}]))  # type: ignore[attr-defined]
                    return
        await super().route_message(raw_msg)  # type: ignore[misc]

    async def call(
        self,
        payload: Any,
        suppress: bool = True,
        unique_id: str | None = None,
        skip_schema_validation: bool = False,
    ) -> Any:
        unique_id = unique_id or str(self._unique_id_generator())  # type: ignore[attr-defined]
        self.station.last_call = (payload, unique_id)
        return await super().call(  # type: ignore[misc]
            payload,
            suppress=suppress,
            unique_id=unique_id,
            skip_schema_validation=skip_schema_validation,
        )

    @on(Action.set_charging_profile)
    async def station_on_set_charging_profile(
        self, evse_id: int, charging_profile: dict[str, Any], **_: Any
    ) -> Any:
        period = charging_profile["charging_schedule"][0]["charging_schedule_period"][0]
        power_w = period.get("setpoint", period.get("limit", 0.0))
        received = ReceivedProfile(
            evse_id, power_w / 1000.0, period.get("operation_mode"), charging_profile
        )
        self.station.profiles.append(received)
        if self.station.profile_mode == "reject":
            return self._call_result.SetChargingProfile(  # type: ignore[attr-defined]
                status="Rejected", status_info={"reason_code": "NotSupported"}
            )
        self.station.told_power_kw[evse_id] = received.power_kw
        return self._call_result.SetChargingProfile(status="Accepted")  # type: ignore[attr-defined]


class _Station201(_StationSide, v201.ChargePoint):
    pass


class _Station21(_StationSide, v21.ChargePoint):
    pass


class SimulatedStation:
    """One simulated charging station; see the module docstring.

    Args:
        station_id: the identity (last URL segment and Basic-auth username).
        password: the Basic-auth password.
        url: the CSMS endpoint without the station id, e.g. `ws://127.0.0.1:8080/ocpp`.
        version: "2.0.1" or "2.1".
        ssl_context: client TLS context for `wss://` endpoints.
        profile_mode: how SetChargingProfile is answered: obey, reject, ignore or malformed.
        power_follow_ratio: metered power = ratio x told power (1.0 follows exactly).
        response_timeout_s: how long the station waits for the CSMS's answers.
    """

    def __init__(
        self,
        station_id: str,
        password: str,
        url: str,
        *,
        version: Literal["2.0.1", "2.1"] = "2.1",
        ssl_context: ssl.SSLContext | None = None,
        profile_mode: ProfileMode = "obey",
        power_follow_ratio: float = 1.0,
        response_timeout_s: float = 10.0,
    ) -> None:
        self.station_id = station_id
        self.password = password
        self.url = url.rstrip("/")
        self.version = version
        self.ssl_context = ssl_context
        self.profile_mode: ProfileMode = profile_mode
        self.power_follow_ratio = power_follow_ratio
        self.response_timeout_s = response_timeout_s
        self.heartbeat_interval_s: float | None = None
        self.told_power_kw: dict[int, float] = {}
        self.profiles: list[ReceivedProfile] = []
        self.profiles_ignored = 0
        self.last_call: tuple[Any, str] | None = None
        self.energy_import_wh: dict[int, float] = {}
        self.energy_export_wh: dict[int, float] = {}
        self.transactions: dict[int, str] = {}
        self._seq_no = 0
        self._connection: ClientConnection | None = None
        self._cp: _Station201 | _Station21 | None = None
        self._reader: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # --- connection -----------------------------------------------------------------

    async def connect(self) -> None:
        """Open the WebSocket (Basic auth, subprotocol of the version) and start reading."""
        subprotocol = "ocpp2.1" if self.version == "2.1" else "ocpp2.0.1"
        self._connection = await connect(
            f"{self.url}/{self.station_id}",
            subprotocols=[subprotocol],  # type: ignore[list-item]
            additional_headers={
                "Authorization": build_authorization_basic(self.station_id, self.password)
            },
            ssl=self.ssl_context,
            compression=None,
            open_timeout=5,
        )
        cls = _Station21 if self.version == "2.1" else _Station201
        self._cp = cls(self.station_id, self._connection, response_timeout=self.response_timeout_s)
        self._cp.station = self
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._cp is not None
        with contextlib.suppress(ConnectionClosed):
            await self._cp.start()

    async def disconnect(self) -> None:
        """Stop talking and close the connection (the station may `connect()` again)."""
        await self.go_silent()
        if self._connection is not None:
            await self._connection.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._connection = self._cp = self._reader = None

    async def reconnect(self) -> None:
        await self.disconnect()
        await self.connect()

    async def __aenter__(self) -> SimulatedStation:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    @property
    def cp(self) -> _Station201 | _Station21:
        assert self._cp is not None, "connect() first"
        return self._cp

    # --- messages -------------------------------------------------------------------

    async def boot(self, *, heartbeat: bool = True) -> Any:
        """BootNotification; starts heartbeating at the interval the CSMS answered."""
        result = await self.cp.call(
            self.cp._call.BootNotification(
                charging_station={
                    "model": "SimCharger",
                    "vendor_name": "v2gfleet",
                    "firmware_version": "1.0",
                    "serial_number": self.station_id,
                },
                reason="PowerUp",
            )
        )
        self.heartbeat_interval_s = float(result.interval)
        if heartbeat:
            self._loops.append(asyncio.create_task(self._heartbeat_loop()))
        return result

    async def heartbeat(self) -> Any:
        return await self.cp.call(self.cp._call.Heartbeat())

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat_interval_s is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            await self.heartbeat()

    async def plug_in(
        self, evse_id: int = 1, id_token: str = "04A1B2C3", transaction_id: str | None = None
    ) -> str:
        """A vehicle plugs in: connector Occupied, then TransactionEvent Started."""
        transaction_id = transaction_id or f"{self.station_id}-tx-{evse_id}"
        await self.cp.call(
            self.cp._call.StatusNotification(
                timestamp=_now_iso(), connector_status="Occupied", evse_id=evse_id, connector_id=1
            )
        )
        self._seq_no += 1
        await self.cp.call(
            self.cp._call.TransactionEvent(
                event_type="Started",
                timestamp=_now_iso(),
                trigger_reason="CablePluggedIn",
                seq_no=self._seq_no,
                transaction_info={"transaction_id": transaction_id},
                evse={"id": evse_id, "connector_id": 1},
                id_token={"id_token": id_token, "type": "ISO14443"},
                meter_value=[self._meter_value(evse_id, context="Transaction.Begin")],
            )
        )
        self.transactions[evse_id] = transaction_id
        return transaction_id

    async def notify_charging_needs(
        self, evse_id: int, departure_time: datetime, energy_kwh: float
    ) -> Any:
        """ISO 15118-20 charging needs as the EV told the station (DC, bidirectional)."""
        transfer = "DC_BPT" if self.version == "2.1" else "DC"
        return await self.cp.call(
            self.cp._call.NotifyEVChargingNeeds(
                evse_id=evse_id,
                charging_needs={
                    "requested_energy_transfer": transfer,
                    "departure_time": departure_time.astimezone(UTC).isoformat(),
                    "dc_charging_parameters": {
                        "ev_max_current": 200,
                        "ev_max_voltage": 500,
                        "energy_amount": round(energy_kwh * 1000),
                    },
                },
            )
        )

    async def notify_allowed_energy_transfer(self, evse_id: int, modes: list[str]) -> Any:
        return await self.cp.call(
            self.cp._call.NotifyAllowedEnergyTransfer(
                allowed_energy_transfer=modes, transaction_id=self.transactions[evse_id]
            )
        )

    def _meter_value(self, evse_id: int, context: str = "Sample.Periodic") -> dict[str, Any]:
        power_w = self.told_power_kw.get(evse_id, 0.0) * self.power_follow_ratio * 1000.0
        return {
            "timestamp": _now_iso(),
            "sampled_value": [
                {
                    "value": round(power_w, 1),
                    "measurand": "Power.Active.Import",
                    "context": context,
                    "unit_of_measure": {"unit": "W"},
                },
                {
                    "value": round(self.energy_import_wh.get(evse_id, 0.0), 1),
                    "measurand": "Energy.Active.Import.Register",
                    "context": context,
                    "unit_of_measure": {"unit": "Wh"},
                },
                {
                    "value": round(self.energy_export_wh.get(evse_id, 0.0), 1),
                    "measurand": "Energy.Active.Export.Register",
                    "context": context,
                    "unit_of_measure": {"unit": "Wh"},
                },
            ],
        }

    async def send_meter_values(self, evse_id: int = 1, elapsed_s: float = 0.0) -> Any:
        """One MeterValues; the registers advance by the told power over `elapsed_s`."""
        power_w = self.told_power_kw.get(evse_id, 0.0) * self.power_follow_ratio * 1000.0
        energy_wh = power_w * elapsed_s / 3600.0
        if energy_wh >= 0:
            self.energy_import_wh[evse_id] = self.energy_import_wh.get(evse_id, 0.0) + energy_wh
        else:
            self.energy_export_wh[evse_id] = self.energy_export_wh.get(evse_id, 0.0) - energy_wh
        return await self.cp.call(
            self.cp._call.MeterValues(evse_id=evse_id, meter_value=[self._meter_value(evse_id)])
        )

    async def start_metering(self, interval_s: float, evse_id: int = 1) -> None:
        """Stream MeterValues every `interval_s` until `go_silent()` or `disconnect()`."""
        self._loops.append(asyncio.create_task(self._meter_loop(interval_s, evse_id)))

    async def _meter_loop(self, interval_s: float, evse_id: int) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.send_meter_values(evse_id, elapsed_s=interval_s)

    async def go_silent(self) -> None:
        """Stop heartbeats and meter values; the connection stays open."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()

    async def replay_last(self) -> Any:
        """Send the last message again with the same unique id (a station's retry)."""
        assert self.last_call is not None, "nothing sent yet"
        payload, unique_id = self.last_call
        return await self.cp.call(payload, unique_id=unique_id)

    async def send_raw(self, frame: str) -> None:
        """Send any text frame as is (malformed JSON, schema-invalid payloads)."""
        assert self._connection is not None
        await self._connection.send(frame)


__all__ = ["ProfileMode", "ReceivedProfile", "SimulatedStation"]
