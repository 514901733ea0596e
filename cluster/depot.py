"""The depot week: simulated time for the fleet, live devices on loopback for every hour.

What is simulated and what is real:

- **Simulated** (in the driver, no sleeping): the vans' sessions and batteries
  (`cluster.fleet_sim`: ElaadNL arrivals, stays and energy; preset car models), the
  vehicle meter (`RecordEnergy` per 15-minute step, integrating every setpoint the
  vehicle decider accepted, frequency responses included), the grid (frequency and
  the site's building load) and the clock: one simulated week of the real
  Netherlands 2024 day-ahead prices from `actors/data`, published as a feed would
  (each day at 12:00 UTC the day before).
- **Real**: the runtime on a local Ray (log actor, entity hosts), the site dispatcher
  (a Ray actor running `SitePolicy`, ticked with the simulated clock) and the
  coordinator above it, the setpoint relay, the OCPP CSMS gateway actor with one
  OCPP 2.1 station simulator per charger (two EVSEs each) on loopback WebSockets,
  the Modbus gateway actor with pymodbus inverter simulators, and a mosquitto broker
  with the MQTT ingest actor. Dispatcher setpoints reach the stations as
  `SetChargingProfile` and the inverters as register writes through the relay;
  station transactions and meter values and MQTT telemetry land in the log as events.

The coupling: the fleet runs in 15-minute simulated steps. Stations start and end a
transaction (OCPP `TransactionEvent`) in the step a van arrives or leaves. At every
full simulated hour the device layer is live before the dispatcher ticks: the vans'
telemetry is published over MQTT (stamped with the simulated time) and the step
waits until the ingest actor recorded it; after the tick the step waits until the
relay has sent every setpoint to the stations, which then report meter values for
the hour; the inverters get their hourly setpoint. The device layer itself lives on
the wall clock (station and inverter timestamps are wall-clock times); the relay maps
a setpoint's remaining simulated validity onto the wall clock (`SimulatedTimeRelay`).

Revenue and violations are computed from the log afterwards
(`cluster.backtest.audit`, the projections), not from what the driver believes.

The vans are not new: each registers with its battery's history (`battery_history`),
so the degradation projection prices the week as the marginal wear of a used pack.
Ages are spread evenly from 1 to 4 years over the vans (van 1 the youngest); the
throughput is what driving alone put through the battery: `ANNUAL_KM` a year at
`DRIVING_KWH_PER_KM`, counted twice (out while driving, back in when recharged), as
the ageing model counts charge and discharge. Both figures are assumptions, stated
below; the car data shipped does not give a consumption.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiomqtt
import ray

from actors.dispatch import ConfigureDispatcher
from actors.inverter import RequestInverterSetpoint
from actors.market import RegisterMarket
from actors.vehicle import RegisterVehicle, Unplug
from cluster.backtest import MARKET_ID, _prices, sim_arrival, sim_energy, sim_telemetry
from cluster.client import FleetClient
from cluster.device_config import (
    BrokerConfig,
    DeviceConfig,
    InverterConfig,
    OcppSettings,
    StationConfig,
    VehicleBinding,
)
from cluster.dispatcher import start_coordinator, start_dispatchers, stop_all
from cluster.fleet_sim import STEP, Session, SimVehicle, simulate_fleet
from cluster.gateways import (
    LOGGER,
    DeviceServices,
    RelayFold,
    SetpointRelay,
    relay_actor,
)
from cluster.mosquitto import Mosquitto
from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig
from cluster.simulators.modbus_inverter import InverterSimulator
from cluster.simulators.ocpp_station import SimulatedStation
from cluster.simulators.telemetry_publisher import SimulatedVehicle
from events.base import Command
from events.dispatch import TransformerLimit

__all__ = [
    "DepotRun",
    "DepotSpec",
    "GridEvent",
    "SimulatedTimeRelay",
    "battery_history",
    "grid_events",
    "run_depot",
]

T = TypeVar("T")
SITE = "depot-a"
EVSE_KW = 11.0  # each EVSE of the depot's dual-outlet AC bidirectional chargers
BASE_LOAD_KW = 40.0  # the depot building (workshop, offices, lighting)
DEMAND_CHARGE_EUR_PER_KW_MONTH = 4.0  # assumption: a Dutch grid operator's kW-max tariff
REGULATION_PRICE_EUR_PER_MW_H = 12.0  # assumption: an FCR-like availability price
INVERTER_KW = 50.0
# Assumptions for the vans' battery history (see the module docstring): a delivery
# van's yearly distance, and battery-side energy per km of these mid-size EVs in mixed
# use (wheel consumption plus drivetrain losses).
ANNUAL_KM = 20_000.0
DRIVING_KWH_PER_KM = 0.18
HISTORY_YEARS = (1.0, 4.0)


@dataclass(frozen=True)
class DepotSpec:
    vehicles: int = 50
    chargers: int = 25
    inverters: int = 2
    days: int = 7
    start: datetime = datetime(2024, 11, 4, tzinfo=UTC)  # Monday; the Dunkelflaute week
    seed: int = 2024
    name: str = "demo"

    @property
    def evses_per_charger(self) -> int:
        return max(1, math.ceil(self.vehicles / self.chargers))


def battery_history(index: int, vehicles: int) -> tuple[float, float]:
    """(age in days, battery throughput in kWh) of van ``index`` of ``vehicles`` at registration.

    Deterministic: ages evenly from ``HISTORY_YEARS[0]`` to ``[1]``; throughput from
    driving ``ANNUAL_KM`` a year (see the module docstring).
    """
    low, high = HISTORY_YEARS
    years = low + (high - low) * index / max(vehicles - 1, 1)
    age_days = round(years * 365.25, 1)
    throughput_kwh = round(2.0 * ANNUAL_KM * DRIVING_KWH_PER_KM * age_days / 365.25, 1)
    return age_days, throughput_kwh


@dataclass(frozen=True)
class GridEvent:
    """A grid condition at a simulated time: a frequency, or the site's building load."""

    at: datetime
    what: str
    frequency_hz: float = 50.0
    site_load_kw: float | None = None


