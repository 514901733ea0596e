"""One decision followed end to end in one trace, across the actor processes that make it.

A real OCPP 2.1 station (the ocpp library's charge-point side, over a WebSocket on
127.0.0.1) tells the gateway what its EV needs; the vehicle's host records the
trip, the site dispatcher re-plans and asks the vehicle to charge, the relay
carries the setpoint to the gateway, which sends SetChargingProfile to the same
station and records its answer. Every actor process exports its spans to a
JSON-lines file in the test's folder (`TelemetrySettings("file")`, configured by
Ray's worker setup hook), so the test can read the whole trace back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.dispatch import ConfigureDispatcher
from actors.tracing import traceparent_in
from actors.vehicle import PlugIn, RegisterVehicle, ReportTelemetry
from cluster.client import FleetClient
from cluster.device_config import DeviceConfig, OcppSettings, StationConfig, VehicleBinding
from cluster.dispatcher import start_dispatchers, stop_all
from cluster.gateways import DeviceServices
from cluster.runtime import Runtime, RuntimeConfig
from cluster.simulators.ocpp_station import SimulatedStation
from cluster.tracing import TelemetrySettings, load_spans
from events.base import RecordedEvent
from events.dispatch import TransformerLimit
from events.market import PublishPrice, RegisterMarket
from tests.cluster.test_gateways_e2e import LoopThread, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.network]

SITE = "site-t"
STATION = "CS-T"
VAN = "van-t"
TOKEN = "TOKEN-VAN-T"


@dataclass
class Traced:
    fleet: FleetClient
    services: DeviceServices
    dispatcher: Any
    station: SimulatedStation
    sims: LoopThread
    spans_dir: Path

    def events(self, stream_id: str, type_: str) -> list[RecordedEvent]:
        return [e for e in self.fleet.events(stream_id) if e.type == type_]

    def wait_event(self, stream_id: str, type_: str, count: int = 1) -> RecordedEvent:
        wait_until(
            lambda: len(self.events(stream_id, type_)) >= count,
            what=f"{count} {type_} on {stream_id}",
        )
        return self.events(stream_id, type_)[-1]

    def settled(self) -> None:
        """Every event so far has been relayed to the devices."""
        ray.get(self.services.relay.wait_relayed.remote(self.fleet.watermark()))


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    # This module starts its own Ray: the tracing settings travel in the job's
    # runtime_env, which only the process that starts Ray can set.
    assert not ray.is_initialized(), "another test module left Ray running"
    data_dir = tmp_path_factory.mktemp("trace")
    spans_dir = data_dir / "spans"
    config = RuntimeConfig(
        name="trace",
        data_dir=str(data_dir),
        shards={"vehicle": 1},
        num_cpus=2,
        telemetry=TelemetrySettings("file", file_dir=str(spans_dir)),
    )
    devices = DeviceConfig(
        # no heartbeats and no offline detection while the test runs: only the
        # messages the test sends start traces
        ocpp=OcppSettings(port=0, heartbeat_interval_s=3600, offline_grace_s=3600),
        stations=(
            StationConfig(
                station_id=STATION,
                password="pw-t",
                site_id=SITE,
                max_charge_kw=11,
                max_discharge_kw=11,
            ),
        ),
        vehicles=(VehicleBinding(vehicle_id=VAN, id_tokens=(TOKEN,)),),
    )
    runtime = Runtime(config).start()
    fleet = FleetClient(runtime, owns_ray=True)
    services = DeviceServices(config, devices).start()
    sims = LoopThread()
    url = devices.station_url(STATION, port=services.ocpp_ports()[0])
    station = SimulatedStation(STATION, "pw-t", url, version="2.1")
    dispatchers: dict[str, Any] = {}
    try:
        _setup_fleet(fleet)
        dispatchers = start_dispatchers(
            runtime,
            [
                ConfigureDispatcher(
                    command_id=f"cfg-{SITE}",
                    issued_at=datetime.now(UTC),
                    site_id=SITE,
                    transformers=(
                        TransformerLimit(transformer_id="t1", import_kw=100, export_kw=100),
                    ),
                    lease_s=600,
                )
            ],
            watched=(),
            loop_period_s=None,  # the test ticks it: each decision answers what came before
        )
        yield Traced(fleet, services, dispatchers[SITE], station, sims, spans_dir)
    finally:
        sims.run(station.disconnect())
        sims.close()
        if dispatchers:
            stop_all(dispatchers)
        services.stop()
        fleet.close()


def _setup_fleet(fleet: FleetClient) -> None:
    """Untraced: flat prices, a registered van at 40 % plugged into the station."""
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    commands: list[Any] = [
        RegisterMarket(command_id="m", issued_at=now, market_id="nl-day-ahead", kind="day_ahead")
    ]
    commands += [
        PublishPrice(
            command_id=f"p-{h}",
            issued_at=now,
            market_id="nl-day-ahead",
            interval_start=day + timedelta(hours=h),
            interval_minutes=60,
            price_eur_per_mwh=100.0,
            version=0,
        )
        for h in range(72)
    ]
    commands += [
        RegisterVehicle(
            command_id="reg", issued_at=now, vehicle_id=VAN, model="Volkswagen ID.4", site_id=SITE
        ),
        ReportTelemetry(
            command_id="tel",
            issued_at=now,
            vehicle_id=VAN,
            measured_at=now,
            soc=0.4,
            battery_temp_c=20.0,
            soh=0.95,
        ),
        PlugIn(
            command_id="plug",
            issued_at=now,
            vehicle_id=VAN,
            charger_id=STATION,
            charger_max_charge_kw=11,
            charger_max_discharge_kw=11,
        ),
    ]
    assert all(r.ok for r in fleet.send_many(commands))


def _id(span: dict[str, Any], key: str = "span_id") -> str:
    return str(span["context"][key])


def _one(spans: list[dict[str, Any]], name: str, **attributes: Any) -> dict[str, Any]:
    found = [
        s
        for s in spans
        if s["name"] == name and all(s["attributes"].get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{len(found)} spans {name} {attributes}: {[s['name'] for s in spans]}"
    return found[0]


def _pid(span: dict[str, Any]) -> int:
    return int(span["resource"]["attributes"]["process.pid"])


def test_a_station_message_is_one_trace_through_gateway_host_log_dispatcher_relay_and_back(
    traced: Traced,
) -> None:
    cs = traced.station

    async def connect() -> None:
        await cs.connect()
        await cs.boot(heartbeat=False)
        await cs.plug_in(evse_id=1, id_token=TOKEN)

    traced.sims.run(connect())
    traced.wait_event(f"charger-{STATION}", "ChargingTransactionStarted")
    # A first decision (plan, lease) answers the plug-in; without a trip the van idles.
    ray.get(traced.dispatcher.tick.remote())
    traced.settled()
    profiles_before = len(cs.profiles)

    # The EV tells the station it leaves in an hour and needs most of its battery.
    departure = datetime.now(UTC) + timedelta(hours=1)
    traced.sims.run(cs.notify_charging_needs(1, departure, energy_kwh=45.0))
    trip = traced.wait_event(f"vehicle-{VAN}", "VehicleTripPlanned")
    trace_id = traceparent_in(trip.metadata).split("-")[1]

    ray.get(traced.dispatcher.tick.remote())  # re-plans for the trip: charge now
    accepted = traced.wait_event(f"vehicle-{VAN}", "VehicleSetpointAccepted")
    assert json.loads(accepted.payload)["power_kw"] > 0
    sent = traced.wait_event(f"charger-{STATION}", "ChargerSetpointSent")
    assert len(cs.profiles) == profiles_before + 1
    told_kw = json.loads(sent.payload)["power_kw"]
    assert told_kw > 0 and cs.profiles[-1].power_kw == pytest.approx(told_kw, abs=0.001)
    # the log carries the same trace from the trip to the station's answer
    assert traceparent_in(accepted.metadata).split("-")[1] == trace_id
    assert traceparent_in(sent.metadata).split("-")[1] == trace_id

    def trace() -> list[dict[str, Any]]:
        return [s for s in load_spans(traced.spans_dir) if _id(s, "trace_id") == f"0x{trace_id}"]

    # the gateway's span ends after the station's answer is recorded: wait for it
    wait_until(
        lambda: any(s["name"] == "ocpp.SetChargingProfile" for s in trace()),
        what="the SetChargingProfile span",
    )
    spans = trace()
    gateway = _one(spans, "ocpp.NotifyEVChargingNeeds", station_id=STATION)
    plan_trip = _one(spans, "vehicle.decide", command="PlanTrip")
    needs = _one(spans, "charger.decide", command="RecordChargingNeeds")
    dispatcher = _one(spans, "dispatcher.decision", site_id=SITE)
    setpoint = _one(spans, "vehicle.decide", command="RequestSetpoint")
    relay = _one(spans, "relay.setpoint", station_id=STATION)
    device = _one(spans, "ocpp.SetChargingProfile", station_id=STATION)
    answer = _one(spans, "charger.decide", command="RecordSetpointSent")

    assert gateway["parent_id"] is None  # the station's message starts the trace
    assert plan_trip["parent_id"] == needs["parent_id"] == _id(gateway)
    assert dispatcher["parent_id"] in (_id(plan_trip), _id(needs))  # the newest traced event
    assert setpoint["parent_id"] == _id(dispatcher)
    assert relay["parent_id"] == _id(setpoint)
    assert device["parent_id"] == _id(relay)
    assert answer["parent_id"] == _id(device)
    # each host's log append follows the decision whose events it wrote (and links it)
    appends = {s["parent_id"]: s for s in spans if s["name"] == "log.append"}
    for decided in (plan_trip, needs, setpoint, answer):
        append = appends[_id(decided)]
        assert _id(decided) in {_id(link) for link in append["links"]}
        assert _pid(append) == _pid(decided)  # in the host, around its call to the log

    # and the trace crosses the processes: gateway, hosts, dispatcher, relay
    assert _pid(gateway) == _pid(device)
    assert _pid(plan_trip) == _pid(setpoint)  # the one vehicle shard
    processes = {_pid(s) for s in (gateway, plan_trip, needs, dispatcher, relay)}
    assert len(processes) == 5


def test_telemetry_settings_travel_to_every_worker_in_the_jobs_runtime_env(tmp_path: Path) -> None:
    from cluster.config import load_config
    from cluster.tracing import ENV_VAR

    env = TelemetrySettings("file", file_dir="spans").runtime_env()
    assert env["worker_process_setup_hook"] == "cluster.tracing.configure_worker"
    carried = json.loads(env["env_vars"][ENV_VAR])
    assert carried["exporter"] == "file"
    assert carried["file_dir"] == str(Path("spans").absolute())  # workers have their own cwd
    assert TelemetrySettings().runtime_env() == {}  # "none": Ray starts as before
    with pytest.raises(ValueError, match="use 'file'"):
        TelemetrySettings("memory").runtime_env()
    with pytest.raises(ValueError, match="file_dir"):
        TelemetrySettings("file")

    config = load_config(None, env={"V2G__TELEMETRY__EXPORTER": "file"})
    telemetry = config.runtime(data_dir=str(tmp_path)).telemetry
    assert (telemetry.exporter, telemetry.file_dir) == ("file", str(tmp_path / "traces"))
