"""Bench: the whole system the way operators run it, under a steady load, on the embedded default.

One bounded run on a local Ray and a loopback mosquitto that it starts (and stops) itself:

1. the runtime (log actor, every entity host at the default shard counts), the
   market with a flat price, `--vehicles` vehicles registered at `--sites` sites;
2. the device services of `cluster.gateways.DeviceServices`: one OCPP CSMS gateway
   actor per site, the MQTT ingest actor(s) and the setpoint relay;
3. one site dispatcher per site (looping every second, as `start_dispatchers` runs
   them, instrumented to time each tick) and the coordinator keeping them alive;
4. `--station-procs` processes simulate the OCPP 2.1 stations (two EVSEs each,
   light raw OCPP-J frames): boot, connector Occupied and a transaction started
   with the vehicle's id token on each EVSE, then MeterValues every `--interval` s
   per EVSE and heartbeats at the interval the CSMS asks; they answer
   SetChargingProfile (Accepted) and meter the power they were told;
5. `--publisher-procs` processes publish each vehicle's telemetry (QoS 1) every
   `--interval` s into mosquitto, which the ingest actors record and then acknowledge;
6. every vehicle is plugged in (`PlugIn` through the client); once all stations and
   vehicles are up, the coordinator steers the fleet: every `--target-period` s a
   new fleet power target, split between the sites, which the dispatchers turn into
   `RequestSetpoint`s and the relay into `SetChargingProfile`s to the stations.

After a warm-up, figures are taken over a `--window` of seconds; then the
simulators stop, the pipeline drains and the log is read back to count, from both
ends, what the simulators sent and what became events and answers.

Figures (last line, one JSON object):

- `events_per_s`: growth of the log's watermark over the window / window;
- `command_p99_ms` (and p50, max): station message sent (MeterValues, Heartbeat) ->
  its CallResult received by the station, for messages sent in the window; the
  gateway answers only after the hosts recorded the commands and the log fsynced;
- `telemetry_puback_p99_ms`: MQTT publish -> PUBACK from the broker (the broker
  alone: the ingest acknowledges its delivery to the broker only after the log
  recorded the telemetry, which a device cannot see);
- `dispatch_cycle_p99_ms`: one dispatcher tick in the loop: read the new events
  from the log, decide, send the vehicle commands and wait for the hosts' results;
- `rss_mib_total`: RSS of this process and all its descendants (Ray's own processes,
  every actor worker, the simulators, mosquitto), sampled during the window, max;
  `uss_mib_total` the same without shared pages;
- `dropped`: simulator messages without their outcome: OCPP calls without a
  CallResult, MeterValues answered but not in the log, MQTT publishes acknowledged
  by the broker whose telemetry event is not in the log;
- `cpu_s_by_component`: CPU seconds in the window per process kind (the cheap
  profile: who used the two cores);
- `load_average`: `os.getloadavg()` at the end of the window (others may share the
  machine).

    python -m scripts.bench_system [--quick] [--vehicles 1000] [--window 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

MIB = 1024 * 1024
EVSE_KW = 11.0
SITE_PREFIX = "site"


def say(text: str) -> None:
    print(f"bench_system: {text}", file=sys.stderr, flush=True)


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def _nice_like_ray() -> None:
    # Ray runs its workers at niceness 15; the simulators stand in for devices outside
    # this machine, so they must not get a better share of the two cores than the system.
    os.nice(max(0, 15 - os.nice(0)))


# --- station simulator process -------------------------------------------------------


def stations_process(
    stations: list[tuple[str, str, str, list[tuple[int, str]]]],
    interval_s: float,
    handshakes: int,
    ready: Any,
    measure_from: Any,
    measure_until: Any,
    stop: Any,
    results: Any,
) -> None:
    """Run OCPP 2.1 stations (id, password, url, [(evse, id token)]) until `stop`."""
    raise_open_files_limit()
    _nice_like_ray()
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    from websockets.asyncio.client import connect
    from websockets.headers import build_authorization_basic

    latencies_ms: list[float] = []
    sent_meter: list[str] = []  # command ids the gateway will use: "<station>:<uid>"
    answered: set[str] = set()
    unanswered: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    profiles = Counter[str]()
    calls = 0

    async def station(
        sid: str, password: str, url: str, evses: list[tuple[int, str]], gate: asyncio.Semaphore
    ) -> None:
        nonlocal calls
        pending: dict[str, asyncio.Future[Any]] = {}
        told_w: dict[int, float] = {e: 0.0 for e, _ in evses}
        import_wh: dict[int, float] = {e: 0.0 for e, _ in evses}
        export_wh: dict[int, float] = {e: 0.0 for e, _ in evses}
        lock = asyncio.Lock()  # OCPP-J: one outstanding call per connection
        counter = 0

        async def reader(ws: Any) -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if frame[0] == 2:  # a call from the CSMS
                    if frame[2] == "SetChargingProfile":
                        payload = frame[3]
                        period = payload["chargingProfile"]["chargingSchedule"][0][
                            "chargingSchedulePeriod"
                        ][0]
                        told_w[int(payload["evseId"])] = float(
                            period.get("setpoint", period.get("limit", 0.0))
                        )
                        profiles["SetChargingProfile"] += 1
                        await ws.send(json.dumps([3, frame[1], {"status": "Accepted"}]))
                    else:
                        profiles[frame[2]] += 1
                        await ws.send(json.dumps([4, frame[1], "NotImplemented", "", {}]))
                    continue
                future = pending.pop(frame[1], None)
                if future is not None and not future.done():
                    future.set_result(frame)

        async def call(ws: Any, action: str, payload: dict[str, Any], what: str) -> bool:
            nonlocal counter, calls
            counter += 1
            uid = f"{what}-{counter}"
            async with lock:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[Any] = loop.create_future()
                pending[uid] = future
                sent_at = time.time()
                started = time.perf_counter()
                await ws.send(json.dumps([2, uid, action, payload]))
                if action == "MeterValues":
                    sent_meter.append(f"{sid}:{uid}")
                calls += 1
                try:
                    frame = await asyncio.wait_for(future, 30.0)
                except TimeoutError:
                    pending.pop(uid, None)
                    unanswered[action] += 1
                    return False
            latency = (time.perf_counter() - started) * 1000.0
            if frame[0] == 4:
                errors[f"{action} CallError {frame[2]}"] += 1
                unanswered[action] += 1
                return False
            answered.add(f"{sid}:{uid}")
            if measure_from.value and measure_from.value <= sent_at < measure_until.value:
                latencies_ms.append(latency)
            return True

        async with gate:
            try:
                ws = await connect(
                    f"{url}/{sid}",
                    subprotocols=["ocpp2.1"],  # type: ignore[list-item]
                    additional_headers={"Authorization": build_authorization_basic(sid, password)},
                    compression=None,
                    open_timeout=120,
                    ping_interval=None,
                )
            except Exception as exc:
                errors[f"connect {type(exc).__name__}"] += 1
                return
        read_task = asyncio.create_task(reader(ws))
        try:
            boot = {
                "chargingStation": {"model": "BenchBidi", "vendorName": "v2gfleet"},
                "reason": "PowerUp",
            }
            await call(ws, "BootNotification", boot, "boot")
            heartbeat_s = 60.0
            for seq, (evse, token) in enumerate(evses, start=1):
                status = {
                    "timestamp": _now_iso(),
                    "connectorStatus": "Occupied",
                    "evseId": evse,
                    "connectorId": 1,
                }
                await call(ws, "StatusNotification", status, "status")
                started_tx = {
                    "eventType": "Started",
                    "timestamp": _now_iso(),
                    "triggerReason": "CablePluggedIn",
                    "seqNo": seq,
                    "transactionInfo": {"transactionId": f"{sid}-tx{evse}"},
                    "evse": {"id": evse, "connectorId": 1},
                    "idToken": {"idToken": token, "type": "ISO14443"},
                }
                await call(ws, "TransactionEvent", started_tx, "tx")
            with ready.get_lock():
                ready.value += 1

            async def meter(evse: int) -> None:
                loop = asyncio.get_running_loop()
                next_at = loop.time() + random.uniform(0, interval_s)
                while not stop.value:
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    next_at += interval_s
                    if stop.value:
                        break
                    power_w = told_w[evse]
                    if power_w >= 0:
                        import_wh[evse] += power_w * interval_s / 3600.0
                    else:
                        export_wh[evse] -= power_w * interval_s / 3600.0
                    sampled = [
                        ("Power.Active.Import", max(power_w, 0.0), "W"),
                        ("Power.Active.Export", max(-power_w, 0.0), "W"),
                        ("Energy.Active.Import.Register", import_wh[evse], "Wh"),
                        ("Energy.Active.Export.Register", export_wh[evse], "Wh"),
                    ]
                    payload = {
                        "evseId": evse,
                        "meterValue": [
                            {
                                "timestamp": _now_iso(),
                                "sampledValue": [
                                    {
                                        "value": round(v, 1),
                                        "measurand": m,
                                        "unitOfMeasure": {"unit": u},
                                    }
                                    for m, v, u in sampled
                                ],
                            }
                        ],
                    }
                    await call(ws, "MeterValues", payload, f"mv{evse}")

            async def heartbeat() -> None:
                loop = asyncio.get_running_loop()
                next_at = loop.time() + random.uniform(0, heartbeat_s)
                while not stop.value:
                    await asyncio.sleep(min(1.0, max(0.0, next_at - loop.time())))
                    if loop.time() >= next_at and not stop.value:
                        next_at += heartbeat_s
                        await call(ws, "Heartbeat", {}, "hb")

            async def until_stopped() -> None:
                while not stop.value:
                    await asyncio.sleep(0.5)

            await asyncio.gather(*(meter(e) for e, _ in evses), heartbeat(), until_stopped())
        except Exception as exc:
            errors[f"session {type(exc).__name__}"] += 1
        finally:
            read_task.cancel()
            with contextlib.suppress(Exception):
                await ws.close()

    async def main() -> None:
        gate = asyncio.Semaphore(handshakes)
        await asyncio.gather(*(station(s, p, u, e, gate) for s, p, u, e in stations))

    asyncio.run(main())
    import psutil

    results.put(
        {
            "kind": "stations",
            "latencies_ms": latencies_ms,
            "sent_meter": sent_meter,
            "answered": sorted(answered),
            "unanswered": dict(unanswered),
            "errors": dict(errors),
            "calls_from_csms": dict(profiles),
            "calls": calls,
            "rss": psutil.Process().memory_info().rss,
        }
    )


# --- telemetry publisher process ---------------------------------------------------


def publisher_process(
    port: int,
    vehicles: list[tuple[str, str, float]],
    interval_s: float,
    ready: Any,
    measure_from: Any,
    measure_until: Any,
    stop: Any,
    results: Any,
) -> None:
    """Publish each vehicle's (id, site, soc) telemetry every `interval_s`, QoS 1."""
    _nice_like_ray()
    import aiomqtt

    puback_ms: list[float] = []
    sent: list[str] = []  # "<vehicle>:<seq>" acknowledged by the broker
    errors: Counter[str] = Counter()

    async def main() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=f"bench-vans-{os.getpid()}", max_inflight_messages=1000
        ) as client:

            async def vehicle(vid: str, site: str, soc: float) -> None:
                loop = asyncio.get_running_loop()
                topic = f"v2g/{site}/vehicles/{vid}/telemetry"
                next_at = loop.time() + random.uniform(0, interval_s)
                seq = 0
                while not stop.value:
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    next_at += interval_s
                    if stop.value:
                        break
                    seq += 1
                    # no battery model here: a slow random walk the planner never sees
                    # departing from its plan (the stations meter the told power)
                    soc = min(0.9, max(0.3, soc + random.uniform(-0.0005, 0.0005)))
                    body = {
                        "soc": round(soc, 6),
                        "battery_temp_c": 25.0,
                        "soh": 0.95,
                        "measured_at": _now_iso(),
                        "seq": seq,
                    }
                    sent_at = time.time()
                    started = time.perf_counter()
                    try:
                        await client.publish(topic, json.dumps(body), qos=1, timeout=30)
                    except Exception as exc:
                        errors[f"publish {type(exc).__name__}"] += 1
                        continue
                    sent.append(f"{vid}:{seq}")
                    if measure_from.value and measure_from.value <= sent_at < measure_until.value:
                        puback_ms.append((time.perf_counter() - started) * 1000.0)
                    if seq == 1:
                        with ready.get_lock():
                            ready.value += 1

            await asyncio.gather(*(vehicle(v, s, soc) for v, s, soc in vehicles))

    try:
        asyncio.run(main())
    except Exception as exc:
        errors[f"client {type(exc).__name__}"] += 1
    import psutil

    results.put(
        {
            "kind": "publisher",
            "puback_ms": puback_ms,
            "sent": sent,
            "errors": dict(errors),
            "rss": psutil.Process().memory_info().rss,
        }
    )


