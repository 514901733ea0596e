"""The device gateways as Ray actors, and the relay that turns setpoint events into device calls.

What runs where (all async actors in namespace `v2gfleet`, named after the runtime,
restartable, `num_cpus=0`):

- `v2g-<name>-ocpp-<i>`: an `OcppCsmsGateway` listening on `ocpp.port + i`, serving
  the stations the config assigns to gateway `i` (many stations per actor; the
  sockets live in the actor). Its `trip_planner` maps an id token to a vehicle and
  returns that vehicle's `PlanTrip`; its `on_offline` hook puts the vehicles plugged
  into a silent station in their safe state (`EnforceSafeState`, see `_on_offline`).
- `v2g-<name>-modbus-<site>`: one `ModbusInverterGateway` per inverter of a site,
  polling and writing setpoints.
- `v2g-<name>-mqtt-<i>`: telemetry ingest; all of them share one MQTT v5 shared
  subscription (`$share/<group>/v2g/+/vehicles/+/telemetry`), so they split the
  stream. Messages are acknowledged only after the log recorded their commands.
- `v2g-<name>-setpoint-relay`: follows the log and, for every change of what a
  vehicle or an inverter should do, calls the gateway that owns the device.

Each gateway registers its devices (`RegisterCharger` / `RegisterInverter`, ids
derived from the settings, so a restart registers nothing twice) and submits
through a `BatchingSink` over the runtime's `RuntimeSink`: while one batch is on its
way to the host shards the next one gathers, so thousands of stations cost a few
Ray calls per round trip, not one each.

A restarted actor (Ray restarts them) runs its constructor again, which starts its
sockets again; the relay resumes from the position it persisted.

Example::

    from cluster.device_config import DeviceConfig
    from cluster.gateways import DeviceServices
    from cluster.runtime import RuntimeConfig

    services = DeviceServices(RuntimeConfig(data_dir="var"), DeviceConfig.load("devices.json"))
    services.start()          # idempotent: finds the actors if they exist
    ...
    services.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import ray

from actors.charger import RegisterCharger
from actors.decider import CommandResult
from actors.gateways.modbus_inverter import ModbusInverterGateway
from actors.gateways.mqtt_telemetry import BrokerSettings, MqttTelemetryGateway
from actors.gateways.ocpp_csms import (
    ChargingNeedsReport,
    OcppCsmsGateway,
    SetpointOutcome,
    StationCredentials,
)
from actors.gateways.register_map import InverterRegisterMap, WriteRefused
from actors.gateways.sink import CommandSink
from actors.inverter import RegisterInverter
from actors.tracing import continued, handed_on, traceparent_in
from actors.vehicle import EnforceSafeState, PlanTrip, ReportTelemetry
from cluster.device_config import DeviceConfig, fingerprint
from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig, RuntimeSink, tune_gc
from events.base import Command

LOGGER = logging.getLogger(__name__)

_REGISTER_CHUNK = 1000


def ocpp_actor(config: RuntimeConfig, index: int) -> str:
    return f"v2g-{config.name}-ocpp-{index}"


def modbus_actor(config: RuntimeConfig, site_id: str) -> str:
    return f"v2g-{config.name}-modbus-{site_id}"


def ingest_actor(config: RuntimeConfig, index: int) -> str:
    return f"v2g-{config.name}-mqtt-{index}"


def ingest_client_id(config: RuntimeConfig, index: int) -> str:
    """The MQTT client id of ingest actor `index`: stable, so its session survives restarts."""
    return f"v2g-{config.name}-ingest-{index}"


def relay_actor(config: RuntimeConfig) -> str:
    return f"v2g-{config.name}-setpoint-relay"


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO)
    # ocpp logs every frame at INFO ("receive message ..."): at thousands of stations
    # that is most of a gateway's log volume and a visible share of its CPU.
    for name in ("ocpp", "websockets"):
        logging.getLogger(name).setLevel(logging.WARNING)


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft open-files limit towards `wanted` (capped by the hard one).

    A gateway holds one socket per station; the usual soft limit of 1,024 would
    refuse stations long before memory or CPU run out.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# --- batching ----------------------------------------------------------------------


class BatchingSink:
    """A `CommandSink` that gathers concurrent submits into one call of the inner sink.

    Group commit for commands: the first submit goes out at once; submits arriving
    while it is on its way wait and leave together with the next call (at most
    `max_batch` commands per call). At low load a command waits for nothing; at high
    load the number of Ray calls stays bounded by the round trip, not the stations.

    `linger_s` > 0 also holds a batch until its oldest command has waited that long
    (or the batch is full): every call to a host shard and every log commit has a
    fixed cost (~0.75 ms of CPU for a commit, more through Ray), so a gateway that
    hears a steady stream of small messages spends less on each when they leave in
    fewer, larger calls. A command waits at most `linger_s` plus the call in flight.
    """

    def __init__(self, inner: CommandSink, max_batch: int = 4000, linger_s: float = 0.0) -> None:
        self._inner = inner
        self._max_batch = max_batch
        self._linger_s = linger_s
        # (commands, the caller's future, loop time of the submit)
        self._pending: list[tuple[list[Command], asyncio.Future[list[CommandResult]], float]] = []
        self._pending_count = 0
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.calls = 0
        self.commands = 0

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        if not commands:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[CommandResult]] = loop.create_future()
        self._pending.append((list(commands), future, loop.time()))
        self._pending_count += len(commands)
        if self._pending_count >= self._max_batch:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _linger(self) -> None:
        """Until the oldest pending command has waited `linger_s`, or a batch is full."""
        wait = self._pending[0][2] + self._linger_s - asyncio.get_running_loop().time()
        if wait > 0 and self._pending_count < self._max_batch:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), wait)

    async def _flush(self) -> None:
        while self._pending:
            if self._linger_s > 0:
                await self._linger()
            taken: list[tuple[list[Command], asyncio.Future[list[CommandResult]], float]] = []
            count = 0
            while self._pending and (
                not taken or count + len(self._pending[0][0]) <= self._max_batch
            ):
                entry = self._pending.pop(0)
                taken.append(entry)
                count += len(entry[0])
            self._pending_count -= count
            batch = [c for commands, _, _ in taken for c in commands]
            self.calls += 1
            self.commands += len(batch)
            try:
                results = await self._inner.submit(batch)
            except Exception as exc:  # each caller sees the failure of its own submit
                for _, future, _ in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for commands, future, _ in taken:
                if not future.done():
                    future.set_result(results[start : start + len(commands)])
                start += len(commands)


class _Service:
    """Common start-up: find the runtime (in a worker thread) and build the sink."""

    #: how long the sink holds a batch for more commands (see `BatchingSink`)
    linger_s = 0.0

    def __init__(self, runtime_config: RuntimeConfig, devices: DeviceConfig) -> None:
        tune_gc()
        _configure_logging()
        self._runtime_config = runtime_config
        self._devices = devices
        self._runtime: Runtime | None = None
        self.sink: BatchingSink | None = None
        # Ray runs an async actor's constructor on its event loop: start from here,
        # so a restarted actor (Ray re-runs the constructor) opens its sockets again.
        self._ready = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        self._runtime = await asyncio.to_thread(Runtime(self._runtime_config).start)
        self.sink = BatchingSink(RuntimeSink(self._runtime), linger_s=self.linger_s)
        await self._open()

    async def _open(self) -> None:
        raise NotImplementedError

    async def ready(self) -> dict[str, Any]:
        """Wait until the service has started; raises what its start-up raised."""
        await self._ready
        return await self.status()

    async def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "rss_bytes": _rss_bytes()}

    async def _submit_checked(self, commands: Sequence[Command], what: str) -> None:
        assert self.sink is not None
        for start in range(0, len(commands), _REGISTER_CHUNK):
            results = await self.sink.submit(commands[start : start + _REGISTER_CHUNK])
            for result in results:
                if not result.ok:
                    LOGGER.warning("%s %s refused: %s", what, result.command_id, result.reason)


# --- OCPP --------------------------------------------------------------------------


class OcppGatewayService(_Service):
    """One CSMS gateway actor: the stations of gateway `index` connect to it.

    Args:
        runtime_config: the runtime whose shards receive the commands (its
            `data_dir` absolute: the actor's working directory is not the caller's).
        devices: the device configuration; this actor serves `devices.stations_of(index)`.
        index: listens on `devices.ocpp.port + index` (any free port if that is 0).

    Station messages leave for the charger shards in batches held up to `linger_s`
    (20 ms): thousands of stations each sending a meter value every few seconds
    make a steady trickle, and a host call and a log commit cost about the same for
    one command as for fifty. A station still gets its CallResult only once its
    commands are in the log. The hold is in every answer's latency: at 50 ms the
    system bench's command p50 was 51 ms and its p99 113, at 20 ms 30 and 73, for
    ~30 % more CPU in the gateways and charger hosts together.
    """

    linger_s = 0.02

    def __init__(self, runtime_config: RuntimeConfig, devices: DeviceConfig, index: int) -> None:
        self.index = index
        self._stations = devices.stations_of(index)  # status() is polled; compute once
        self.gateway: OcppCsmsGateway | None = None
        self.safe_states = 0
        super().__init__(runtime_config, devices)

    async def _open(self) -> None:
        import ocpp.messages

        # ocpp validates every payload in a thread pool by default; for a payload of a
        # few hundred bytes the hop to the thread and back costs more than validating
        # (measured: ~40 % of a busy gateway's time). This process only runs the gateway.
        ocpp.messages.ASYNC_VALIDATION = False
        stations = self._devices.stations_of(self.index)
        limit = raise_open_files_limit(2 * len(stations) + 1024)
        if limit < len(stations) + 256:
            LOGGER.warning("open-files limit %d is low for %d stations", limit, len(stations))
        await self._submit_checked(
            [
                RegisterCharger(
                    command_id=f"devices:register-charger:{s.station_id}:"
                    + fingerprint(s.site_id, s.max_charge_kw, s.max_discharge_kw, s.ocpp_version),
                    issued_at=datetime.now(UTC),
                    charger_id=s.station_id,
                    site_id=s.site_id,
                    max_charge_kw=s.max_charge_kw,
                    max_discharge_kw=s.max_discharge_kw,
                    ocpp_version=s.ocpp_version,
                )
                for s in stations
            ],
            "charger registration",
        )
        ocpp = self._devices.ocpp
        assert self.sink is not None
        self.gateway = OcppCsmsGateway(
            self.sink,
            {s.station_id: StationCredentials(s.secret(), s.enabled) for s in stations},
            gateway_id=f"ocpp-{self.index}",
            host=ocpp.host,
            port=ocpp.port_of(self.index),
            ssl_context=ocpp.ssl_context(),
            heartbeat_interval_s=ocpp.heartbeat_interval_s,
            offline_grace_s=ocpp.offline_grace_s,
            setpoint_timeout_s=ocpp.setpoint_timeout_s,
            trip_planner=self._plan_trip,
            on_offline=self._on_offline,
        )
        await self.gateway.start()
        LOGGER.info(
            "OCPP gateway %d: %d stations on port %d", self.index, len(stations), self.gateway.port
        )

    def _plan_trip(self, report: ChargingNeedsReport) -> Command | None:
        """The id token's vehicle gets the trip the EV announced (departure, energy)."""
        vehicle_id = self._devices.vehicle_of_token(report.id_token)
        if vehicle_id is None or report.departure_at is None or report.energy_kwh is None:
            return None
        try:
            return PlanTrip(
                command_id=report.command_id,
                issued_at=report.issued_at,
                vehicle_id=vehicle_id,
                departure_at=report.departure_at,
                energy_needed_kwh=report.energy_kwh,
            )
        except ValueError as exc:  # e.g. a departure already past: no plan, the needs stay
            LOGGER.warning("no trip plan for %s from %s: %s", vehicle_id, report.station_id, exc)
            return None

    async def _on_offline(self, station_id: str) -> None:
        """A silent station: the vehicles plugged into it go to their safe state.

        `EnforceSafeState`, not a zero `RequestSetpoint`: the gateway holds no control
        lease (a setpoint from it would be refused), the safe state ends the lease of
        whatever controller drove the vehicle, so no stale plan resumes discharging
        through a station we cannot see, and it is logged with its reason. A
        dispatcher takes the vehicle back with a new lease once the station returns.
        """
        assert self.gateway is not None and self.sink is not None
        last_seen = self.gateway.last_seen_at(station_id) or datetime.now(UTC)
        try:
            relay = ray.get_actor(relay_actor(self._runtime_config), namespace=NAMESPACE)
            vehicles = await asyncio.wait_for(relay.vehicles_at.remote(station_id), 10.0)
        except Exception:
            LOGGER.exception(
                "station %s offline: cannot ask the relay who is plugged in", station_id
            )
            return
        stamp = last_seen.astimezone(UTC).isoformat()
        commands: list[Command] = [
            EnforceSafeState(
                command_id=f"{station_id}:offline:{stamp}:safe-state:{vehicle_id}",
                issued_at=datetime.now(UTC),
                vehicle_id=vehicle_id,
                reason=f"charger {station_id} offline (silent since {stamp})",
            )
            for vehicle_id in vehicles
        ]
        if commands:
            self.safe_states += len(commands)
            await self._submit_checked(commands, "safe state")

    async def send_setpoint(
        self, station_id: str, evse_id: int, power_kw: float, valid_until: datetime
    ) -> SetpointOutcome:
        """One SetChargingProfile; the outcome is recorded on the charger's stream."""
        await self._ready
        assert self.gateway is not None
        return await self.gateway.send_setpoint(station_id, evse_id, power_kw, valid_until)

    async def send_setpoints(
        self, setpoints: Sequence[tuple[str, int, float, datetime, str]]
    ) -> list[SetpointOutcome | str]:
        """Many stations at once (each station one at a time, as OCPP-J requires).

        Returns one outcome per setpoint, or the error text for one that failed
        before reaching the station (e.g. an unknown station).
        """
        await self._ready
        assert self.gateway is not None
        gateway = self.gateway

        async def one(item: tuple[str, int, float, datetime, str]) -> SetpointOutcome | str:
            try:
                return await gateway.send_setpoint(*item)
            except Exception as exc:
                LOGGER.warning("setpoint %s failed: %s", item, exc)
                return f"{type(exc).__name__}: {exc}"

        return list(await asyncio.gather(*(one(item) for item in setpoints)))

    async def status(self) -> dict[str, Any]:
        base = await super().status()
        gateway = self.gateway
        stations = self._stations
        return {
            **base,
            "index": self.index,
            "port": gateway.port if gateway is not None else None,
            "stations": len(stations),
            "connected": sum(gateway.connected(s.station_id) for s in stations) if gateway else 0,
            "online": sum(gateway.online(s.station_id) for s in stations) if gateway else 0,
            "rejected_connections": gateway.rejected_connections if gateway else 0,
            "rejected_messages": gateway.rejected_messages if gateway else 0,
            "safe_states": self.safe_states,
            "sink_calls": self.sink.calls if self.sink else 0,
            "sink_commands": self.sink.commands if self.sink else 0,
        }

    async def stop(self) -> None:
        await self._ready
        if self.gateway is not None:
            await self.gateway.stop()