def grid_events(spec: DepotSpec, peak_threshold_kw: float) -> list[GridEvent]:
    """The week's grid story (on day 0 for a one-day run, spread over the week otherwise)."""

    def day(d: int, hour: int, minute: int = 0) -> datetime:
        return spec.start + timedelta(days=min(d, spec.days - 1), hours=hour, minutes=minute)

    peak_kw = round(peak_threshold_kw + 0.25 * EVSE_KW * spec.vehicles, 1)
    return sorted(
        [
            GridEvent(day(3, 2, 5), "over-frequency excursion to 50.25 Hz", 50.25),
            GridEvent(day(3, 2, 10), "frequency back to 50.00 Hz", 50.0),
            GridEvent(day(2, 17), f"site peak: building load {peak_kw:g} kW", 50.0, peak_kw),
            GridEvent(day(2, 18), f"site load back to {BASE_LOAD_KW:g} kW", 50.0, BASE_LOAD_KW),
            GridEvent(day(1, 18, 5), "under-frequency dip to 49.85 Hz", 49.85),
            GridEvent(day(1, 18, 10), "frequency back to 50.00 Hz", 50.0),
            GridEvent(day(5, 7, 35), "under-frequency dip to 49.92 Hz", 49.92),
            GridEvent(day(5, 7, 40), "frequency back to 50.00 Hz", 50.0),
        ],
        key=lambda e: e.at,
    )


# ------------------------------------------------------------------ the relay in sim time


