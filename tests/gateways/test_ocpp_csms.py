"""The OCPP CSMS gateway against simulated stations over real WebSockets on 127.0.0.1.

Each test starts a gateway on a free port (port 0), talks to it with the ocpp
library's own charge-point side (`SimulatedStation`) or a raw websockets client,
and stops both; every scenario is bounded by `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ocpp.charge_point import camel_to_snake_case
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, get_validator
from ocpp.messages import validate_payload as library_validate_payload
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.headers import build_authorization_basic

from actors.charger import (
    MarkOffline,
    MarkOnline,
    RecordAllowedEnergyTransfer,
    RecordBoot,
    RecordChargingNeeds,
    RecordConnectionRejected,
    RecordHeartbeat,
    RecordMessageRejected,
    RecordMeterValues,
    RecordSetpointRejected,
    RecordSetpointSent,
    RecordStatus,
    RecordTransactionEvent,
)
from actors.decider import CommandResult
from actors.gateways.ocpp_csms import (
    PROFILE_ID_BASE,
    ChargingNeedsReport,
    OcppCsmsGateway,
    StationCredentials,
    _compiled_check,
    snake_case,
    validate_payload,
)
from actors.gateways.sink import RecordingSink
from cluster.gateways import BatchingSink
from cluster.simulators.ocpp_station import SimulatedStation
from events.base import Command

pytestmark = pytest.mark.network
T = TypeVar("T")
UTC = dt.UTC
STATIONS = {
    "CS-1": StationCredentials("pw-one"),
    "CS-2": StationCredentials("pw-two"),
    "CS-OFF": StationCredentials("pw-off", enabled=False),
}


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def csms(sink: RecordingSink, **options: Any) -> AsyncIterator[OcppCsmsGateway]:
    gateway = OcppCsmsGateway(sink, STATIONS, host="127.0.0.1", port=0, **options)
    async with gateway:
        yield gateway


def url(gateway: OcppCsmsGateway, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{gateway.port}/ocpp"


def of_type(sink: RecordingSink, kind: type[Command]) -> list[Any]:
    return [c for c in sink.commands if isinstance(c, kind)]


async def eventually(predicate: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


def in_an_hour() -> dt.datetime:
    return dt.datetime.now(UTC) + dt.timedelta(hours=1)


# --- the happy path ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.0.1", "2.1"])
def test_a_station_boots_starts_a_transaction_and_its_meter_values_arrive(version: str) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink, heartbeat_interval_s=30) as gateway:
            station = SimulatedStation("CS-1", "pw-one", url(gateway), version=version)  # type: ignore[arg-type]
            async with station:
                boot = await station.boot()
                assert boot.status == "Accepted" and boot.interval == 30
                await station.plug_in(evse_id=1, id_token="TOKEN-1", transaction_id="tx-9")
                station.told_power_kw[1] = 7.0
                await station.send_meter_values(1, elapsed_s=3600)

        (boot_cmd,) = of_type(sink, RecordBoot)
        assert boot_cmd.charger_id == "CS-1" and boot_cmd.ocpp_version == version
        (status,) = of_type(sink, RecordStatus)
        assert (status.evse_id, status.status) == (1, "Occupied")
        (started,) = of_type(sink, RecordTransactionEvent)
        assert (started.event_type, started.transaction_id, started.id_token) == (
            "Started",
            "tx-9",
            "TOKEN-1",
        )
        begin, periodic = of_type(sink, RecordMeterValues)
        assert begin.command_id == f"{started.command_id}#1"  # rides on the TransactionEvent
        assert periodic.transaction_id == "tx-9" and periodic.evse_id == 1
        assert periodic.power_kw == pytest.approx(7.0)
        assert periodic.energy_import_kwh == pytest.approx(7.0)
        assert of_type(sink, MarkOnline)[0].charger_id == "CS-1"
        for command in sink.commands:
            if command.stream_id.startswith("charger-"):
                assert command.command_id.startswith("CS-1:")
        assert not of_type(sink, RecordConnectionRejected)
        assert not of_type(sink, RecordMessageRejected)

    run(scenario())


def test_charging_needs_become_a_record_and_the_vehicles_trip_plan() -> None:
    class PlanTrip(Command):  # stands in for the vehicle's command
        vehicle_id: str
        departure_at: dt.datetime
        energy_kwh: float

        @property
        def stream_id(self) -> str:
            return f"vehicle-{self.vehicle_id}"

    def planner(report: ChargingNeedsReport) -> Command | None:
        vehicle = {"TOKEN-VAN": "van-7"}.get(report.id_token)
        if vehicle is None or report.departure_at is None or report.energy_kwh is None:
            return None
        return PlanTrip(
            command_id=report.command_id,
            issued_at=report.issued_at,
            vehicle_id=vehicle,
            departure_at=report.departure_at,
            energy_kwh=report.energy_kwh,
        )

    departure = dt.datetime(2030, 1, 1, 7, 0, tzinfo=UTC)

    async def scenario() -> None:
        sink = RecordingSink()
        async with (
            csms(sink, trip_planner=planner) as gateway,
            SimulatedStation("CS-1", "pw-one", url(gateway), version="2.1") as station,
        ):
            await station.boot(heartbeat=False)
            await station.plug_in(evse_id=1, id_token="TOKEN-VAN")
            answer = await station.notify_charging_needs(1, departure, energy_kwh=42.5)
            assert answer.status == "Accepted"
            await station.notify_allowed_energy_transfer(1, ["DC", "DC_BPT"])

        (needs,) = of_type(sink, RecordChargingNeeds)
        assert (needs.departure_at, needs.energy_kwh, needs.id_token) == (
            departure,
            42.5,
            "TOKEN-VAN",
        )
        (trip,) = of_type(sink, PlanTrip)
        assert trip.vehicle_id == "van-7" and trip.command_id == f"{needs.command_id}#trip"
        (allowed,) = of_type(sink, RecordAllowedEnergyTransfer)
        assert allowed.modes == ("DC", "DC_BPT")

    run(scenario())


# --- setpoints ---------------------------------------------------------------------


def test_a_setpoint_reaches_a_201_station_as_a_charge_limit() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with (
            csms(sink) as gateway,
            SimulatedStation("CS-1", "pw-one", url(gateway), version="2.0.1") as station,
        ):
            await station.boot(heartbeat=False)
            await station.plug_in(evse_id=1, transaction_id="tx-1")
            outcome = await gateway.send_setpoint("CS-1", 1, 11.0, in_an_hour())
            assert outcome.accepted
            (profile,) = station.profiles
            period = profile.profile["charging_schedule"][0]["charging_schedule_period"][0]
            assert period == {"start_period": 0, "limit": 11000.0}
            assert profile.profile["charging_profile_purpose"] == "TxProfile"
            assert profile.profile["transaction_id"] == "tx-1"
            assert profile.profile["id"] == PROFILE_ID_BASE + 1

            refused = await gateway.send_setpoint("CS-1", 1, -5.0, in_an_hour())
            assert not refused.accepted
            assert refused.reason == "station speaks 2.0.1: no discharge"
            assert len(station.profiles) == 1  # nothing was sent

        (sent,) = of_type(sink, RecordSetpointSent)
        assert (sent.power_kw, sent.command_id) == (11.0, outcome.command_id)
        (rejected,) = of_type(sink, RecordSetpointRejected)
        assert rejected.reason == "station speaks 2.0.1: no discharge"

    run(scenario())


def test_a_negative_setpoint_reaches_a_21_station_as_a_central_setpoint() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with (
            csms(sink) as gateway,
            SimulatedStation("CS-1", "pw-one", url(gateway), version="2.1") as station,
        ):
            await station.boot(heartbeat=False)
            outcome = await gateway.send_setpoint("CS-1", 1, -7.4, in_an_hour())
            assert outcome.accepted
            (profile,) = station.profiles
            period = profile.profile["charging_schedule"][0]["charging_schedule_period"][0]
            assert period["operation_mode"] == "CentralSetpoint"
            assert period["setpoint"] == -7400.0
            assert period["discharge_limit"] == -7400.0 and period["limit"] == 0.0
            assert station.told_power_kw[1] == pytest.approx(-7.4)

            await station.send_meter_values(1, elapsed_s=3600)
        (sent,) = of_type(sink, RecordSetpointSent)
        assert sent.power_kw == -7.4
        metered = of_type(sink, RecordMeterValues)[-1]
        assert metered.power_kw == pytest.approx(-7.4)  # Power.Active.Import negative

    run(scenario())


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("reject", "station refused"), ("ignore", "timeout"), ("malformed", "station refused")],
)
def test_a_refused_or_unanswered_profile_is_recorded_as_rejected(mode: str, reason: str) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink, setpoint_timeout_s=0.5) as gateway:
            station = SimulatedStation(
                "CS-1",
                "pw-one",
                url(gateway),
                version="2.1",
                profile_mode=mode,  # type: ignore[arg-type]
            )
            async with station:
                await station.boot(heartbeat=False)
                outcome = await gateway.send_setpoint("CS-1", 1, 5.0, in_an_hour())
        assert not outcome.accepted and outcome.reason == reason
        (rejected,) = of_type(sink, RecordSetpointRejected)
        assert rejected.reason == reason and rejected.power_kw == 5.0
        assert not of_type(sink, RecordSetpointSent)
        if mode == "malformed":  # the schema's verdict names what is wrong
            assert "status" in rejected.detail and "Maybe" in rejected.detail

    run(scenario())


def test_a_setpoint_for_a_disconnected_station_is_rejected_then_sent_on_reconnect() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink) as gateway:
            outcome = await gateway.send_setpoint("CS-1", 1, 3.0, in_an_hour())
            assert outcome.reason == "station offline"
            async with SimulatedStation("CS-1", "pw-one", url(gateway)) as station:
                await eventually(lambda: len(station.profiles) == 1)
                await eventually(lambda: bool(of_type(sink, RecordSetpointSent)))
            assert station.profiles[0].power_kw == 3.0
            with pytest.raises(KeyError):
                await gateway.send_setpoint("CS-NOBODY", 1, 3.0, in_an_hour())

    run(scenario())


# --- retries -----------------------------------------------------------------------


def test_a_station_retrying_a_message_after_a_dropped_connection_creates_no_duplicate() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink) as gateway:
            station = SimulatedStation("CS-1", "pw-one", url(gateway), version="2.0.1")
            async with station:
                await station.boot(heartbeat=False)
                station.told_power_kw[1] = 4.0
                await station.send_meter_values(1)
                first = list(sink.commands)
                await station.reconnect()
                await station.replay_last()
            replayed = [c for c in sink.commands if c not in first]
        meter = of_type(sink, RecordMeterValues)
        assert len(meter) == 1
        assert meter[0].command_id == f"CS-1:{station.last_call[1]}"  # type: ignore[index]
        assert all(not isinstance(c, RecordMeterValues) for c in replayed)

    run(scenario())


# --- refusals ----------------------------------------------------------------------


async def raw_connect(
    gateway: OcppCsmsGateway,
    station_id: str,
    password: str | None,
    subprotocol: str = "ocpp2.0.1",
    scheme: str = "ws",
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    headers = {}
    if password is not None:
        headers["Authorization"] = build_authorization_basic(station_id, password)
    return await connect(
        f"{url(gateway, scheme)}/{station_id}",
        subprotocols=[subprotocol],  # type: ignore[list-item]
        additional_headers=headers,
        ssl=ssl_context,
        open_timeout=5,
    )


@pytest.mark.parametrize(
    ("station_id", "password", "subprotocol", "status", "reason"),
    [
        ("CS-1", "wrong", "ocpp2.0.1", 401, "wrong password"),
        ("CS-1", None, "ocpp2.0.1", 401, "missing credentials (HTTP Basic required)"),
        ("CS-9", "pw-one", "ocpp2.0.1", 404, "unknown station 'CS-9'"),
        ("CS-OFF", "pw-off", "ocpp2.0.1", 403, "station 'CS-OFF' is blocked"),
        ("CS-1", "pw-one", "ocpp1.6", 400, "no supported OCPP subprotocol offered"),
    ],
)
def test_a_bad_handshake_is_refused_and_recorded(
    station_id: str, password: str | None, subprotocol: str, status: int, reason: str
) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink) as gateway:
            with pytest.raises(InvalidStatus) as refused:
                await raw_connect(gateway, station_id, password, subprotocol)
            assert refused.value.response.status_code == status
            assert reason in refused.value.response.body.decode()
            assert not gateway.connected(station_id)
        (record,) = sink.commands
        assert isinstance(record, RecordConnectionRejected)
        assert record.stream_id == "ocpp-gateway-csms"
        assert (record.station_id, record.http_status) == (station_id, status)
        assert reason in record.reason and record.peer.startswith("127.0.0.1:")

    run(scenario())


def _meter_payload(**change: Any) -> dict[str, Any]:
    """A valid MeterValues payload; `change` replaces a field (None drops it)."""
    sampled: dict[str, Any] = {
        "value": change.pop("value", 7400.0),
        "measurand": change.pop("measurand", "Power.Active.Import"),
        "unitOfMeasure": {"unit": "W"},
    }
    payload: dict[str, Any] = {
        "evseId": 1,
        "meterValue": [{"timestamp": "2030-01-01T00:00:00Z", "sampledValue": [sampled]}],
    }
    for key, value in change.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def _meter_frame(**change: Any) -> str:
    return json.dumps([2, "m-mv", "MeterValues", _meter_payload(**change)])


@pytest.mark.parametrize(
    ("frame", "error_code", "action"),
    [
        ("{not json", "FormatViolation", ""),
        ('[2,"m-1","BootNotification",{"reason":"PowerUp"}]', "ProtocolError", "BootNotification"),
        (
            '[2,"m-2","Heartbeat",{"unexpected":1}]',
            "FormatViolation",
            "Heartbeat",
        ),
        (
            json.dumps(
                [
                    2,
                    "m-3",
                    "MeterValues",
                    {
                        "evseId": 1,
                        "meterValue": [
                            {
                                "timestamp": "2030-01-01T00:00:00Z",
                                "sampledValue": [
                                    {
                                        "value": 5,
                                        "measurand": "Power.Active.Import",
                                        "unitOfMeasure": {"unit": "hp"},
                                    }
                                ],
                            }
                        ],
                    },
                ]
            ),
            "PropertyConstraintViolation",
            "MeterValues",
        ),
        # schema errors in the gateway's busiest message, each with the library's code
        (_meter_frame(evseId="1"), "TypeConstraintViolation", "MeterValues"),
        # 2.0.1's schema allows a negative EVSE id; the command refuses it
        (_meter_frame(evseId=-1), "PropertyConstraintViolation", "MeterValues"),
        (_meter_frame(meterValue=[]), "FormatViolation", "MeterValues"),
        (_meter_frame(meterValue=None), "ProtocolError", "MeterValues"),
        (_meter_frame(measurand="Power.Active.Magic"), "FormatViolation", "MeterValues"),
        (_meter_frame(value=True), "TypeConstraintViolation", "MeterValues"),
        (_meter_frame(extra=1), "FormatViolation", "MeterValues"),
    ],
)
def test_a_malformed_message_gets_a_call_error_and_only_a_rejection_record(
    frame: str, error_code: str, action: str
) -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink) as gateway:
            websocket = await raw_connect(gateway, "CS-1", "pw-one")
            try:
                await websocket.send(frame)
                answer = json.loads(await asyncio.wait_for(websocket.recv(), 5))
            finally:
                await websocket.close()
            assert answer[0] == 4 and answer[2] == error_code
            assert gateway.rejected_messages == 1
        charger_commands = [c for c in sink.commands if not isinstance(c, MarkOnline)]
        (record,) = charger_commands
        assert isinstance(record, RecordMessageRejected)
        assert (record.station_id, record.action, record.error_code) == ("CS-1", action, error_code)
        assert record.reason.startswith(error_code)

    run(scenario())


def _mutations(payload: Any) -> Iterator[Any]:
    """The payload with one thing broken (or bent) at every place in it."""
    wrong_values: list[Any] = [None, True, 0, -1, 1.5, "x" * 2000, "", [], {}, {"x": 1}]
    if isinstance(payload, dict):
        yield {**payload, "unexpectedField": 1}
        for key, value in payload.items():
            yield {k: v for k, v in payload.items() if k != key}
            for wrong in wrong_values:
                yield {**payload, key: wrong}
            for bent in _mutations(value):
                yield {**payload, key: bent}
    elif isinstance(payload, list):
        yield []
        yield payload * 3
        for i, value in enumerate(payload):
            for bent in _mutations(value):
                yield [*payload[:i], bent, *payload[i + 1 :]]


@pytest.mark.parametrize("version", ["2.0.1", "2.1"])
@pytest.mark.parametrize(
    ("action", "payload"),
    [
        ("MeterValues", _meter_payload()),
        (
            "BootNotification",
            {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"},
        ),
        (
            "TransactionEvent",
            {
                "eventType": "Updated",
                "timestamp": "2030-01-01T00:00:00Z",
                "triggerReason": "MeterValuePeriodic",
                "seqNo": 3,
                "transactionInfo": {"transactionId": "tx-1", "chargingState": "Charging"},
                "evse": {"id": 1, "connectorId": 1},
                "idToken": {"idToken": "TOKEN-1", "type": "ISO14443"},
                "meterValue": _meter_payload()["meterValue"],
            },
        ),
        (
            "NotifyEVChargingNeeds",
            {
                "evseId": 1,
                "chargingNeeds": {
                    "requestedEnergyTransfer": "AC_single_phase",
                    "acChargingParameters": {
                        "energyAmount": 20000,
                        "evMinCurrent": 6,
                        "evMaxCurrent": 32,
                        "evMaxVoltage": 400,
                    },
                },
            },
        ),
    ],
)
def test_compiled_schema_checks_give_the_libraries_verdict(
    action: str, payload: dict[str, Any], version: str
) -> None:
    """Every payload the library's jsonschema refuses is refused with its error code."""
    library = get_validator(2, action, version)
    compiled = _compiled_check(Call("u-1", action, payload), version)
    assert compiled is not None, "the OCPP schemas stay within the compiled subset"
    verdicts = {True: 0, False: 0}
    for bent in [payload, *_mutations(payload)]:
        call = Call("u-1", action, bent)
        valid = library.is_valid(bent)
        verdicts[valid] += 1
        assert compiled(bent) is valid, bent
        if valid:
            run(validate_payload(call, version))
            continue
        with pytest.raises(OCPPError) as ours:
            run(validate_payload(call, version))
        with pytest.raises(OCPPError) as theirs:
            run(library_validate_payload(call, version))
        assert (ours.value.code, ours.value.details) == (theirs.value.code, theirs.value.details)
    assert verdicts[True] >= 2 and verdicts[False] >= 20  # both sides were exercised