# --- Modbus ------------------------------------------------------------------------


@dataclass(frozen=True)
class InverterWriteOutcome:
    """What became of one inverter setpoint (a picklable summary of the gateway's)."""

    inverter_id: str
    status: str  # confirmed | mismatch | fault | refused | unknown inverter
    power_kw: float
    read_back_kw: float | None = None
    detail: str = ""
    attempts: int = 0


class ModbusGatewayService(_Service):
    """The inverters of one site: one Modbus TCP gateway (poll loop) per inverter."""

    def __init__(self, runtime_config: RuntimeConfig, devices: DeviceConfig, site_id: str) -> None:
        self.site_id = site_id
        self.gateways: dict[str, ModbusInverterGateway] = {}
        self._tasks: list[asyncio.Task[None]] = []
        super().__init__(runtime_config, devices)

    async def _open(self) -> None:
        inverters = self._devices.inverters_of(self.site_id)
        await self._submit_checked(
            [
                RegisterInverter(
                    command_id=f"devices:register-inverter:{i.inverter_id}:"
                    + fingerprint(
                        i.site_id, i.rated_power_kw, i.derate_above_c, i.safe_state_above_c
                    ),
                    issued_at=datetime.now(UTC),
                    inverter_id=i.inverter_id,
                    site_id=i.site_id,
                    rated_power_kw=i.rated_power_kw,
                    derate_above_c=i.derate_above_c,
                    safe_state_above_c=i.safe_state_above_c,
                )
                for i in inverters
            ],
            "inverter registration",
        )
        assert self.sink is not None
        for inv in inverters:
            gateway = ModbusInverterGateway.tcp(
                inv.inverter_id,
                self.sink,
                inv.host,
                inv.port,
                InverterRegisterMap(rated_power_kw=inv.rated_power_kw),
                device_id=inv.device_id,
                timeout_s=inv.timeout_s,
                poll_interval_s=inv.poll_interval_s,
                backoff_max_s=inv.backoff_max_s,
            )
            self.gateways[inv.inverter_id] = gateway
            self._tasks.append(asyncio.create_task(gateway.run()))

    async def write_setpoints(
        self, setpoints: Sequence[tuple[str, float, str]]
    ) -> list[InverterWriteOutcome]:
        """Write `(inverter_id, power_kw, command_id)` setpoints, each read back.

        The confirmation is recorded as `<command_id>:confirmed` / `:mismatch`, so a
        repeated relay of the same decision is recorded once.
        """
        await self._ready
        return list(await asyncio.gather(*(self._write(*s) for s in setpoints)))

    async def _write(
        self, inverter_id: str, power_kw: float, command_id: str
    ) -> InverterWriteOutcome:
        gateway = self.gateways.get(inverter_id)
        if gateway is None:
            return InverterWriteOutcome(inverter_id, "unknown inverter", power_kw)
        try:
            outcome = await gateway.write_setpoint(power_kw, command_id=command_id)
        except WriteRefused as exc:
            return InverterWriteOutcome(inverter_id, "refused", power_kw, detail=str(exc))
        detail = outcome.fault.detail if outcome.fault is not None else ""
        return InverterWriteOutcome(
            inverter_id,
            outcome.status,
            outcome.power_kw,
            outcome.read_back_kw,
            detail,
            outcome.attempts,
        )

    async def status(self) -> dict[str, Any]:
        base = await super().status()
        return {
            **base,
            "site_id": self.site_id,
            "inverters": {
                inverter_id: dataclasses.asdict(g.stats)
                | {"last_results": len(g.stats.last_results)}
                for inverter_id, g in self.gateways.items()
            },
        }

    async def stop(self) -> None:
        await self._ready
        for gateway in self.gateways.values():
            await gateway.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- MQTT --------------------------------------------------------------------------