class SimulatedTimeRelay(SetpointRelay):
    """The setpoint relay, released by the driver once per simulated hour.

    `release(sim_now, position)` relays every event up to `position`: coalesced as the
    relay always does (the last call per device), so the stations get the setpoints in
    force at that simulated time and the ones that expired in simulated time are not
    sent. Each is sent valid for its remaining simulated validity from now on the wall
    clock, the stations' clock.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sim_now: datetime | None = None
        self._target = 0
        self._go = asyncio.Event()
        super().__init__(*args, **kwargs)

    async def release(self, sim_now: datetime, position: int) -> None:
        self._sim_now = sim_now
        self._target = max(self._target, position)
        self._go.set()

    async def _run(self) -> None:
        runtime = await asyncio.to_thread(Runtime(self._runtime_config).start)
        log = runtime.log
        while not self._stopping.is_set():
            await self._go.wait()
            self._go.clear()
            try:
                while self.fold.state.position < self._target:
                    position = self.fold.state.position
                    await self._relay_through(log, min(self._target, position + self._chunk))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                LOGGER.exception("setpoint relay: a batch failed; retrying")
                self.fold = RelayFold(self._devices, self._load())
                self._go.set()
                await asyncio.sleep(0.5)

    async def _perform(self, chargers: dict[Any, Any], inverters: dict[str, Any]) -> None:
        if self._sim_now is not None:
            shift = datetime.now(UTC) - self._sim_now
            chargers = {
                k: dataclasses.replace(c, valid_until=c.valid_until + shift)
                for k, c in chargers.items()
            }
        await super()._perform(chargers, inverters)


# ------------------------------------------------------------------ helpers


class LoopThread:
    """An event loop in a thread: the device simulators live here, the driver drives Ray."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _end_transaction(station: SimulatedStation, evse_id: int) -> None:
    """The van leaves: TransactionEvent Ended, connector Available (wall-clock stamps)."""
    transaction_id = station.transactions.pop(evse_id, None)
    if transaction_id is None:
        return
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    station._seq_no += 1
    cp = station.cp
    await cp.call(
        cp._call.TransactionEvent(
            event_type="Ended",
            timestamp=now,
            trigger_reason="EVDeparted",
            seq_no=station._seq_no,
            transaction_info={"transaction_id": transaction_id, "stopped_reason": "EVDisconnected"},
            evse={"id": evse_id, "connector_id": 1},
            meter_value=[station._meter_value(evse_id, context="Transaction.End")],
        )
    )
    await cp.call(
        cp._call.StatusNotification(
            timestamp=now, connector_status="Available", evse_id=evse_id, connector_id=1
        )
    )


def _integrate(
    v: SimVehicle, segments: list[tuple[datetime, datetime, float]], start: datetime, end: datetime
) -> tuple[float, float]:
    """Run the vehicle through its setpoints (since, until, kW) over [start, end)."""
    charged = discharged = 0.0
    ordered = sorted(segments)
    for i, (since, until, kw) in enumerate(ordered):
        stop = min(until, end, ordered[i + 1][0] if i + 1 < len(ordered) else end)
        hours = (stop - max(since, start)).total_seconds() / 3600
        if hours > 0:
            c, d = v.apply(kw, hours)
            charged += c
            discharged += d
    return charged, discharged


@dataclass
class DepotRun:
    """What the driver saw (for progress and the summary; the audit reads the log)."""

    spec: DepotSpec
    data_dir: str
    steps: int = 0
    mqtt_published: int = 0
    station_transactions: int = 0
    station_meter_values: int = 0
    inverter_setpoints: int = 0
    grid_events: list[str] = field(default_factory=list)
    relay: dict[str, Any] = field(default_factory=dict)
    ingest: dict[str, Any] = field(default_factory=dict)
    ocpp: dict[str, Any] = field(default_factory=dict)
    peak_threshold_kw: float = 0.0
    wall_s: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ the run