def test_snake_case_gives_the_librarys_keys() -> None:
    payload = {
        "evseId": 1,
        "chargingNeeds": {"v2xChargingParameters": {"evTargetEnergyRequest": 1}},
        "meterValue": [{"sampledValue": [{"unitOfMeasure": {"unit": "W"}}]}],
        "customData": {"vendorId": "x", "someVendorKey": [{"innerKey": 1}]},
    }
    assert snake_case(payload) == camel_to_snake_case(payload)
    assert snake_case(payload) == camel_to_snake_case(payload)  # from remembered keys


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "v2gfleet test CSMS")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "csms.pem", tmp_path / "csms.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_profile_2_speaks_tls_and_refuses_plaintext(tmp_path: Path) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_path, key_path)
    client_tls = ssl.create_default_context(cafile=str(cert_path))

    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(sink, ssl_context=server_tls) as gateway:
            station = SimulatedStation(
                "CS-2", "pw-two", url(gateway, "wss"), version="2.1", ssl_context=client_tls
            )
            async with station:
                assert (await station.boot(heartbeat=False)).status == "Accepted"
            with pytest.raises((InvalidMessage, OSError, EOFError)):
                await raw_connect(gateway, "CS-2", "pw-two", scheme="ws")
            await eventually(lambda: bool(of_type(sink, RecordConnectionRejected)))
            with pytest.raises(InvalidStatus) as refused:
                await raw_connect(gateway, "CS-2", "nope", scheme="wss", ssl_context=client_tls)
            assert refused.value.response.status_code == 401
        assert len(of_type(sink, RecordBoot)) == 1
        plaintext, wrong_password = of_type(sink, RecordConnectionRejected)
        assert "plaintext" in plaintext.reason and "TLS" in plaintext.reason
        assert wrong_password.http_status == 401

    run(scenario())