class _GatedSink:
    """Lets an operator pause submission: messages then stay unacknowledged at the broker."""

    def __init__(self, inner: CommandSink) -> None:
        self._inner = inner
        self.open = asyncio.Event()
        self.open.set()

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        await self.open.wait()
        return await self._inner.submit(commands)


class TelemetryIngestService(_Service):
    """One member of the shared subscription; several split the telemetry stream.

    Its MQTT session is persistent (client id `v2g-<name>-ingest-<index>`, session
    expiry from the config) and resumed on every start, and messages are
    acknowledged after their commands are in the log: what a killed ingest actor had
    received but not recorded is delivered again to its successor.
    """

    def __init__(self, runtime_config: RuntimeConfig, devices: DeviceConfig, index: int) -> None:
        self.index = index
        self.gateway: MqttTelemetryGateway | None = None
        self._gate: _GatedSink | None = None
        self._task: asyncio.Task[None] | None = None
        super().__init__(runtime_config, devices)

    async def _open(self) -> None:
        broker = self._devices.broker
        if broker is None:
            raise ValueError("the device configuration has no broker")
        assert self.sink is not None
        self._gate = _GatedSink(self.sink)
        self.gateway = MqttTelemetryGateway(
            self._gate,
            BrokerSettings(
                broker.host,
                broker.port,
                username=broker.username,
                password=broker.secret(),
                tls_context=broker.tls_context(),
            ),
            site_id=broker.site_id,
            shared_group=broker.shared_group,
            command_factory=functools.partial(ReportTelemetry, source="mqtt"),
            client_id=ingest_client_id(self._runtime_config, self.index),
            session_expiry_s=broker.session_expiry_s,
            resume_session=True,
            max_batch=broker.max_batch,
        )
        self._task = asyncio.create_task(self.gateway.run())

    async def subscribed(self, timeout_s: float = 10.0) -> bool:
        await self._ready
        assert self.gateway is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.gateway.subscribed.wait(), timeout_s)
        return self.gateway.subscribed.is_set()

    async def pause(self) -> None:
        """Stop submitting (received messages wait, unacknowledged)."""
        await self._ready
        assert self._gate is not None
        self._gate.open.clear()

    async def resume(self) -> None:
        await self._ready
        assert self._gate is not None
        self._gate.open.set()

    async def status(self) -> dict[str, Any]:
        base = await super().status()
        stats = self.gateway.stats if self.gateway is not None else None
        return {
            **base,
            "index": self.index,
            "received": stats.received if stats else 0,
            "accepted": stats.accepted if stats else 0,
            "duplicates": stats.duplicates if stats else 0,
            "rejected": dict(stats.rejected) if stats else {},
            "sink_errors": stats.sink_errors if stats else 0,
            "connects": stats.connects if stats else 0,
            "subscribed": bool(self.gateway and self.gateway.subscribed.is_set()),
        }

    async def stop(self) -> None:
        await self._ready
        if self.gateway is not None:
            await self.gateway.stop()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)