# --- the instrumented dispatcher -----------------------------------------------------


def timed_dispatcher_class() -> type:
    """`SiteDispatcher` timing each tick (read new events, decide, act, results back)."""
    from actors.tracing import dispatch_latency_ms
    from cluster.dispatcher import SiteDispatcher

    class TimedSiteDispatcher(SiteDispatcher):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.cycles: list[tuple[float, float, int, int]] = []
            self._acted = (0, 0)
            super().__init__(*args, **kwargs)

        def act(self, decision: Any) -> Any:
            results = super().act(decision)
            vehicle = results[len(decision.dispatch) :]
            self._acted = (len(vehicle), sum(1 for r in vehicle if r.ok))
            return results

        def tick(self, at: datetime | None = None, valid_for_s: float | None = None) -> Any:
            wall = time.time()
            started = time.perf_counter()
            self._acted = (0, 0)
            decision = super().tick(at, valid_for_s)
            ms = (time.perf_counter() - started) * 1000.0
            self.cycles.append((wall, ms, *self._acted))
            del self.cycles[:-20_000]
            dispatch_latency_ms.record(ms, {"site": self.policy.site_id})
            return decision

        def cycle_log(self) -> list[tuple[float, float, int, int]]:
            return list(self.cycles)

        def pid(self) -> int:
            return os.getpid()

    return TimedSiteDispatcher


