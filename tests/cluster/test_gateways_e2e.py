"""Devices speak real protocols, end to end, on one real local Ray.

An OCPP 2.1 station (the ocpp library's own charge-point side), a pymodbus
inverter and a mosquitto broker, all on 127.0.0.1 free ports, talk to the gateway
actors; what they say lands in the log, and setpoint decisions made through the
client come back to them through the setpoint relay. The simulators run on one
event loop in a background thread (the test body is the Ray driver).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiomqtt
import pytest
import ray
from websockets.exceptions import InvalidStatus

from actors.inverter import RequestInverterSetpoint
from actors.tracing import traceparent_in
from actors.vehicle import (
    GrantControl,
    PlugIn,
    RegisterVehicle,
    ReportTelemetry,
    RequestSetpoint,
    Unplug,
)
from cluster.client import FleetClient
from cluster.depot import LoopThread
from cluster.device_config import (
    BrokerConfig,
    DeviceConfig,
    InverterConfig,
    OcppSettings,
    StationConfig,
    VehicleBinding,
)
from cluster.gateways import DeviceServices
from cluster.mosquitto import Mosquitto, find_mosquitto
from cluster.runtime import Runtime, RuntimeConfig
from cluster.simulators.modbus_inverter import InverterSimulator
from cluster.simulators.ocpp_station import SimulatedStation
from events.base import RecordedEvent

pytestmark = [pytest.mark.ray, pytest.mark.network]

SITE = "site-a"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


class System:
    def __init__(self, fleet: FleetClient, services: DeviceServices, sims: LoopThread) -> None:
        self.fleet = fleet
        self.services = services
        self.sims = sims
        self.url = ""
        self.broker_port = 0
        self.inverter: InverterSimulator | None = None
        self.clock = datetime.now(UTC)

    def tick(self) -> datetime:
        """Strictly increasing sample times (deciders ignore a sample no newer than the last)."""
        self.clock += timedelta(seconds=1)
        return self.clock

    def events(self, stream_id: str, type_: str | None = None) -> list[RecordedEvent]:
        return [e for e in self.fleet.events(stream_id) if type_ is None or e.type == type_]

    def wait_events(
        self, stream_id: str, type_: str, count: int = 1, timeout_s: float = 10.0
    ) -> list[RecordedEvent]:
        found: list[RecordedEvent] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(stream_id, type_)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{stream_id}: {len(found)} {type_} events, wanted {count}")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


@pytest.fixture(scope="module")
def system(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run scripts/install-mosquitto (CI installs it)")
    data_dir = tmp_path_factory.mktemp("gateways")
    sims = LoopThread()
    broker = Mosquitto(workdir=data_dir / "mosquitto")
    broker.start()
    inverter = InverterSimulator(rated_power_kw=11.0)
    sims.run(inverter.start())
    devices = DeviceConfig(
        ocpp=OcppSettings(port=0, heartbeat_interval_s=1, offline_grace_s=1.0),
        stations=(
            StationConfig(
                station_id="CS-A",
                password="pw-a",
                site_id=SITE,
                max_charge_kw=11,
                max_discharge_kw=11,
            ),
            StationConfig(
                station_id="CS-B",
                password="pw-b",
                site_id=SITE,
                max_charge_kw=11,
                max_discharge_kw=11,
            ),
        ),
        inverters=(
            InverterConfig(
                inverter_id="inv-1",
                site_id=SITE,
                host="127.0.0.1",
                port=inverter.port,
                rated_power_kw=11.0,
                poll_interval_s=0.2,
                timeout_s=0.3,
                backoff_max_s=0.4,
            ),
        ),
        broker=BrokerConfig(port=broker.port, session_expiry_s=300),
        vehicles=(
            VehicleBinding(vehicle_id="van-1", id_tokens=("TOKEN-VAN-1",)),
            VehicleBinding(vehicle_id="van-2", id_tokens=("TOKEN-VAN-2",)),
        ),
    )
    config = RuntimeConfig(name="gw", data_dir=str(data_dir), shards={"vehicle": 1})
    runtime = Runtime(config).start()
    fleet = FleetClient(runtime, owns_ray=False)
    services = DeviceServices(config, devices).start()
    system = System(fleet, services, sims)
    system.url = devices.station_url("CS-A", port=services.ocpp_ports()[0])
    system.broker_port = broker.port
    system.inverter = inverter
    now = datetime.now(UTC)
    for vehicle in ("van-1", "van-2"):
        fleet.send(
            RegisterVehicle(
                command_id=f"reg-{vehicle}",
                issued_at=now,
                vehicle_id=vehicle,
                model="Volkswagen ID.4",
                site_id=SITE,
            ),
            check=True,
        )
    try:
        yield system
    finally:
        services.stop()
        fleet.close()
        sims.run(inverter.stop())
        sims.close()
        broker.close()


def station(system: System, station_id: str, password: str) -> SimulatedStation:
    return SimulatedStation(station_id, password, system.url, version="2.1")


def test_a_station_meters_and_receives_a_discharge_setpoint_without_duplicates(
    system: System,
) -> None:
    fleet = system.fleet
    cs = station(system, "CS-A", "pw-a")

    async def boot_and_meter() -> None:
        await cs.connect()
        await cs.boot(heartbeat=True)
        await cs.plug_in(evse_id=1, id_token="TOKEN-VAN-1")
        await cs.send_meter_values(1, elapsed_s=10)

    system.sims.run(boot_and_meter())
    system.wait_events("charger-CS-A", "ChargingTransactionStarted")
    metered = system.wait_events("charger-CS-A", "ChargerMeterValuesRecorded", count=2)

    # The vehicle is plugged in, gets a lease and a discharge setpoint through the client.
    now = datetime.now(UTC)
    results = fleet.send_many(
        [
            ReportTelemetry(
                command_id="t-van-1-0",
                issued_at=system.tick(),
                measured_at=system.clock,
                vehicle_id="van-1",
                soc=0.8,
                battery_temp_c=20.0,
                soh=0.95,
            ),
            PlugIn(
                command_id="plug-van-1",
                issued_at=now,
                vehicle_id="van-1",
                charger_id="CS-A",
                charger_max_charge_kw=11,
                charger_max_discharge_kw=11,
            ),
            GrantControl(
                command_id="lease-van-1",
                issued_at=now,
                vehicle_id="van-1",
                controller_id="dispatcher-test",
                lease_until=now + timedelta(hours=1),
            ),
            RequestSetpoint(
                command_id="sp-van-1",
                issued_at=now,
                vehicle_id="van-1",
                controller_id="dispatcher-test",
                power_kw=-5.0,
                valid_until=now + timedelta(minutes=15),
                traceparent=f"00-{TRACE_ID}-b7ad6b7169203331-01",
            ),
        ]
    )
    assert [r.status for r in results] == ["recorded"] * 4, results
    sent = system.wait_events("charger-CS-A", "ChargerSetpointSent")
    assert json.loads(sent[-1].payload)["power_kw"] == -5.0
    # one trace from the setpoint request, through the vehicle host, the log and the
    # relay, to the station's answer (each process hands the context on)
    [accepted] = system.events("vehicle-van-1", "VehicleSetpointAccepted")
    assert traceparent_in(accepted.metadata).split("-")[1] == TRACE_ID
    assert traceparent_in(sent[-1].metadata).split("-")[1] == TRACE_ID
    profile = cs.profiles[-1]
    assert (profile.evse_id, profile.power_kw, profile.operation_mode) == (
        1,
        -5.0,
        "CentralSetpoint",
    )

    # A dropped connection, then the station retries its last message (same unique id).
    before = len(system.events("charger-CS-A"))
    assert cs.last_call is not None
    unique_id = cs.last_call[1]

    async def retry() -> None:
        await cs.go_silent()
        await cs.reconnect()
        await cs.replay_last()

    system.sims.run(retry())
    time.sleep(0.5)
    after = system.events("charger-CS-A")
    assert len(after) == before, [e.type for e in after[before:]]
    assert sum(e.command_id == f"CS-A:{unique_id}" for e in after) == 1
    assert len(system.events("charger-CS-A", "ChargerMeterValuesRecorded")) == len(metered)

    # Unplugged: the station is left at zero, not at the last discharge.
    fleet.send(Unplug(command_id="unplug-van-1", issued_at=datetime.now(UTC), vehicle_id="van-1"))
    wait_until(lambda: cs.profiles[-1].power_kw == 0.0, what="a zero profile after unplug")
    system.sims.run(cs.disconnect())


def test_a_wrong_password_or_an_unknown_station_is_refused_and_recorded(system: System) -> None:
    async def attempt(station_id: str, password: str) -> int:
        with pytest.raises(InvalidStatus) as refused:
            await station(system, station_id, password).connect()
        return refused.value.response.status_code

    assert system.sims.run(attempt("CS-A", "not-the-password")) == 401
    assert system.sims.run(attempt("CS-Z", "whatever")) == 404
    rejected = system.wait_events("ocpp-gateway-ocpp-0", "OcppConnectionRejected", count=2)
    statuses = {json.loads(e.payload)["http_status"] for e in rejected}
    assert {401, 404} <= statuses


def test_a_silent_station_puts_its_vehicle_in_the_safe_state(system: System) -> None:
    fleet = system.fleet
    cs = station(system, "CS-B", "pw-b")

    async def boot() -> None:
        await cs.connect()
        await cs.boot(heartbeat=True)
        await cs.plug_in(evse_id=1, id_token="TOKEN-VAN-2")

    system.sims.run(boot())
    now = datetime.now(UTC)
    fleet.send(
        PlugIn(
            command_id="plug-van-2",
            issued_at=now,
            vehicle_id="van-2",
            charger_id="CS-B",
            charger_max_charge_kw=11,
            charger_max_discharge_kw=11,
        ),
        check=True,
    )
    watermark = fleet.watermark()
    ray.get(system.services.relay.wait_relayed.remote(watermark))  # the relay knows the plug
    system.sims.run(cs.go_silent())  # heartbeat 1 s + grace 1 s: offline after ~2 s
    entered = system.wait_events("vehicle-van-2", "VehicleSafeStateEntered", timeout_s=10)
    assert "CS-B offline" in json.loads(entered[0].payload)["reason"]
    system.wait_events("charger-CS-B", "ChargerWentOffline")
    system.sims.run(cs.disconnect())


def _telemetry(at: datetime, soc: float) -> bytes:
    body = {"soc": soc, "battery_temp_c": 21.0, "soh": 0.95, "measured_at": at.isoformat()}
    return json.dumps(body).encode()


def _publish(system: System, messages: list[tuple[str, bytes]]) -> None:
    async def publish() -> None:
        async with aiomqtt.Client("127.0.0.1", system.broker_port) as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1)

    system.sims.run(publish())


TOPIC = f"v2g/{SITE}/vehicles/van-2/telemetry"


def test_mqtt_telemetry_becomes_events_and_a_malformed_message_changes_nothing(
    system: System,
) -> None:
    fleet = system.fleet
    assert ray.get(system.services.ingest[0].subscribed.remote())
    at = system.tick()
    _publish(system, [(TOPIC, _telemetry(at, 0.61))])
    reported = system.wait_events("vehicle-van-2", "VehicleTelemetryReported")
    payload = json.loads(reported[-1].payload)
    assert (payload["soc"], payload["source"]) == (0.61, "mqtt")
    state_before = fleet.state("vehicle", "van-2")

    _publish(system, [(TOPIC, b'{"soc": 1.7, "battery_temp_c": 21, "soh"')])
    rejected = system.wait_events(f"telemetry-rejections-{SITE}", "TelemetryMessageRejected")
    assert "malformed JSON" in json.loads(rejected[-1].payload)["reason"]
    assert fleet.state("vehicle", "van-2") == state_before
    assert len(system.events("vehicle-van-2", "VehicleTelemetryReported")) == len(reported)


def test_telemetry_received_but_not_recorded_is_redelivered_after_the_ingest_actor_dies(
    system: System,
) -> None:
    ingest = system.services.ingest[0]
    pid = ray.get(ingest.status.remote())["pid"]
    before = len(system.events("vehicle-van-2", "VehicleTelemetryReported"))
    ray.get(ingest.pause.remote())
    times = [system.tick() for _ in range(5)]
    _publish(system, [(TOPIC, _telemetry(at, 0.5 + i / 100)) for i, at in enumerate(times)])
    wait_until(lambda: ray.get(ingest.status.remote())["received"] >= 1, what="messages received")
    time.sleep(0.3)
    assert len(system.events("vehicle-van-2", "VehicleTelemetryReported")) == before

    ray.kill(ingest, no_restart=False)  # dies holding unacknowledged messages
    wait_until(
        lambda: all(_has_time(system, at) for at in times),
        timeout_s=20,
        what="all five samples redelivered and recorded",
    )
    assert ray.get(ingest.status.remote())["pid"] != pid, "the ingest actor was restarted"


def _has_time(system: System, at: datetime) -> bool:
    for event in system.events("vehicle-van-2", "VehicleTelemetryReported"):
        if datetime.fromisoformat(json.loads(event.payload)["measured_at"]) == at:
            return True
    return False


def test_an_inverter_setpoint_is_written_confirmed_and_faults_then_recovers(
    system: System,
) -> None:
    fleet = system.fleet
    inverter = system.inverter
    assert inverter is not None
    system.wait_events("inverter-inv-1", "InverterMeasured")
    fleet.send(
        RequestInverterSetpoint(
            command_id="inv-sp-1", issued_at=datetime.now(UTC), inverter_id="inv-1", power_kw=-4.0
        ),
        check=True,
    )
    confirmed = system.wait_events("inverter-inv-1", "InverterSetpointConfirmed")
    assert json.loads(confirmed[-1].payload)["power_kw"] == -4.0
    assert inverter.setpoint_kw == -4.0

    system.sims.run(inverter.stop())
    faults = system.wait_events("inverter-inv-1", "InverterFaulted", count=2)
    assert json.loads(faults[-1].payload)["fault_kind"] in ("connection_lost", "timeout")
    measured = len(system.events("inverter-inv-1", "InverterMeasured"))
    system.sims.run(inverter.start())
    system.wait_events("inverter-inv-1", "InverterMeasured", count=measured + 1)


def test_a_restarted_relay_resumes_from_its_position_without_skipping_or_flooding(
    system: System,
) -> None:
    fleet = system.fleet
    relay = system.services.relay
    ray.get(relay.wait_relayed.remote(fleet.watermark()))
    before = ray.get(relay.status.remote())
    assert before["sent_to_chargers"] >= 2  # the earlier tests' setpoints went out

    ray.kill(relay, no_restart=False)
    wait_until(
        lambda: ray.get(relay.status.remote())["pid"] != before["pid"], what="a restarted relay"
    )
    # It read its position file: the last round that relayed something (rounds with
    # nothing to relay are not written at once), so it may read a few events again,
    # which relay nothing: below, only the new decision goes out.
    after = ray.get(relay.status.remote())
    assert 0 < after["position"] <= before["position"] and after["sent_to_chargers"] == 0

    # A new decision after the restart is relayed, and only that one. CS-A is not
    # connected now, so the gateway records the attempt as "station offline".
    now = datetime.now(UTC)
    results = fleet.send_many(
        [
            PlugIn(
                command_id="plug-van-1-again",
                issued_at=now,
                vehicle_id="van-1",
                charger_id="CS-A",
                charger_max_charge_kw=11,
                charger_max_discharge_kw=11,
            ),
            GrantControl(
                command_id="lease-van-1-again",
                issued_at=now,
                vehicle_id="van-1",
                controller_id="dispatcher-test",
                lease_until=now + timedelta(hours=2),
            ),
            RequestSetpoint(
                command_id="sp-van-1-again",
                issued_at=now,
                vehicle_id="van-1",
                controller_id="dispatcher-test",
                power_kw=3.0,
                valid_until=now + timedelta(minutes=15),
            ),
        ]
    )
    assert [r.status for r in results] == ["recorded"] * 3, results
    rejected = system.wait_events("charger-CS-A", "ChargerSetpointRejected")
    assert json.loads(rejected[-1].payload)["reason"] == "station offline"
    ray.get(relay.wait_relayed.remote(fleet.watermark()))
    assert ray.get(relay.status.remote())["sent_to_chargers"] == 1