# --- the setpoint relay -------------------------------------------------------------

_VEHICLE_TYPES = frozenset(
    {
        "VehiclePluggedIn",
        "VehicleUnplugged",
        "VehicleSetpointAccepted",
        "VehicleSetpointCurtailed",
        "VehicleSetpointRejected",
        "VehicleSafeStateEntered",
        "VehicleControlGranted",
        "VehicleControlReleased",
    }
)
_CHARGER_TYPES = frozenset({"ChargingTransactionStarted", "ChargingTransactionEnded"})
_INVERTER_TYPES = frozenset(
    {"InverterSetpointAccepted", "InverterSetpointDerated", "InverterSafeStateEntered"}
)
RELAYED_TYPES = _VEHICLE_TYPES | _CHARGER_TYPES | _INVERTER_TYPES


@dataclass(frozen=True)
class ChargerCall:
    station_id: str
    evse_id: int
    power_kw: float
    valid_until: datetime
    traceparent: str = ""  # of the setpoint event it carries out


@dataclass(frozen=True)
class InverterCall:
    inverter_id: str
    power_kw: float
    command_id: str


@dataclass
class RelayState:
    """What the relay knows from the events it has read: enough to route a setpoint.

    `plugged`: vehicle -> charger (from VehiclePluggedIn / Unplugged);
    `setpoints`: vehicle -> [controller, power_kw, valid_until ISO] in force;
    `transactions`: charger -> transaction id -> [evse_id, id token], to find the
    EVSE a vehicle's id token is charging on.
    """

    position: int = 0
    plugged: dict[str, str] = field(default_factory=dict)
    setpoints: dict[str, list[Any]] = field(default_factory=dict)
    transactions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RelayState:
        return cls(**json.loads(text))