def start_timed_dispatchers(runtime: Any, configs: list[Any], period_s: float) -> dict[str, Any]:
    """`cluster.dispatcher.start_dispatchers` (same actor options), with the timed class."""
    from cluster.dispatcher import start_dispatchers

    return start_dispatchers(
        runtime, configs, loop_period_s=period_s, dispatcher_class=timed_dispatcher_class()
    )


# --- processes: memory and CPU -------------------------------------------------------


def process_tree() -> list[Any]:
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def label_of(proc: Any, known: dict[int, str]) -> str:
    if proc.pid in known:
        return known[proc.pid]
    try:
        cmd = proc.cmdline()
        first = cmd[0] if cmd else proc.name()
    except Exception:
        return "gone"
    if first.startswith("ray::"):
        return first.split(".")[0].split(" ")[0]
    name = os.path.basename(first)
    if "python" in name and any("ray" in part for part in cmd[1:3]):
        return "ray-internal " + os.path.basename(cmd[1]) if len(cmd) > 1 else name
    return name


def cpu_by_pid() -> dict[int, tuple[str, float]]:
    out = {}
    for proc in process_tree():
        try:
            times = proc.cpu_times()
            out[proc.pid] = ("", times.user + times.system)
        except Exception:
            continue
    return out


def memory_now() -> tuple[int, int]:
    rss = uss = 0
    for proc in process_tree():
        try:
            info = proc.memory_full_info()
        except Exception:
            continue
        rss += info.rss
        uss += getattr(info, "uss", info.rss)
    return rss, uss