# --- liveness ----------------------------------------------------------------------


def test_a_silent_station_goes_offline_and_is_resynchronised_when_it_returns() -> None:
    offline_calls: list[str] = []

    async def on_offline(station_id: str) -> None:
        offline_calls.append(station_id)

    async def scenario() -> None:
        sink = RecordingSink()
        async with csms(
            sink,
            heartbeat_interval_s=1,
            offline_grace_s=0.3,
            watchdog_period_s=0.05,
            on_offline=on_offline,
        ) as gateway:
            station = SimulatedStation("CS-1", "pw-one", url(gateway), version="2.1")
            async with station:
                await station.boot()  # heartbeats every second
                outcome = await gateway.send_setpoint("CS-1", 1, -3.0, in_an_hour())
                assert outcome.accepted
                await asyncio.sleep(1.6)  # two heartbeats: still online
                assert gateway.online("CS-1") and not of_type(sink, MarkOffline)

                await station.go_silent()
                await eventually(lambda: bool(of_type(sink, MarkOffline)), timeout_s=4)
                assert offline_calls == ["CS-1"] and not gateway.online("CS-1")

                await station.reconnect()
                await eventually(lambda: len(station.profiles) == 2)
                await eventually(lambda: len(of_type(sink, RecordSetpointSent)) == 2)
                assert gateway.online("CS-1")
        assert station.profiles[1].power_kw == -3.0
        assert len(of_type(sink, MarkOnline)) == 2
        (offline,) = of_type(sink, MarkOffline)
        assert offline.charger_id == "CS-1"

    run(scenario())