class RelayFold:
    """Folds events into `RelayState` and says which device calls they ask for.

    Pure (no Ray, no I/O): `apply(rows)` takes log rows (position, stream_id, type,
    event_id, payload) in position order and returns the calls, coalesced so a
    device gets only the last setpoint of the rows.
    """

    def __init__(self, devices: DeviceConfig, state: RelayState | None = None) -> None:
        self.devices = devices
        self.state = state or RelayState()
        self.unroutable = 0
        self._traceparent = ""  # of the event being folded

    def apply(
        self, rows: Sequence[dict[str, Any]]
    ) -> tuple[dict[tuple[str, int], ChargerCall], dict[str, InverterCall]]:
        chargers: dict[tuple[str, int], ChargerCall] = {}
        inverters: dict[str, InverterCall] = {}
        for row in rows:
            self.state.position = max(self.state.position, int(row["position"]))
            kind = row["type"]
            payload = json.loads(row["payload"])
            self._traceparent = traceparent_in(row.get("metadata") or "")
            if kind in _VEHICLE_TYPES:
                self._vehicle(kind, payload, chargers)
            elif kind in _CHARGER_TYPES:
                self._charger(kind, row["stream_id"].removeprefix("charger-"), payload)
            elif kind in _INVERTER_TYPES:
                power_kw = 0.0 if kind == "InverterSafeStateEntered" else float(payload["power_kw"])
                inverter_id = payload["inverter_id"]
                inverters[inverter_id] = InverterCall(
                    inverter_id, power_kw, f"relay:{row['event_id']}"
                )
        return chargers, inverters

    def _vehicle(
        self, kind: str, p: dict[str, Any], calls: dict[tuple[str, int], ChargerCall]
    ) -> None:
        state = self.state
        vehicle = p["vehicle_id"]
        at = datetime.fromisoformat(p["at"])
        zero_until = at + timedelta(seconds=self.devices.zero_hold_s)
        active = state.setpoints.get(vehicle)
        if kind == "VehiclePluggedIn":
            old = state.plugged.get(vehicle)
            if old is not None and old != p["charger_id"] and active is not None:
                self._call(calls, vehicle, old, 0.0, zero_until)
            state.plugged[vehicle] = p["charger_id"]
            state.setpoints.pop(vehicle, None)  # plugging in ends any setpoint
        elif kind == "VehicleUnplugged":
            # The session is over: leave the station at zero, not at the last setpoint.
            self._call(calls, vehicle, p["charger_id"], 0.0, zero_until)
            state.plugged.pop(vehicle, None)
            state.setpoints.pop(vehicle, None)
        elif kind == "VehicleSetpointAccepted":
            state.setpoints[vehicle] = [p["controller_id"], p["power_kw"], p["valid_until"]]
            self._call(
                calls, vehicle, None, p["power_kw"], datetime.fromisoformat(p["valid_until"])
            )
        elif kind == "VehicleSetpointCurtailed":
            if active is not None:
                active[1] = p["power_kw"]
                self._call(calls, vehicle, None, p["power_kw"], datetime.fromisoformat(active[2]))
        elif kind == "VehicleSafeStateEntered":
            state.setpoints.pop(vehicle, None)
            self._call(calls, vehicle, None, 0.0, zero_until)
        elif active is not None and (
            (kind == "VehicleSetpointRejected" and p["controller_id"] == active[0])
            or kind == "VehicleControlReleased"
            or (kind == "VehicleControlGranted" and p["controller_id"] != active[0])
        ):
            # The vehicle decider ended the setpoint in force: the device must stop too.
            state.setpoints.pop(vehicle, None)
            self._call(calls, vehicle, None, 0.0, zero_until)

    def _charger(self, kind: str, charger_id: str, p: dict[str, Any]) -> None:
        transactions = self.state.transactions.setdefault(charger_id, {})
        if kind == "ChargingTransactionStarted":
            transactions[p["transaction_id"]] = [p.get("evse_id"), p.get("id_token", "")]
        else:
            transactions.pop(p["transaction_id"], None)
            if not transactions:
                self.state.transactions.pop(charger_id, None)

    def _evse(self, vehicle: str, charger_id: str) -> int:
        tokens = set(self.devices.tokens_of(vehicle))
        for evse_id, token in self.state.transactions.get(charger_id, {}).values():
            if token in tokens and evse_id is not None:
                return int(evse_id)
        station = self.devices.station(charger_id)
        return station.evse_id if station is not None else 1

    def _call(
        self,
        calls: dict[tuple[str, int], ChargerCall],
        vehicle: str,
        charger_id: str | None,
        power_kw: float,
        valid_until: datetime,
    ) -> None:
        charger_id = charger_id or self.state.plugged.get(vehicle)
        if charger_id is None or self.devices.station(charger_id) is None:
            self.unroutable += 1  # not plugged in, or not an OCPP station we serve
            return
        evse_id = self._evse(vehicle, charger_id)
        calls[(charger_id, evse_id)] = ChargerCall(
            charger_id, evse_id, float(power_kw), valid_until, self._traceparent
        )

    def vehicles_at(self, charger_id: str) -> list[str]:
        return sorted(v for v, c in self.state.plugged.items() if c == charger_id)


