"""Bench: many OCPP 2.1 stations against the CSMS gateway actors, through Ray into the log.

One bounded run on a local Ray it starts itself:

1. the runtime (log, host shards) and `--gateways` CSMS gateway actors start; the
   gateways register `--stations` chargers from a generated device config;
2. `--sim-processes` simulator processes open the stations' WebSockets (HTTP Basic
   auth, subprotocol `ocpp2.1`) at a bounded handshake rate, each station sends a
   BootNotification, then a MeterValues every `--interval` seconds (phases spread);
3. once every station is connected, latencies are measured for `--measure` seconds:
   station send -> CallResult received, which includes the gateway's parsing and
   schema validation, the commands' trip through Ray to the charger shards, the
   log's fsync, and the answer.

The simulated stations are deliberately light (raw OCPP-J frames over `websockets`,
one coroutine per station, no schema validation on the station side): they stand in
for thousands of real stations on two shared cores.

Figures: `stations` (connected when the measurement ended), `p50/p99_handling_ms`
(each station's MeterValues send -> its CallResult received), `mib_per_station` (RSS
of the gateway actors / stations), `meter_values_per_s`, and `cpu_ms_per_meter_value`:
the CPU of every process of the run while measuring (the station simulators, the
gateways, hosts and log, and Ray's own processes) over the meter values answered,
also split by role (`cpu_ms_per_meter_value_by_role`), since on one machine the
simulated stations' CPU is taken from the system under test.
Progress goes to stderr; the last line on stdout is one JSON object.

    python scripts/bench_ocpp.py [--stations 10000] [--gateways 4] [--sim-processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

MIB = 1024 * 1024


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1_048_576
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# What a process is, by its command line: Ray names an actor's process after its class.
_ROLES = (
    ("OcppGatewayService", "gateways"),
    ("HostService", "hosts"),
    ("LogService", "log"),
    ("multiprocessing", "stations"),
)


def _role(cmdline: str) -> str:
    return next((role for key, role in _ROLES if key in cmdline), "ray_and_driver")


def cpu_seconds_by_role(root_pid: int) -> dict[int, tuple[str, float]]:
    """CPU time (user + system) of a process and all its descendants (Ray's workers
    and the station simulators too), per process id with the process's role."""
    import psutil

    root = psutil.Process(root_pid)
    seconds: dict[int, tuple[str, float]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            role = "ray_and_driver" if proc.pid == root_pid else _role(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
        seconds[proc.pid] = (role, times.user + times.system)
    return seconds


def cpu_used_by_role(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds spent between two samples, per role (processes alive at both)."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        if pid in before:
            used[role] = used.get(role, 0.0) + seconds - before[pid][1]
    return used


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- simulator process -----------------------------------------------------------


def simulate(
    stations: list[tuple[str, str, str]],
    interval_s: float,
    handshakes_in_flight: int,
    connected: Any,
    measure_from: Any,
    measure_until: Any,
    stop: Any,
    results: Any,
) -> None:
    """Run `stations` (id, password, url) in one process; report latencies at the end."""
    raise_open_files_limit()
    # Ray runs its workers (the gateways among them) at niceness 15; the stations stand
    # in for devices outside this machine, so they must not get a better share of it.
    os.nice(max(0, 15 - os.nice(0)))
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    from websockets.asyncio.client import connect
    from websockets.headers import build_authorization_basic

    latencies_ms: list[float] = []
    errors: dict[str, int] = {}
    sent = 0

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def call(ws: Any, action: str, payload: dict[str, Any], uid: str) -> float:
        started = time.perf_counter()
        await ws.send(json.dumps([2, uid, action, payload]))
        while True:
            frame = json.loads(await ws.recv())
            if frame[0] == 2:  # a call from the CSMS: not part of this bench
                await ws.send(json.dumps([4, frame[1], "NotImplemented", "", {}]))
                continue
            if frame[1] != uid:
                continue
            if frame[0] == 4:
                error(f"CallError {frame[2]}")
            return (time.perf_counter() - started) * 1000.0

    async def station(station_id: str, password: str, url: str, gate: asyncio.Semaphore) -> None:
        nonlocal sent
        async with gate:
            try:
                ws = await connect(
                    f"{url}/{station_id}",
                    subprotocols=["ocpp2.1"],  # type: ignore[list-item]
                    additional_headers={
                        "Authorization": build_authorization_basic(station_id, password)
                    },
                    compression=None,
                    open_timeout=120,
                    ping_interval=None,
                    max_queue=4,
                )
                boot = {
                    "chargingStation": {"model": "BenchCharger", "vendorName": "v2gfleet"},
                    "reason": "PowerUp",
                }
                await call(ws, "BootNotification", boot, f"{station_id}-boot")
            except Exception as exc:
                error(f"connect {type(exc).__name__}")
                return
        with connected.get_lock():
            connected.value += 1
        loop = asyncio.get_running_loop()
        next_at = loop.time() + random.uniform(0, interval_s)
        energy_wh = 0.0
        n = 0
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                next_at += interval_s
                energy_wh += 7400.0 * interval_s / 3600.0
                n += 1
                payload = {
                    "evseId": 1,
                    "meterValue": [
                        {
                            "timestamp": _now_iso(),
                            "sampledValue": [
                                {
                                    "value": 7400.0,
                                    "measurand": "Power.Active.Import",
                                    "unitOfMeasure": {"unit": "W"},
                                },
                                {
                                    "value": round(energy_wh, 1),
                                    "measurand": "Energy.Active.Import.Register",
                                    "unitOfMeasure": {"unit": "Wh"},
                                },
                            ],
                        }
                    ],
                }
                sent_at = time.time()
                latency = await call(ws, "MeterValues", payload, f"{station_id}-mv-{n}")
                if measure_from.value and measure_from.value <= sent_at < measure_until.value:
                    latencies_ms.append(latency)
                    sent += 1
                if stop.value:
                    break
        except Exception as exc:
            error(f"session {type(exc).__name__}")
            with connected.get_lock():
                connected.value -= 1
        finally:
            await ws.close()

    async def main() -> None:
        gate = asyncio.Semaphore(handshakes_in_flight)
        await asyncio.gather(*(station(s, p, u, gate) for s, p, u in stations))

    asyncio.run(main())
    import psutil

    rss = psutil.Process().memory_info().rss
    results.put({"latencies_ms": latencies_ms, "errors": errors, "sent": sent, "rss": rss})


# --- the run -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=10_000)
    parser.add_argument("--gateways", type=int, default=4, help="CSMS gateway actors")
    parser.add_argument("--sim-processes", type=int, default=4)
    parser.add_argument("--interval", type=float, default=10.0, help="MeterValues period, s")
    parser.add_argument("--measure", type=float, default=60.0, help="seconds at full count")
    parser.add_argument("--ramp-timeout", type=float, default=300.0)
    parser.add_argument("--handshakes", type=int, default=40, help="in flight per process")
    parser.add_argument("--charger-shards", type=int, default=2)
    args = parser.parse_args()

    def say(text: str) -> None:
        print(f"bench_ocpp: {text}", file=sys.stderr, flush=True)

    limit = raise_open_files_limit()
    say(f"open files limit {limit}")

    import ray

    from cluster.device_config import DeviceConfig, OcppSettings, StationConfig
    from cluster.gateways import DeviceServices
    from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig

    data_dir = tempfile.mkdtemp(prefix="v2g-bench-ocpp-")
    stations = [
        StationConfig(
            station_id=f"BS{i:05d}",
            password=f"pw-{i:05d}-bench",
            site_id=f"site-{i % 20:02d}",
            max_charge_kw=11,
            max_discharge_kw=11,
            gateway=i % args.gateways,
        )
        for i in range(args.stations)
    ]
    devices = DeviceConfig(
        ocpp=OcppSettings(
            port=0, gateways=args.gateways, heartbeat_interval_s=3600, offline_grace_s=600
        ),
        stations=tuple(stations),
    )
    config = RuntimeConfig(
        name="benchocpp",
        data_dir=data_dir,
        num_cpus=2,
        shards={"charger": args.charger_shards, "vehicle": 1},
    )
    # address="local": a Ray of our own, even if another one runs on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace=NAMESPACE,
        log_to_driver=False,
    )
    started = time.perf_counter()
    runtime = Runtime(config).start()
    services = DeviceServices(config, devices, relay=False).start(timeout_s=600)
    ports = services.ocpp_ports()
    say(
        f"runtime and {len(ports)} gateway actors up, {args.stations} chargers registered in "
        f"{time.perf_counter() - started:.1f} s; ports {ports}"
    )
    ctx = mp.get_context("spawn")
    connected = ctx.Value("q", 0)
    measure_from = ctx.Value("d", 0.0)
    measure_until = ctx.Value("d", 0.0)
    stop = ctx.Value("b", 0)
    results = ctx.Queue()
    plan = [
        (s.station_id, s.secret(), devices.station_url(s.station_id, port=ports[s.gateway or 0]))
        for s in stations
    ]
    procs = [
        ctx.Process(
            target=simulate,
            args=(
                plan[k :: args.sim_processes],
                args.interval,
                args.handshakes,
                connected,
                measure_from,
                measure_until,
                stop,
                results,
            ),
        )
        for k in range(args.sim_processes)
    ]
    ramp_started = time.perf_counter()
    for p in procs:
        p.start()
    deadline = ramp_started + args.ramp_timeout
    last = -1
    while connected.value < args.stations and time.perf_counter() < deadline:
        time.sleep(2)
        if connected.value != last:
            last = connected.value
            say(f"connected {last}/{args.stations}")
        if not any(p.is_alive() for p in procs):
            break
    ramp_s = time.perf_counter() - ramp_started
    at_full = connected.value
    say(f"ramp: {at_full} stations in {ramp_s:.1f} s; measuring {args.measure:.0f} s")
    measure_from.value = time.time() + args.interval  # every station's cycle under way
    measure_until.value = measure_from.value + args.measure
    time.sleep(max(0.0, measure_from.value - time.time()))
    cpu_at_start = cpu_seconds_by_role(os.getpid())
    while time.time() < measure_until.value:
        time.sleep(min(5.0, max(0.0, measure_until.value - time.time())))
        status = ray.get([a.status.remote() for a in services.ocpp])
        say(
            f"connected {connected.value}; gateways see "
            f"{sum(s['connected'] for s in status)}; sink calls "
            f"{sum(s['sink_calls'] for s in status)}"
        )
    cpu_by_role = cpu_used_by_role(cpu_at_start, cpu_seconds_by_role(os.getpid()))
    cpu_used = sum(cpu_by_role.values())
    load_1m = os.getloadavg()[0]
    status = ray.get([a.status.remote() for a in services.ocpp])
    gateway_rss = sum(s["rss_bytes"] for s in status)
    stations_connected = sum(s["connected"] for s in status)
    stop.value = 1  # sampled at full count: the stations may stop now
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    latencies = sorted(x for o in outcomes for x in o["latencies_ms"])
    errors: dict[str, int] = {}
    for o in outcomes:
        for kind, n in o["errors"].items():
            errors[kind] = errors.get(kind, 0) + n

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    watermark = ray.get(runtime.log.watermark.remote())
    services.stop()
    runtime.stop()
    ray.shutdown()
    shutil.rmtree(data_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "ocpp_gateways",
                "stations_target": args.stations,
                "stations": stations_connected,
                "stations_at_ramp_end": at_full,
                "gateway_actors": len(ports),
                "sim_processes": args.sim_processes,
                "interval_s": args.interval,
                "measure_s": args.measure,
                "ramp_s": round(ramp_s, 1),
                "meter_values_measured": len(latencies),
                "meter_values_per_s": round(len(latencies) / args.measure, 1),
                "p50_handling_ms": pct(0.50) if latencies else None,
                "p99_handling_ms": pct(0.99) if latencies else None,
                "max_handling_ms": round(latencies[-1], 2) if latencies else None,
                "target_p99_ms": 250,
                "gateway_rss_mib": round(gateway_rss / MIB, 1),
                "mib_per_station": round(gateway_rss / MIB / max(1, stations_connected), 4),
                "simulator_rss_mib": round(sum(o["rss"] for o in outcomes) / MIB, 1),
                "errors": errors,
                # our processes (stations, gateways, hosts, log, Ray) while measuring
                "cpu_cores_used": round(cpu_used / args.measure, 2),
                "cpu_ms_per_meter_value": round(cpu_used * 1000 / max(1, len(latencies)), 3),
                "cpu_ms_per_meter_value_by_role": {
                    role: round(seconds * 1000 / max(1, len(latencies)), 3)
                    for role, seconds in sorted(cpu_by_role.items())
                },
                "load_average_1m": round(load_1m, 1),
                "log_events": watermark,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