def test_a_station_message_starts_a_trace_that_its_commands_carry(telemetry: Any) -> None:
    async def scenario() -> RecordingSink:
        sink = RecordingSink()
        async with csms(sink) as gateway:
            station = SimulatedStation("CS-1", "pw-one", url(gateway), version="2.1")
            async with station:
                await station.boot()
        return sink

    sink = run(scenario())
    (boot,) = of_type(sink, RecordBoot)
    spans = [s for s in telemetry.spans.get_finished_spans() if s.name == "ocpp.BootNotification"]
    assert spans, "the gateway must have opened a span for the message"
    _, trace_id, span_id, _ = boot.traceparent.split("-")
    assert (int(trace_id, 16), int(span_id, 16)) in {
        (s.context.trace_id, s.context.span_id) for s in spans
    }


# --- batching on the way to the hosts ------------------------------------------------


class _CountingSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        self.batches.append([c.command_id for c in commands])
        return await super().submit(commands)


def _heartbeat(n: int) -> RecordHeartbeat:
    return RecordHeartbeat(command_id=f"CS-1:hb-{n}", issued_at=in_an_hour(), charger_id="CS-1")


@pytest.mark.parametrize(("linger_s", "calls"), [(0.0, 2), (600.0, 1)])
def test_a_lingering_sink_sends_a_trickle_of_messages_in_one_call(
    linger_s: float, calls: int
) -> None:
    """Without linger the first message leaves alone; with it, both leave together
    (here once the batch is full, so the test never waits out the linger)."""

    async def scenario() -> None:
        inner = _CountingSink()
        sink = BatchingSink(inner, max_batch=2, linger_s=linger_s)
        first = asyncio.create_task(sink.submit([_heartbeat(1)]))
        for _ in range(3):
            await asyncio.sleep(0)  # the first one is on its way, or lingering
        second = await sink.submit([_heartbeat(2)])
        assert [r.command_id for r in await first] == ["CS-1:hb-1"]
        assert [r.command_id for r in second] == ["CS-1:hb-2"]
        assert len(inner.batches) == calls
        assert [c for batch in inner.batches for c in batch] == ["CS-1:hb-1", "CS-1:hb-2"]

    run(scenario())


def test_a_lone_message_leaves_after_the_linger() -> None:
    async def scenario() -> None:
        inner = _CountingSink()
        sink = BatchingSink(inner, max_batch=100, linger_s=0.05)
        (result,) = await sink.submit([_heartbeat(1)])
        assert result.ok and inner.batches == [["CS-1:hb-1"]]

    run(scenario())