class SetpointRelay:
    """Follows the log; every setpoint decision becomes a call to the device's gateway.

    The position it has relayed, with the `RelayState` it folded, is written
    atomically to `<data_dir>/relay/setpoint-relay.json` after each round that
    relayed something (and every few seconds while only other events pass; it asks
    the log for the relayed types alone), so a restart resumes there: at most the
    batch in flight at a crash is
    sent again (a station re-receives the same profile; an inverter's confirmation
    has the same command id and is recorded once), and nothing is skipped. Within a
    batch only the last setpoint per device is sent, and one that has expired is
    not sent at all, so a relay that was down for a while does not flood.
    """

    def __init__(
        self,
        runtime_config: RuntimeConfig,
        devices: DeviceConfig,
        *,
        chunk_positions: int = 20_000,
        poll_s: float = 1.0,
    ) -> None:
        _configure_logging()
        self._runtime_config = runtime_config
        self._devices = devices
        self._chunk = chunk_positions
        self._poll_s = poll_s
        self._path = os.path.join(runtime_config.data_dir, "relay", "setpoint-relay.json")
        self.fold = RelayFold(devices, self._load())
        self.sent_to_chargers = 0
        self.sent_to_inverters = 0
        self.skipped_expired = 0
        self.errors = 0
        self._handles: dict[str, Any] = {}
        self._relayed = asyncio.Condition()
        self._persisted_at = 0.0
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _load(self) -> RelayState | None:
        try:
            with open(self._path) as file:
                return RelayState.from_json(file.read())
        except FileNotFoundError:
            return None

    def _persist(self) -> None:
        directory = os.path.dirname(self._path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".relay-")
        with os.fdopen(fd, "w") as file:
            file.write(self.fold.state.to_json())
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self._path)

    async def _run(self) -> None:
        runtime = await asyncio.to_thread(Runtime(self._runtime_config).start)
        log = runtime.log
        while not self._stopping.is_set():
            try:
                position = self.fold.state.position
                upper, table = await log.follow.remote(
                    position, self._poll_s, self._chunk, _RELAY_COLUMNS, RELAYED_TYPES_SORTED
                )
                if upper > position:
                    await self._relay(table, upper)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                LOGGER.exception("setpoint relay: a batch failed; retrying")
                self.fold = RelayFold(self._devices, self._load())  # back to what was relayed
                await asyncio.sleep(1.0)

    async def _relay_through(self, log: Any, upper: int) -> None:
        """Relay the events after the relayed position up to `upper`, then persist it."""
        table = await log.read_all.remote(
            self.fold.state.position + 1,
            upper,
            _RELAY_COLUMNS,
            None,
            None,
            None,
            RELAYED_TYPES_SORTED,  # the log filters: telemetry never crosses to the relay
        )
        await self._relay(table, upper)

    async def _relay(self, table: Any, upper: int) -> None:
        """Relay `table` (the relayed types up to `upper`, in order), then persist the position."""
        rows = table.to_pylist()  # in position order, as the log returns them
        chargers, inverters = self.fold.apply(rows)
        self.fold.state.position = upper
        await self._perform(chargers, inverters)
        # A round with nothing to relay changes only the position; writing (and
        # fsyncing) the state for it at every commit of the log would cost more than
        # everything else the relay does. Skipping it is safe: after a restart those
        # events are read again and relay nothing.
        now = time.monotonic()
        if rows or now - self._persisted_at >= _PERSIST_IDLE_S:
            await asyncio.to_thread(self._persist)
            self._persisted_at = now
        async with self._relayed:
            self._relayed.notify_all()

    async def _perform(
        self, chargers: dict[tuple[str, int], ChargerCall], inverters: dict[str, InverterCall]
    ) -> None:
        now = datetime.now(UTC)
        by_gateway: dict[int, list[tuple[str, int, float, datetime, str]]] = {}
        for call in chargers.values():
            if call.valid_until <= now:
                self.skipped_expired += 1
                continue
            gateway = self._devices.gateway_of(call.station_id)
            by_gateway.setdefault(gateway, []).append(
                (call.station_id, call.evse_id, call.power_kw, call.valid_until, _relayed(call))
            )
        by_site: dict[str, list[tuple[str, float, str]]] = {}
        for inv in inverters.values():
            config = self._devices.inverter(inv.inverter_id)
            if config is None:
                self.fold.unroutable += 1
                continue
            by_site.setdefault(config.site_id, []).append(
                (inv.inverter_id, inv.power_kw, inv.command_id)
            )
        refs = []
        for gateway, items in by_gateway.items():
            actor = self._handle(ocpp_actor(self._runtime_config, gateway))
            refs.append(actor.send_setpoints.remote(items))
            self.sent_to_chargers += len(items)
        for site, site_items in by_site.items():
            actor = self._handle(modbus_actor(self._runtime_config, site))
            refs.append(actor.write_setpoints.remote(site_items))
            self.sent_to_inverters += len(site_items)
        if refs:
            await asyncio.gather(*refs)

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
        return self._handles[name]

    async def vehicles_at(self, charger_id: str) -> list[str]:
        """The vehicles plugged into a charger, as far as the relayed log says."""
        return self.fold.vehicles_at(charger_id)

    async def wait_relayed(self, position: int, timeout_s: float = 10.0) -> int:
        """Wait until every event up to `position` has been relayed; the position reached."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._relayed:
                await self._relayed.wait_for(lambda: self.fold.state.position >= position)
        return self.fold.state.position

    async def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "position": self.fold.state.position,
            "plugged": len(self.fold.state.plugged),
            "sent_to_chargers": self.sent_to_chargers,
            "sent_to_inverters": self.sent_to_inverters,
            "skipped_expired": self.skipped_expired,
            "unroutable": self.fold.unroutable,
            "errors": self.errors,
        }

    async def stop(self) -> None:
        self._stopping.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


def _relayed(call: ChargerCall) -> str:
    """The trace the gateway continues: a relay span under the setpoint event's context."""
    if not call.traceparent:
        return ""
    attributes = {"station_id": call.station_id, "evse_id": call.evse_id, "power_kw": call.power_kw}
    with continued(call.traceparent, "relay.setpoint", attributes) as span:
        return handed_on(span, call.traceparent)