class _Depot:
    def __init__(self, spec: DepotSpec, data_dir: str) -> None:
        self.spec = spec
        self.data_dir = os.path.abspath(data_dir)
        self.run = DepotRun(spec, self.data_dir)
        self.fleet = simulate_fleet(spec.start, spec.days, spec.vehicles, 1, spec.seed)
        self.bay: dict[str, tuple[str, int]] = {}  # vehicle -> (station, evse)
        per = spec.evses_per_charger
        for i, v in enumerate(self.fleet):
            v.vehicle_id = f"van-{i + 1:02d}"
            v.site_id = SITE
            v.charger_id = f"CP-{i // per + 1:02d}"
            v.charge_kw = min(v.charge_kw, EVSE_KW)
            v.discharge_kw = min(v.discharge_kw, EVSE_KW)
            self.bay[v.vehicle_id] = (v.charger_id, i % per + 1)
        self.stations_ids = sorted({c for c, _ in self.bay.values()})
        self.passwords = {s: secrets.token_urlsafe(16) for s in self.stations_ids}
        self.telemetry = {
            v.vehicle_id: SimulatedVehicle(v.vehicle_id, v.capacity_kwh, v.soc) for v in self.fleet
        }
        self.sessions_started: dict[str, int] = {}
        self.segments: dict[str, list[tuple[datetime, datetime, float]]] = {}
        self.inverter_kw: dict[str, float] = {}

    # --- configuration --------------------------------------------------------------

    def transformers(self) -> tuple[TransformerLimit, ...]:
        out = []
        for k, ids in enumerate((self.stations_ids[0::2], self.stations_ids[1::2])):
            vans = [v for v in self.fleet if v.charger_id in ids]
            if not vans:
                continue
            out.append(
                TransformerLimit(
                    transformer_id=f"{SITE}-t{k}",
                    # 60 % of the connected power: the limit binds on cheap nights
                    import_kw=round(0.6 * sum(v.charge_kw for v in vans), 3),
                    export_kw=round(0.6 * sum(v.discharge_kw for v in vans), 3),
                    charger_ids=tuple(ids),
                )
            )
        return tuple(out)

    def site_config(self) -> ConfigureDispatcher:
        transformers = self.transformers()
        # above what the transformers let the vans draw: only the site peak event binds
        threshold = round(sum(t.import_kw for t in transformers) + BASE_LOAD_KW + 10.0, 1)
        self.run.peak_threshold_kw = threshold
        return ConfigureDispatcher(
            command_id=f"cfg-{SITE}",
            issued_at=self.spec.start,
            site_id=SITE,
            transformers=transformers,
            peak_threshold_kw=threshold,
            demand_charge_eur_per_kw_month=DEMAND_CHARGE_EUR_PER_KW_MONTH,
            charger_timeout_s=3 * 3600.0,  # chargers speak on the wall clock (module doc)
            lease_s=2 * STEP.total_seconds(),
            regulation_share=0.1,
            peak_shaving_share=0.1,
            regulation_price_eur_per_mw_per_h=REGULATION_PRICE_EUR_PER_MW_H,
        )

    def devices(self, broker_port: int, inverter_ports: Sequence[int]) -> DeviceConfig:
        per = self.spec.evses_per_charger
        return DeviceConfig(
            ocpp=OcppSettings(
                port=0, heartbeat_interval_s=30, offline_grace_s=60.0, setpoint_timeout_s=5.0
            ),
            stations=tuple(
                StationConfig(
                    station_id=s,
                    password=self.passwords[s],
                    site_id=SITE,
                    max_charge_kw=per * EVSE_KW,
                    max_discharge_kw=per * EVSE_KW,
                    ocpp_version="2.1",
                )
                for s in self.stations_ids
            ),
            inverters=tuple(
                InverterConfig(
                    inverter_id=f"inv-{k + 1}",
                    site_id=SITE,
                    host="127.0.0.1",
                    port=port,
                    rated_power_kw=INVERTER_KW,
                    poll_interval_s=1.0,
                    timeout_s=1.0,
                    backoff_max_s=2.0,
                )
                for k, port in enumerate(inverter_ports)
            ),
            broker=BrokerConfig(port=broker_port, session_expiry_s=600),
            vehicles=tuple(
                VehicleBinding(vehicle_id=v.vehicle_id, id_tokens=(self.token(v.vehicle_id),))
                for v in self.fleet
            ),
        )

    @staticmethod
    def token(vehicle_id: str) -> str:
        return f"TOKEN-{vehicle_id.upper()}"

    # --- the simulated fleet ----------------------------------------------------------

    def advance(
        self, v: SimVehicle, now: datetime, arrivals: bool = True
    ) -> tuple[list[Command], list[tuple[str, Any]]]:
        """The simulator's commands at `now`, and the station actions they need."""
        out: list[Command] = []
        actions: list[tuple[str, Any]] = []
        vid = v.vehicle_id
        if v.plugged is not None:
            step_start = now - STEP
            charged, discharged = _integrate(v, self.segments.pop(vid, []), step_start, now)
            out.append(sim_energy(vid, step_start, now, charged, discharged))
            if now.minute != 0 or v.plugged.departure <= now:
                # at full hours the telemetry comes over MQTT, except the departing van's:
                # its reading must precede the unplug it travels with
                out.append(sim_telemetry(v, now, "tel"))
            if v.plugged.departure <= now:
                out.append(
                    Unplug(
                        command_id=f"sim:unplug:{vid}:{now:%Y%m%dT%H%M}",
                        issued_at=now,
                        vehicle_id=vid,
                    )
                )
                actions.append(("end", self.bay[vid]))
                v.plugged = None
                if v.sessions and v.sessions[0].arrival > now:
                    v.energy_kwh = max(
                        0.1 * v.capacity_kwh, v.energy_kwh - v.sessions[0].energy_kwh
                    )
        if arrivals and v.plugged is None and v.sessions and v.sessions[0].arrival <= now:
            session: Session = v.sessions.pop(0)
            v.plugged = session
            n = self.sessions_started[vid] = self.sessions_started.get(vid, 0) + 1
            station, evse = self.bay[vid]
            actions.append(("start", (station, evse, self.token(vid), f"{vid}-s{n}")))
            out += sim_arrival(v, session, now)
        return out, actions