# --- the run -------------------------------------------------------------------------


class Deadline(Exception):
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 vehicles, 20 s window")
    parser.add_argument("--vehicles", type=int, default=None, help="default 1000 (quick: 100)")
    parser.add_argument("--sites", type=int, default=2, help="one dispatcher + gateway each")
    parser.add_argument("--ingest", type=int, default=1, help="MQTT ingest actors")
    parser.add_argument("--station-procs", type=int, default=3)
    parser.add_argument("--publisher-procs", type=int, default=1)
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry/meter period, s")
    parser.add_argument("--target-period", type=float, default=10.0, help="new fleet target, s")
    parser.add_argument("--warmup", type=float, default=None, help="s after ramp (default 20)")
    parser.add_argument("--window", type=float, default=None, help="s measured (default 60)")
    parser.add_argument("--ramp-timeout", type=float, default=300.0)
    parser.add_argument("--time-limit", type=float, default=1500.0, help="hard bound, s")
    args = parser.parse_args(argv)
    vehicles_n = args.vehicles or (100 if args.quick else 1000)
    window_s = args.window or (20.0 if args.quick else 60.0)
    warmup_s = args.warmup if args.warmup is not None else (10.0 if args.quick else 20.0)
    stations_n = math.ceil(vehicles_n / 2)
    sites = [f"{SITE_PREFIX}-{chr(ord('a') + k)}" for k in range(args.sites)]

    def on_alarm(*_: Any) -> None:
        raise Deadline(f"time limit of {args.time_limit:.0f} s reached")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.time_limit))
    raise_open_files_limit()
    ctx = mp.get_context("spawn")
    data_dir = tempfile.mkdtemp(prefix="v2g-bench-system-")
    procs: list[Any] = []
    broker: Any = None
    services: Any = None
    dispatchers: dict[str, Any] = {}
    coordinator: Any = None
    runtime: Any = None
    stop = ctx.Value("b", 0)
    steering_stop = threading.Event()
    steering: threading.Thread | None = None
    figures: dict[str, Any] = {}
    try:
        import ray

        from actors.dispatch import ConfigureDispatcher
        from actors.market import PublishPrice, RegisterMarket
        from actors.vehicle import PlugIn, RegisterVehicle
        from cluster.client import FleetClient
        from cluster.device_config import (
            BrokerConfig,
            DeviceConfig,
            OcppSettings,
            StationConfig,
            VehicleBinding,
        )
        from cluster.dispatcher import start_coordinator
        from cluster.gateways import DeviceServices
        from cluster.mosquitto import Mosquitto
        from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig
        from events.dispatch import TransformerLimit

        t0 = time.perf_counter()
        # unbounded per-client queue: a slow ingest must show as latency, not loss
        broker = Mosquitto(
            max_queued_messages=0,
            max_inflight_messages=100,
            workdir=os.path.join(data_dir, "mosquitto"),
        )
        broker.start()
        # address="local": a Ray of our own, even if another one runs on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
        )
        config = RuntimeConfig(name="benchsystem", data_dir=data_dir, num_cpus=2)
        runtime = Runtime(config).start()  # embedded default: shards, partitions
        fleet = FleetClient(runtime, owns_ray=False)

        # the fleet: vehicle i at station i // 2, EVSE i % 2 + 1; stations split by site
        station_ids = [f"ST{i:04d}" for i in range(stations_n)]
        site_of_station = {
            s: sites[i * len(sites) // stations_n] for i, s in enumerate(station_ids)
        }
        vehicle_ids = [f"ev-{i:04d}" for i in range(vehicles_n)]
        bay = {v: (station_ids[i // 2], i % 2 + 1) for i, v in enumerate(vehicle_ids)}
        token = {v: f"TK{i:05d}" for i, v in enumerate(vehicle_ids)}
        passwords = {s: f"pw-{s}-{random.randrange(10**9)}" for s in station_ids}
        devices = DeviceConfig(
            ocpp=OcppSettings(
                port=0, gateways=len(sites), heartbeat_interval_s=60, offline_grace_s=60.0
            ),
            stations=tuple(
                StationConfig(
                    station_id=s,
                    password=passwords[s],
                    site_id=site_of_station[s],
                    max_charge_kw=2 * EVSE_KW,
                    max_discharge_kw=2 * EVSE_KW,
                    ocpp_version="2.1",
                    gateway=sites.index(site_of_station[s]),
                )
                for s in station_ids
            ),
            broker=BrokerConfig(port=broker.port, ingest_actors=args.ingest, session_expiry_s=600),
            vehicles=tuple(
                VehicleBinding(vehicle_id=v, id_tokens=(token[v],)) for v in vehicle_ids
            ),
        )
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        setup: list[Any] = [
            RegisterMarket(
                command_id="bench:market", issued_at=now, market_id="nl-day-ahead", kind="day_ahead"
            ),
            # a flat price: the plan idles, the coordinator's targets move the fleet
            *(
                PublishPrice(
                    command_id=f"bench:price:{h}",
                    issued_at=now,
                    market_id="nl-day-ahead",
                    interval_start=day + timedelta(hours=h),
                    interval_minutes=60,
                    price_eur_per_mwh=50.0,
                    version=0,
                )
                for h in range(48)
            ),
            *(
                RegisterVehicle(
                    command_id=f"bench:register:{v}",
                    issued_at=now,
                    vehicle_id=v,
                    model="Volkswagen ID.4",
                    site_id=site_of_station[bay[v][0]],
                )
                for v in vehicle_ids
            ),
        ]
        bad = [r for r in fleet.send_many(setup) if not r.ok]
        if bad:
            raise RuntimeError(f"setup refused: {bad[0].command_id}: {bad[0].reason}")
        services = DeviceServices(config, devices, relay=True).start(timeout_s=300)
        ray.get([a.subscribed.remote() for a in services.ingest], timeout=60)
        ports = services.ocpp_ports()
        say(
            f"runtime, {len(ports)} OCPP gateways, {len(services.ingest)} ingest, relay up "
            f"({vehicles_n} vehicles, {stations_n} stations registered) in "
            f"{time.perf_counter() - t0:.1f} s; mosquitto 127.0.0.1:{broker.port}"
        )
        configs = [
            ConfigureDispatcher(
                command_id=f"bench:cfg:{site}",
                issued_at=now,
                site_id=site,
                transformers=(
                    TransformerLimit(
                        transformer_id=f"{site}-t",
                        import_kw=10 * EVSE_KW * vehicles_n,
                        export_kw=10 * EVSE_KW * vehicles_n,
                    ),
                ),
                charger_timeout_s=300.0,  # stations heartbeat every 60 s
            )
            for site in sites
        ]
        dispatchers = start_timed_dispatchers(runtime, configs, period_s=1.0)
        coordinator = start_coordinator(dispatchers, period_s=1.0)
        plugged = fleet.send_many(
            [
                PlugIn(
                    command_id=f"bench:plug:{v}",
                    issued_at=datetime.now(UTC),
                    vehicle_id=v,
                    charger_id=bay[v][0],
                    charger_max_charge_kw=EVSE_KW,
                    charger_max_discharge_kw=EVSE_KW,
                )
                for v in vehicle_ids
            ]
        )
        bad = [r for r in plugged if not r.ok]
        if bad:
            raise RuntimeError(f"plug-in refused: {bad[0].command_id}: {bad[0].reason}")
        say(f"{len(sites)} dispatchers + coordinator running; {vehicles_n} vehicles plugged in")

        # --- simulators
        stations_ready = ctx.Value("q", 0)
        vehicles_ready = ctx.Value("q", 0)
        measure_from = ctx.Value("d", 0.0)
        measure_until = ctx.Value("d", 0.0)
        results = ctx.Queue()
        evses: dict[str, list[tuple[int, str]]] = {s: [] for s in station_ids}
        for v in vehicle_ids:
            s, e = bay[v]
            evses[s].append((e, token[v]))
        plan = [
            (
                s,
                passwords[s],
                devices.station_url(s, port=ports[sites.index(site_of_station[s])]),
                evses[s],
            )
            for s in station_ids
        ]
        for k in range(args.station_procs):
            procs.append(
                ctx.Process(
                    target=stations_process,
                    args=(
                        plan[k :: args.station_procs],
                        args.interval,
                        40,
                        stations_ready,
                        measure_from,
                        measure_until,
                        stop,
                        results,
                    ),
                    daemon=True,
                )
            )
        rng = random.Random(7)
        fleet_plan = [
            (v, site_of_station[bay[v][0]], round(rng.uniform(0.5, 0.8), 4)) for v in vehicle_ids
        ]
        for k in range(args.publisher_procs):
            procs.append(
                ctx.Process(
                    target=publisher_process,
                    args=(
                        broker.port,
                        fleet_plan[k :: args.publisher_procs],
                        args.interval,
                        vehicles_ready,
                        measure_from,
                        measure_until,
                        stop,
                        results,
                    ),
                    daemon=True,
                )
            )
        ramp_started = time.perf_counter()
        for p in procs:
            p.start()
        deadline = ramp_started + args.ramp_timeout
        last = (-1, -1)
        while time.perf_counter() < deadline:
            now_ready = (stations_ready.value, vehicles_ready.value)
            if now_ready != last:
                last = now_ready
                say(
                    f"ramp: stations up {now_ready[0]}/{stations_n}, vehicles reporting "
                    f"{now_ready[1]}/{vehicles_n}"
                )
            if now_ready[0] >= stations_n and now_ready[1] >= vehicles_n:
                break
            if not all(p.is_alive() for p in procs):
                raise RuntimeError("a simulator process died during the ramp")
            time.sleep(1.0)
        ramp_s = time.perf_counter() - ramp_started
        if stations_ready.value < stations_n or vehicles_ready.value < vehicles_n:
            raise RuntimeError(
                f"ramp incomplete after {ramp_s:.0f} s: stations {stations_ready.value}/"
                f"{stations_n}, vehicles {vehicles_ready.value}/{vehicles_n}"
            )
        say(f"ramp done in {ramp_s:.1f} s; the coordinator starts steering")

        # --- steering: a new fleet target every target_period seconds
        fleet_kw = EVSE_KW * vehicles_n
        targets = [0.2 * fleet_kw, -0.2 * fleet_kw, 0.1 * fleet_kw, -0.1 * fleet_kw]
        split_ms: list[float] = []

        def steer() -> None:
            k = 0
            while not steering_stop.is_set():
                started = time.perf_counter()
                with contextlib.suppress(Exception):
                    ray.get(coordinator.split.remote(targets[k % len(targets)]), timeout=30)
                split_ms.append((time.perf_counter() - started) * 1000.0)
                k += 1
                steering_stop.wait(args.target_period)

        steering = threading.Thread(target=steer, name="steering", daemon=True)
        steering.start()

        known: dict[int, str] = {}
        for kind in runtime.deciders:
            for h in runtime.hosts(kind):
                with contextlib.suppress(Exception):
                    known[ray.get(h.pid.remote(), timeout=10)] = f"host:{kind}"
        for s in ray.get([a.status.remote() for a in services.ocpp]):
            known[s["pid"]] = "gateway:ocpp"
        for s in ray.get([a.status.remote() for a in services.ingest]):
            known[s["pid"]] = "gateway:mqtt-ingest"
        known[ray.get(services.relay.status.remote())["pid"]] = "setpoint-relay"
        for d in dispatchers.values():
            known[ray.get(d.pid.remote())] = "dispatcher"
        for p in procs:
            known[p.pid] = "simulators"
        known[os.getpid()] = "bench driver"

        def progress(prefix: str) -> dict[str, Any]:
            ocpp = ray.get([a.status.remote() for a in services.ocpp])
            ingest = ray.get([a.status.remote() for a in services.ingest])
            relay = ray.get(services.relay.status.remote())
            sites_status = ray.get([d.status.remote() for d in dispatchers.values()])
            mark = fleet.watermark()
            say(
                f"{prefix}: log {mark}; stations online {sum(s['online'] for s in ocpp)}; "
                f"telemetry accepted {sum(s['accepted'] for s in ingest)}; relay sent "
                f"{relay['sent_to_chargers']} (errors {relay['errors']}); dispatch "
                f"seq {[s['decision_seq'] for s in sites_status]} halted "
                f"{[s['halted'] for s in sites_status]}"
            )
            return {"mark": mark, "relay": relay, "ingest": ingest, "ocpp": ocpp}

        warm_until = time.time() + warmup_s
        while time.time() < warm_until:
            time.sleep(min(5.0, max(0.0, warm_until - time.time())))
            progress("warm-up")
        measure_from.value = time.time()
        measure_until.value = measure_from.value + window_s
        mark_start = fleet.watermark()
        cpu_start = cpu_by_pid()
        rss_max = uss_max = 0
        while time.time() < measure_until.value:
            time.sleep(min(5.0, max(0.0, measure_until.value - time.time())))
            rss, uss = memory_now()
            rss_max, uss_max = max(rss_max, rss), max(uss_max, uss)
            progress(f"window {time.time() - measure_from.value:4.0f}/{window_s:.0f} s")
        mark_end = fleet.watermark()
        cpu_end = cpu_by_pid()
        load = os.getloadavg()
        window_end = time.time()
        cpu_by: Counter[str] = Counter()
        for proc in process_tree():
            if proc.pid in cpu_end:
                cpu_by[label_of(proc, known)] += (
                    cpu_end[proc.pid][1] - cpu_start.get(proc.pid, ("", 0.0))[1]
                )
        cycles = [
            c
            for d in dispatchers.values()
            for c in ray.get(d.cycle_log.remote())
            if measure_from.value <= c[0] < window_end
        ]
        say(f"window done: {mark_end - mark_start} events in {window_s:.0f} s; stopping simulators")

        # --- stop the simulators, drain, and count from both ends
        steering_stop.set()
        stop.value = 1
        outcomes = []
        for _ in procs:
            outcomes.append(results.get(timeout=90))
        for p in procs:
            p.join(timeout=15)
        stations_out = [o for o in outcomes if o["kind"] == "stations"]
        publishers_out = [o for o in outcomes if o["kind"] == "publisher"]
        published = [x for o in publishers_out for x in o["sent"]]
        drain_until = time.time() + 60
        while time.time() < drain_until:
            ingest = ray.get([a.status.remote() for a in services.ingest])
            handled = sum(
                s["accepted"] + s["duplicates"] + sum(s["rejected"].values()) for s in ingest
            )
            if handled >= len(published):
                break
            time.sleep(0.5)
        ray.get(services.relay.wait_relayed.remote(fleet.watermark(), 20.0), timeout=30)
        final = progress("drained")
        table = ray.get(runtime.log.read_all.remote(1, None, ["type", "command_id", "payload"]))
        types = table.column("type").to_pylist()
        command_ids = table.column("command_id").to_pylist()
        type_counts = Counter(types)
        logged_meter = {
            c for t, c in zip(types, command_ids, strict=True) if t == "ChargerMeterValuesRecorded"
        }
        payloads = table.column("payload").to_pylist()
        setpoint_rejections = Counter(
            f"{json.loads(payloads[i]).get('reason')}: {json.loads(payloads[i]).get('detail')}"
            for i, t in enumerate(types)
            if t == "ChargerSetpointRejected"
        )
        logged_telemetry = set()
        for t, cid in zip(types, command_ids, strict=True):
            if t == "VehicleTelemetryReported":  # telemetry:<vehicle>:<measured_at>:<seq>
                logged_telemetry.add(f"{cid.split(':', 2)[1]}:{cid.rsplit(':', 1)[1]}")

        sent_meter = [x for o in stations_out for x in o["sent_meter"]]
        answered = {x for o in stations_out for x in o["answered"]}
        unanswered = Counter[str]()
        errors = Counter[str]()
        for o in outcomes:
            errors.update(o["errors"])
        for o in stations_out:
            unanswered.update(o["unanswered"])
        meter_not_logged = sum(1 for x in sent_meter if x in answered and x not in logged_meter)
        telemetry_not_logged = sum(1 for x in published if x not in logged_telemetry)
        ocpp_unanswered = sum(unanswered.values())
        dropped = ocpp_unanswered + meter_not_logged + telemetry_not_logged
        latencies = [x for o in stations_out for x in o["latencies_ms"]]
        puback = [x for o in publishers_out for x in o["puback_ms"]]
        cycle_ms = [c[1] for c in cycles]
        rejected_telemetry = {k: v for s in final["ingest"] for k, v in s["rejected"].items() if v}
        figures |= {
            "bench": "system",
            "quick": args.quick,
            "vehicles": vehicles_n,
            "stations": stations_n,
            "evses_per_station": 2,
            "sites": len(sites),
            "ocpp_gateways": len(ports),
            "ingest_actors": len(services.ingest),
            "station_processes": args.station_procs,
            "publisher_processes": args.publisher_procs,
            "interval_s": args.interval,
            "target_period_s": args.target_period,
            "ramp_s": round(ramp_s, 1),
            "warmup_s": warmup_s,
            "window_s": window_s,
            "events_per_s": round((mark_end - mark_start) / window_s, 1),
            "events_in_window": mark_end - mark_start,
            "command_p50_ms": _pct(latencies, 0.50),
            "command_p99_ms": _pct(latencies, 0.99),
            "command_max_ms": round(max(latencies), 2) if latencies else None,
            "command_what": "OCPP station message (MeterValues, Heartbeat) sent -> its "
            "CallResult at the station; answered after the log fsync",
            "commands_measured": len(latencies),
            # the broker's PUBACK to the publisher (the ingest acknowledges its own
            # delivery only after the log recorded it; that is not visible to the device)
            "telemetry_puback_p99_ms": _pct(puback, 0.99),
            "telemetry_measured": len(puback),
            "dispatch_cycle_p50_ms": _pct(cycle_ms, 0.50),
            "dispatch_cycle_p99_ms": _pct(cycle_ms, 0.99),
            "dispatch_cycle_max_ms": round(max(cycle_ms), 1) if cycle_ms else None,
            "dispatch_cycles": len(cycle_ms),
            # ticks that sent vehicle commands (setpoints, lease renewals) vs. ticks that
            # only read and decided
            "dispatch_cycle_p99_ms_acting": _pct([c[1] for c in cycles if c[2]], 0.99),
            "dispatch_cycle_p99_ms_quiet": _pct([c[1] for c in cycles if not c[2]], 0.99),
            "dispatch_vehicle_commands_in_window": sum(c[2] for c in cycles),
            "dispatch_vehicle_commands_accepted": sum(c[3] for c in cycles),
            "coordinator_split_p99_ms": _pct(split_ms, 0.99),
            "rss_mib_total": round(rss_max / MIB, 1),
            "uss_mib_total": round(uss_max / MIB, 1),
            "processes": len(process_tree()),
            "dropped": dropped,
            "dropped_detail": {
                "ocpp_calls_without_callresult": dict(unanswered),
                "meter_values_answered_not_in_log": meter_not_logged,
                "telemetry_puback_not_in_log": telemetry_not_logged,
            },
            "sent": {
                "ocpp_calls": sum(o["calls"] for o in stations_out),
                "meter_values": len(sent_meter),
                "telemetry": len(published),
            },
            "received_from_csms": dict(
                sum((Counter(o["calls_from_csms"]) for o in stations_out), Counter())
            ),
            "relay": {
                k: final["relay"][k]
                for k in ("sent_to_chargers", "skipped_expired", "unroutable", "errors")
            },
            "station_setpoints_rejected": dict(setpoint_rejections.most_common(5)),
            "telemetry_rejected": rejected_telemetry,
            "errors": dict(errors),
            "events_by_type": dict(type_counts.most_common(16)),
            "cpu_cores_used": round(sum(cpu_by.values()) / window_s, 2),
            "cpu_s_by_component": {k: round(v, 1) for k, v in cpu_by.most_common()},
            "load_average": [round(x, 2) for x in load],
            "cpus": os.cpu_count(),
            "targets": {
                "command_p99_ms": 100,
                "dispatch_cycle_p99_ms": 1000,
                "rss_mib_total": 8192,
                "dropped": 0,
            },
        }
    finally:
        signal.alarm(0)
        steering_stop.set()
        stop.value = 1
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        with contextlib.suppress(Exception):
            import ray

            from cluster.dispatcher import stop_all

            if dispatchers or coordinator is not None:
                stop_all(dispatchers, coordinator)
        if services is not None:
            with contextlib.suppress(Exception):
                services.stop()
        if runtime is not None:
            with contextlib.suppress(Exception):
                runtime.stop()
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        if broker is not None:
            broker.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    # after Ray is down: its processes print warnings to stdout; this must be the last line
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