RELAYED_TYPES_SORTED = sorted(RELAYED_TYPES)
_RELAY_COLUMNS = ["position", "stream_id", "type", "event_id", "payload", "metadata"]
#: how often an idle relay records the position it has read up to
_PERSIST_IDLE_S = 5.0


# --- launching ---------------------------------------------------------------------


class DeviceServices:
    """Starts (or finds) every device actor of a runtime; the one place they become Ray actors.

    Args:
        runtime_config: the runtime (started by the caller or by `start()`).
        devices: the device configuration.
        relay: also run the setpoint relay.

    `start()` is idempotent (named actors, `get_if_exists`); `stop()` kills them.
    """

    def __init__(
        self, runtime_config: RuntimeConfig, devices: DeviceConfig, *, relay: bool = True
    ) -> None:
        self.runtime_config = dataclasses.replace(
            runtime_config, data_dir=os.path.abspath(runtime_config.data_dir)
        )
        self.devices = devices
        self._with_relay = relay
        self.ocpp: list[Any] = []
        self.modbus: dict[str, Any] = {}
        self.ingest: list[Any] = []
        self.relay: Any = None

    def _actor(self, cls: type, name: str, *args: Any) -> Any:
        return (
            ray.remote(cls)
            .options(
                name=name,
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=-1,
                num_cpus=0,
            )
            .remote(*args)
        )

    def start(self, timeout_s: float = 60.0) -> DeviceServices:
        Runtime(self.runtime_config).start()
        config, devices = self.runtime_config, self.devices
        if self._with_relay:
            self.relay = self._actor(SetpointRelay, relay_actor(config), config, devices)
        self.ocpp = [
            self._actor(OcppGatewayService, ocpp_actor(config, i), config, devices, i)
            for i in range(devices.ocpp.gateways)
            if devices.stations_of(i)
        ]
        self.modbus = {
            site: self._actor(
                ModbusGatewayService, modbus_actor(config, site), config, devices, site
            )
            for site in devices.inverter_sites()
        }
        if devices.broker is not None:
            self.ingest = [
                self._actor(TelemetryIngestService, ingest_actor(config, i), config, devices, i)
                for i in range(devices.broker.ingest_actors)
            ]
        services = [*self.ocpp, *self.modbus.values(), *self.ingest]
        ray.get([s.ready.remote() for s in services], timeout=timeout_s)
        if self.relay is not None:
            ray.get(self.relay.status.remote(), timeout=timeout_s)
        return self

    def ocpp_ports(self) -> list[int]:
        return [s["port"] for s in ray.get([a.status.remote() for a in self.ocpp])]

    def stop(self) -> None:
        """Close the sockets and kill the actors (the relay's position file stays)."""
        actors = [*self.ocpp, *self.modbus.values(), *self.ingest]
        if self.relay is not None:
            actors.append(self.relay)
        with contextlib.suppress(Exception):
            ray.get([a.stop.remote() for a in actors], timeout=15)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.ocpp, self.modbus, self.ingest, self.relay = [], {}, [], None


__all__ = [
    "BatchingSink",
    "ChargerCall",
    "DeviceServices",
    "InverterCall",
    "InverterWriteOutcome",
    "ModbusGatewayService",
    "OcppGatewayService",
    "RelayFold",
    "RelayState",
    "SetpointRelay",
    "TelemetryIngestService",
    "ingest_actor",
    "ingest_client_id",
    "modbus_actor",
    "ocpp_actor",
    "relay_actor",
]