def run_depot(
    spec: DepotSpec,
    data_dir: str,
    progress: Callable[[DepotRun, datetime], None] | None = None,
) -> DepotRun:
    """Run the depot week (see the module doc); the log ends up in `<data_dir>/log`."""
    depot = _Depot(spec, data_dir)
    run = depot.run
    t0 = time.monotonic()
    sims = LoopThread()
    broker = Mosquitto(workdir=os.path.join(depot.data_dir, "mosquitto"))
    inverters = [InverterSimulator(rated_power_kw=INVERTER_KW) for _ in range(spec.inverters)]
    stations: dict[str, SimulatedStation] = {}
    services: DeviceServices | None = None
    relay: Any = None
    dispatchers: dict[str, Any] = {}
    coordinator: Any = None
    fleet: FleetClient | None = None
    mqtt: aiomqtt.Client | None = None
    try:
        broker.start()
        for inverter in inverters:
            sims.run(inverter.start())
        devices = depot.devices(broker.port, [i.port for i in inverters])
        owns_ray = not ray.is_initialized()
        config = RuntimeConfig(name=spec.name, data_dir=depot.data_dir, num_cpus=2)
        runtime = Runtime(config).start()
        fleet = FleetClient(runtime, owns_ray=owns_ray)
        relay = (
            ray.remote(SimulatedTimeRelay)
            .options(
                name=relay_actor(config),
                namespace=NAMESPACE,
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=-1,
                num_cpus=0,
            )
            .remote(config, devices)
        )
        services = DeviceServices(config, devices, relay=False).start()
        ray.get(relay.status.remote(), timeout=60)
        url = devices.station_url(depot.stations_ids[0], port=services.ocpp_ports()[0])
        ingest = services.ingest[0]
        ray.get(ingest.subscribed.remote(), timeout=30)

        async def connect_all() -> aiomqtt.Client:
            for sid in depot.stations_ids:
                stations[sid] = SimulatedStation(sid, depot.passwords[sid], url, version="2.1")
            await asyncio.gather(*(s.connect() for s in stations.values()))
            await asyncio.gather(*(s.boot(heartbeat=True) for s in stations.values()))
            client = aiomqtt.Client("127.0.0.1", broker.port, identifier="depot-vans")
            await client.__aenter__()
            return client

        mqtt = sims.run(connect_all())
        start = spec.start
        histories = [battery_history(i, spec.vehicles) for i in range(len(depot.fleet))]
        setup: list[Command] = [
            RegisterMarket(
                command_id=f"{MARKET_ID}:register",
                issued_at=start,
                market_id=MARKET_ID,
                kind="day_ahead",
            ),
            *_prices(start, start + timedelta(days=1), start),
            *(
                RegisterVehicle(
                    command_id=f"register:{v.vehicle_id}",
                    issued_at=start,
                    vehicle_id=v.vehicle_id,
                    model=v.model,
                    site_id=SITE,
                    battery_age_days=age_days,
                    battery_throughput_kwh=throughput_kwh,
                )
                for v, (age_days, throughput_kwh) in zip(depot.fleet, histories, strict=True)
            ),
        ]
        _check(fleet.send_many(setup))
        dispatchers = start_dispatchers(
            runtime, [depot.site_config()], watched=(), loop_period_s=None
        )
        coordinator = start_coordinator(dispatchers, period_s=1.0)
        site = dispatchers[SITE]
        ray.get(site.grid_signal.remote(50.0, BASE_LOAD_KW, start))
        events = grid_events(spec, run.peak_threshold_kw)
        run.wall_s["start_up"] = time.monotonic() - t0

        def read_setpoints() -> None:
            states = fleet.states("vehicle")
            for v in depot.fleet:
                state = states.get(f"vehicle-{v.vehicle_id}")
                if v.plugged is not None and state is not None and state.setpoint is not None:
                    sp = state.setpoint
                    segs = depot.segments.setdefault(v.vehicle_id, [])
                    seg = (sp.since, sp.valid_until, sp.power_kw)
                    if seg not in segs:
                        segs.append(seg)

        device_work: list[concurrent.futures.Future[Any]] = []
        locks: dict[str, asyncio.Lock] = {}

        def drain() -> None:
            """Wait for the device work in flight (station messages, meter values)."""
            while device_work:
                device_work.pop(0).result(timeout=60)

        def station_actions(actions: list[tuple[str, Any]]) -> None:
            """Transactions start and end on the stations, in order per station (not awaited)."""

            async def one(sid: str, items: list[tuple[str, Any]]) -> None:
                async with locks.setdefault(sid, asyncio.Lock()):
                    st = stations[sid]
                    for kind, arg in items:
                        if kind == "end":
                            await _end_transaction(st, arg[1])
                        else:
                            _, evse, token, tx = arg
                            await st.plug_in(evse_id=evse, id_token=token, transaction_id=tx)
                            run.station_transactions += 1

            per_station: dict[str, list[tuple[str, Any]]] = {}
            for kind, arg in actions:
                per_station.setdefault(arg[0], []).append((kind, arg))
            for sid, items in per_station.items():
                device_work.append(asyncio.run_coroutine_threadsafe(one(sid, items), sims.loop))

        def publish_telemetry(now: datetime) -> int:
            """Publish the plugged vans' telemetry over MQTT; the ingest count to wait for."""
            plugged = [v for v in depot.fleet if v.plugged is not None]
            before = _handled(ray.get(ingest.status.remote()))
            messages = []
            for v in plugged:
                sim = depot.telemetry[v.vehicle_id]
                last = depot.segments.get(v.vehicle_id)
                sim.advance(last[-1][2] if last else 0.0, 3600.0)  # battery temperature
                sim.soc = v.soc
                topic = f"v2g/{SITE}/vehicles/{v.vehicle_id}/telemetry"
                messages.append((topic, sim.payload(now)))

            async def publish() -> None:
                assert mqtt is not None
                for topic, payload in messages:  # QoS 1, one in flight: no client-side queue
                    await mqtt.publish(topic, payload, qos=1)

            if messages:
                device_work.append(asyncio.run_coroutine_threadsafe(publish(), sims.loop))
            run.mqtt_published += len(messages)
            return before + len(messages)

        def wait_landed(wanted: int) -> None:
            deadline = time.monotonic() + 30
            while _handled(ray.get(ingest.status.remote())) < wanted:
                if time.monotonic() > deadline:
                    raise RuntimeError("MQTT telemetry did not land within 30 s")
                time.sleep(0.002)

        def release_relay(now: datetime) -> int:
            drain()  # the stations' transactions are in the log: the relay routes by them
            position = fleet.watermark()
            ray.get(relay.release.remote(now, position))
            return position

        def devices_hour(now: datetime) -> None:
            position = release_relay(now)

            async def meter() -> None:
                await relay.wait_relayed.remote(position, 30.0)

                async def one(st: SimulatedStation) -> int:
                    async with locks.setdefault(st.station_id, asyncio.Lock()):
                        for evse in sorted(st.transactions):
                            await st.send_meter_values(evse, elapsed_s=3600.0)
                        return len(st.transactions)

                counts = await asyncio.gather(*(one(s) for s in stations.values()))
                run.station_meter_values += sum(counts)

            device_work.append(asyncio.run_coroutine_threadsafe(meter(), sims.loop))
            # the depot's stationary battery: discharge at the site peak and dear hours
            price = _price_at(now)
            peak = any(e.site_load_kw and e.at <= now < e.at + timedelta(hours=1) for e in events)
            commands = []
            for k in range(spec.inverters):
                inv = f"inv-{k + 1}"
                kw = -INVERTER_KW if peak else _battery_kw(price)
                if depot.inverter_kw.get(inv) != kw:
                    depot.inverter_kw[inv] = kw
                    commands.append(
                        RequestInverterSetpoint(
                            command_id=f"depot:inverter:{inv}:{now:%Y%m%dT%H%M}",
                            issued_at=now,
                            inverter_id=inv,
                            power_kw=kw,
                        )
                    )
            if commands:
                _check(fleet.send_many(commands))
                run.inverter_setpoints += len(commands)

        end = start + timedelta(days=spec.days)
        now = start
        pending = list(events)
        timers = run.wall_s

        @contextlib.contextmanager
        def timed(what: str) -> Any:
            began = time.monotonic()
            yield
            timers[what] = timers.get(what, 0.0) + time.monotonic() - began

        while now < end:
            commands: list[Command] = []
            actions: list[tuple[str, Any]] = []
            for v in depot.fleet:
                c, a = depot.advance(v, now)
                commands += c
                actions += a
            if now.hour == 12 and now.minute == 0:  # the day-ahead auction's results
                day = now.replace(hour=0) + timedelta(days=1)
                commands += _prices(day, day + timedelta(days=1), now)
            hourly = now.minute == 0
            station_actions(actions)
            wanted = publish_telemetry(now) if hourly else 0
            with timed("fleet commands"):
                _check(fleet.send_many(commands))
            if hourly:
                with timed("mqtt telemetry"):
                    wait_landed(wanted)
            while pending and pending[0].at <= now:
                event = pending.pop(0)
                ray.get(site.grid_signal.remote(event.frequency_hz, event.site_load_kw, event.at))
                run.grid_events.append(f"{event.at:%a %d %b %H:%M} {event.what}")
            with timed("dispatcher tick"):
                ray.get(site.tick.remote(now))
            with timed("read setpoints"):
                read_setpoints()
            while pending and pending[0].at < now + STEP and pending[0].site_load_kw is None:
                event = pending.pop(0)  # a frequency event between two ticks
                ray.get(site.grid_signal.remote(event.frequency_hz, None, event.at))
                run.grid_events.append(f"{event.at:%a %d %b %H:%M} {event.what}")
                read_setpoints()
            if hourly:
                with timed("devices hourly"):
                    devices_hour(now)
            run.steps += 1
            if progress is not None:
                progress(run, now)
            now += STEP
        commands = []
        actions = []
        for v in depot.fleet:
            c, a = depot.advance(v, now, arrivals=False)
            commands += c
            actions += a
        station_actions(actions)
        _check(fleet.send_many(commands))
        position = release_relay(now)
        ray.get(relay.wait_relayed.remote(position, 30.0))
        drain()
        run.relay = ray.get(relay.status.remote())
        run.ingest = ray.get(ingest.status.remote())
        run.ocpp = ray.get(services.ocpp[0].status.remote())
        run.wall_s["week"] = time.monotonic() - t0 - run.wall_s["start_up"]
        return run
    finally:
        if coordinator is not None or dispatchers:
            with contextlib.suppress(Exception):
                stop_all(dispatchers, coordinator)

        async def close_devices() -> None:
            if mqtt is not None:
                with contextlib.suppress(Exception):
                    await mqtt.__aexit__(None, None, None)
            await asyncio.gather(
                *(s.disconnect() for s in stations.values()), return_exceptions=True
            )
            for inverter in inverters:
                with contextlib.suppress(Exception):
                    await inverter.stop()

        with contextlib.suppress(Exception):
            sims.run(close_devices(), timeout_s=15)
        if services is not None:
            services.stop()
        if relay is not None:
            with contextlib.suppress(Exception):
                ray.get(relay.stop.remote(), timeout=10)
            with contextlib.suppress(Exception):
                ray.kill(relay, no_restart=True)
        if fleet is not None:
            fleet.close()
        sims.close()
        broker.close()


def _handled(status: dict[str, Any]) -> int:
    return int(status["accepted"]) + int(status["duplicates"]) + sum(status["rejected"].values())


def _battery_kw(price: float | None) -> float:
    if price is None:
        return 0.0
    if price >= 120.0:
        return -INVERTER_KW / 2
    if price <= 60.0:
        return INVERTER_KW / 2
    return 0.0


_PRICE_CACHE: dict[datetime, float] = {}


def _price_at(at: datetime) -> float | None:
    hour = at.replace(minute=0, second=0, microsecond=0)
    if not _PRICE_CACHE:
        from actors.gateways.price_files import FilePriceFeed

        table = FilePriceFeed(MARKET_ID).prices(
            datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
        )
        for when, price in zip(
            table.column("interval_start").to_pylist(),
            table.column("price_eur_per_mwh").to_pylist(),
            strict=True,
        ):
            _PRICE_CACHE[when.astimezone(UTC)] = float(price)
    return _PRICE_CACHE.get(hour)


def _check(results: Sequence[Any]) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"simulator command rejected: {bad[0].command_id}: {bad[0].reason}")
