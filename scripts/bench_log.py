"""Benchmark the event log and the hosts: `scripts/bench log [--quick]`.

Prints progress, then as its last line one JSON object:

- raw_write_events_per_s: the same events, already columnar, written with pyarrow
  (Parquet, one fsync per 10,000 events) and nothing else: the machine's baseline.
- raw_write_events_per_s_fsync_per_batch: the same, with the durability contract of
  the log's acknowledgements: one Parquet file and one fsync per 1,000-event batch.
  The ratio_*_fsync_per_batch figures compare with this one.
- append_events_per_s_direct: `EventLog.append_batch` in-process, 4 threads each
  appending pre-built 1,000-event batches (group commit, fsync, hash chain).
- append_p99_ack_ms: p99 of those appends' time to acknowledgement.
- append_events_per_s_via_ray: `ReportTelemetry` commands through the client in
  batches of 1,000, routed to 2 host shards (each share packed as a
  `ReportTelemetryBatch` and judged by the vehicle's columnar twin), appended by the
  log actor (the whole command path: packing, deciding, hashing, fsync).
  cpu_us_per_command_{hosts,log,client}: the CPU each side spent on it, per command.
- log_append_events_per_s_via_ray: the log actor alone through Ray: 2 sender
  actors send pre-built 1,000-event pending batches, encoded as hosts send them
  (`encode_pending`, in the timed loop), each with 2 batches in flight. With four
  batches in flight in all, the log actor waits between rounds (it used ~0.7 of a
  core): this figure is bound by the round trip, not by the log.
- log_append_events_per_s_via_ray_8_in_flight (and its p99 ack): the same with 8
  batches in flight per sender, as when many hosts append at once: what the log
  actor itself can take.
- command_batch_p99_ms_via_ray: p99 round trip of one such batch.
- hosted_vehicles, host_rss_mib: 10,000 registered, plugged-in vehicles with
  telemetry, and the resident memory of all host actors together.
- recovery_s: the vehicle hosts restarted on a log of 1,000,000 events for 10,000
  vehicles, as after a crash: from their last automatic snapshot plus the 50,000
  events after it; recovery_s_full_replay the same from no snapshot at all;
  log_open_s the log alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.vehicle import VEHICLE, PlugIn, RegisterVehicle, ReportTelemetry
from cluster.client import FleetClient
from cluster.runtime import Runtime, RuntimeConfig
from events.log import EventLog
from events.schema import RECORD_SCHEMA, PendingBatchBuilder, encode_pending
from events.vehicle import VehicleTelemetryReported

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def say(msg: str) -> None:
    print(msg, flush=True)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def telemetry_batches(
    n_events: int, n_vehicles: int, batch: int, first_vehicle: int = 0, first_round: int = 0
) -> list[pa.RecordBatch]:
    """Pending batches of TelemetryReported events, round-robin over vehicles.

    Round r is every vehicle's r-th reading (stream version r + 3, after
    VehicleRegistered and VehiclePluggedIn); `first_round` continues a log.
    """
    out = []
    builder = PendingBatchBuilder()
    for i in range(n_events):
        v = first_vehicle + i % n_vehicles
        rnd = first_round + i // n_vehicles
        version = rnd + 3
        at = T0 + timedelta(seconds=10 * rnd)
        event = VehicleTelemetryReported(
            vehicle_id=f"v{v}",
            at=at,
            measured_at=at,
            soc=0.5,
            battery_temp_c=25.0,
            soh=0.97,
            source="simulator",
        )
        builder.add(
            f"vehicle-v{v}",
            version,
            f"tel-{v}-{version}/0",
            "VehicleTelemetryReported",
            VehicleTelemetryReported.schema_version,
            at,
            f"tel-{v}-{version}",
            "",
            event.model_dump_json(),
        )
        if len(builder) == batch:
            out.append(builder.build())
            builder = PendingBatchBuilder()
    if len(builder):
        out.append(builder.build())
    return out


def setup_batches(n_vehicles: int) -> list[pa.RecordBatch]:
    """Register and plug in every vehicle, as pending batches (versions 1 and 2)."""
    out = []
    builder = PendingBatchBuilder()
    for v in range(n_vehicles):
        state = VEHICLE.initial_state(f"v{v}")
        for k, command in enumerate(setup_commands(v)):
            [event] = VEHICLE.decide(command, state)
            state = VEHICLE.evolve(state, event)
            builder.add(
                f"vehicle-v{v}",
                k + 1,
                f"{command.command_id}/0",
                event.type_name(),
                event.schema_version,
                T0,
                command.command_id,
                "",
                event.model_dump_json(),
            )
        if len(builder) >= 1000:
            out.append(builder.build())
            builder = PendingBatchBuilder()
    if len(builder):
        out.append(builder.build())
    return out


def setup_commands(v: int) -> list:
    return [
        RegisterVehicle(
            command_id=f"reg-v{v}",
            issued_at=T0,
            vehicle_id=f"v{v}",
            model="Volkswagen ID.4",
            site_id=f"depot-{v % 10}",
        ),
        PlugIn(
            command_id=f"plug-v{v}",
            issued_at=T0,
            vehicle_id=f"v{v}",
            charger_id=f"cp-{v}",
            charger_max_charge_kw=11.0,
            charger_max_discharge_kw=11.0,
        ),
    ]


def bench_raw(batches: list[pa.RecordBatch], folder: str, chunk: int = 10) -> float:
    """Baseline: the same events as final records, Parquet + fsync, no log logic.

    One file and one fsync per `chunk` batches.
    """
    records = []
    for b in batches:
        n = b.num_rows
        cols = {
            "position": pa.array(range(n), pa.int64()),
            "partition": pa.array([0] * n, pa.int32()),
            "prev_hash": pa.array([b"\0" * 32] * n, pa.binary(32)),
            "hash": pa.array([b"\1" * 32] * n, pa.binary(32)),
        }
        arrays = [cols[f.name] if f.name in cols else b.column(f.name) for f in RECORD_SCHEMA]
        records.append(pa.RecordBatch.from_arrays(arrays, schema=RECORD_SCHEMA))
    total = sum(r.num_rows for r in records)
    t = time.perf_counter()
    for k in range(0, len(records), chunk):
        path = os.path.join(folder, f"raw-{chunk}-{k}.parquet")
        pq.write_table(pa.Table.from_batches(records[k : k + chunk]), path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return total / (time.perf_counter() - t)


def bench_direct(per_thread: list[list[pa.RecordBatch]], folder: str) -> tuple[float, float]:
    """Each thread appends the streams of its own vehicles, so versions never conflict."""
    latencies: list[float] = []
    with EventLog(os.path.join(folder, "direct"), partitions=4) as log:
        for b in setup_batches(1000 * len(per_thread)):
            log.append_batch(b)
        lock = threading.Lock()

        def run(part: list[pa.RecordBatch]) -> None:
            for b in part:
                t = time.perf_counter()
                log.append_batch(b)
                with lock:
                    latencies.append((time.perf_counter() - t) * 1000)

        t = time.perf_counter()
        with ThreadPoolExecutor(len(per_thread)) as pool:
            list(pool.map(run, per_thread))
        elapsed = time.perf_counter() - t
    total = sum(b.num_rows for part in per_thread for b in part)
    return total / elapsed, p99(latencies)


def cpu_s(processes: list[psutil.Process]) -> float:
    """CPU seconds (user + system, every thread) of these processes so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def rss_mib(pids: list[int]) -> float:
    return sum(psutil.Process(p).memory_info().rss for p in pids) / 2**20


def bench_via_ray(n_vehicles: int, n_events: int, folder: str) -> dict[str, float]:
    config = RuntimeConfig(name="bench", data_dir=os.path.join(folder, "ray"))
    client = FleetClient(Runtime(config, deciders=[VEHICLE]).start(), owns_ray=False)
    try:
        say(f"  registering {n_vehicles} vehicles through Ray")
        setup = [c for v in range(n_vehicles) for c in setup_commands(v)]
        for k in range(0, len(setup), 1000):
            assert all(r.ok for r in client.send_many(setup[k : k + 1000]))
        commands = [
            ReportTelemetry(
                command_id=f"t-{i}",
                issued_at=T0 + timedelta(seconds=10 * (i // n_vehicles) + 1),
                vehicle_id=f"v{i % n_vehicles}",
                measured_at=T0 + timedelta(seconds=10 * (i // n_vehicles) + 1),
                soc=0.5 + 0.001 * (i // n_vehicles % 100),
                battery_temp_c=25.0,
                soh=0.97,
            )
            for i in range(n_events)
        ]
        batches = [commands[k : k + 1000] for k in range(0, len(commands), 1000)]
        say(f"  sending {n_events} telemetry commands in {len(batches)} batches")
        latencies: list[float] = []
        lock = threading.Lock()

        def run(part: list[list[ReportTelemetry]]) -> None:
            for b in part:
                t = time.perf_counter()
                results = client.send_many(b)
                with lock:
                    latencies.append((time.perf_counter() - t) * 1000)
                assert all(r.status == "recorded" for r in results), results[0]

        # A round is one reading per vehicle: its batches touch disjoint vehicles and
        # go out concurrently (pipelined); rounds follow each other, so every
        # vehicle's readings arrive in time order.
        per_round = max(1, n_vehicles // 1000)
        rounds = [batches[k : k + per_round] for k in range(0, len(batches), per_round)]
        hosts = client.runtime.hosts("vehicle")
        pids = ray.get([h.pid.remote() for h in hosts])
        sides = {
            "hosts": [psutil.Process(p) for p in pids],
            "log": [psutil.Process(ray.get(client.runtime.log.pid.remote()))],
            "client": [psutil.Process()],
        }
        cpu0 = {side: cpu_s(procs) for side, procs in sides.items()}
        t = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            for rnd in rounds:
                list(pool.map(run, [[b] for b in rnd]))
        elapsed = time.perf_counter() - t
        cpu_us = {
            f"cpu_us_per_command_{side}": (cpu_s(procs) - cpu0[side]) / n_events * 1e6
            for side, procs in sides.items()
        }
        hosted = sum(ray.get([h.entity_count.remote() for h in hosts]))
        return {
            "append_events_per_s_via_ray": n_events / elapsed,
            "command_batch_p99_ms_via_ray": p99(latencies),
            **cpu_us,
            "hosted_vehicles": hosted,
            "host_rss_mib": rss_mib(pids),
        }
    finally:
        client.close()


class _Sender:
    """Sends pre-built pending batches to the log actor, as a host would."""

    def __init__(self, log: object, batches: list[pa.RecordBatch]) -> None:
        self.log = log
        self.batches = batches

    def run(self, in_flight: int = 2) -> list[float]:
        latencies = []
        pending: list[tuple[float, object]] = []
        for b in self.batches:
            started = time.perf_counter()
            ref = self.log.append_batch.remote(encode_pending(b))  # type: ignore[attr-defined]
            pending.append((started, ref))
            if len(pending) >= in_flight:
                started, ref = pending.pop(0)
                ray.get(ref)
                latencies.append((time.perf_counter() - started) * 1000)
        for started, ref in pending:
            ray.get(ref)
            latencies.append((time.perf_counter() - started) * 1000)
        return latencies


def bench_log_via_ray(
    per_sender: list[list[pa.RecordBatch]], folder: str, in_flight: int = 2
) -> dict[str, float]:
    from cluster.runtime import LogService

    log = (
        ray.remote(LogService)
        .options(max_concurrency=64)
        .remote(os.path.join(folder, f"log-ray-{in_flight}"), 4, 100_000)
    )
    for b in setup_batches(1000 * len(per_sender)):
        ray.get(log.append_batch.remote(b))
    sender_cls = ray.remote(_Sender)
    senders = [sender_cls.remote(log, batches) for batches in per_sender]
    ray.get([s.__ray_ready__.remote() for s in senders])
    t = time.perf_counter()
    runs = [s.run.remote(in_flight) for s in senders]
    latencies = [x for part in ray.get(runs) for x in part]
    elapsed = time.perf_counter() - t
    total = sum(b.num_rows for part in per_sender for b in part)
    for s in senders:
        ray.kill(s)
    ray.kill(log)
    suffix = "" if in_flight == 2 else f"_{in_flight}_in_flight"
    return {
        f"log_append_events_per_s_via_ray{suffix}": total / elapsed,
        f"log_append_p99_ack_ms_via_ray{suffix}": p99(latencies),
    }


def bench_recovery(n_vehicles: int, n_events: int, folder: str) -> dict[str, float]:
    """Restart a system on a big log: from nothing, then as after a crash.

    Hosts snapshot every 50,000 events they append (`EntityHost.snapshot_every`),
    so after a crash a shard folds its snapshot plus at most that many events. The
    crash case is measured with a snapshot and then 50,000 more events after it.
    """
    root = os.path.join(folder, "recovery")
    log_dir = os.path.join(root, "log")
    say(f"  writing {n_events} events for {n_vehicles} vehicles")
    rounds = (n_events - 2 * n_vehicles) // n_vehicles
    with EventLog(log_dir, partitions=4) as log:
        for b in setup_batches(n_vehicles):
            log.append_batch(b)
        for b in telemetry_batches(rounds * n_vehicles, n_vehicles, 10_000):
            log.append_batch(b)
        log.flush_seals()
    figures: dict[str, float] = {}
    t = time.perf_counter()
    EventLog(log_dir).close()
    figures["log_open_s"] = time.perf_counter() - t

    def restart(label: str) -> list[object]:
        say(f"  {label}: starting the vehicle hosts on the log")
        t = time.perf_counter()
        config = RuntimeConfig(name=f"rec{len(figures)}", data_dir=root)
        runtime = Runtime(config, deciders=[VEHICLE]).start()
        figures[label] = time.perf_counter() - t
        hosts = runtime.hosts("vehicle")
        counted = sum(ray.get([h.entity_count.remote() for h in hosts]))
        if counted != n_vehicles:
            raise SystemExit(f"recovered {counted} vehicles, expected {n_vehicles}")
        ray.get([h.snapshot.remote() for h in hosts])
        runtime.stop()
        return hosts

    restart("recovery_s_full_replay")
    tail = min(50_000, n_events // 10)
    with EventLog(log_dir) as log:
        for b in telemetry_batches(tail, n_vehicles, 10_000, first_round=rounds):
            log.append_batch(b)
    restart("recovery_s")
    figures["recovery_tail_events"] = tail
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    args = parser.parse_args()
    n_vehicles = 1_000 if args.quick else 10_000
    n_append = 100_000 if args.quick else 1_000_000
    n_ray = 50_000 if args.quick else 300_000
    n_recovery = 100_000 if args.quick else 1_000_000
    folder = tempfile.mkdtemp(prefix="v2g-bench-log-")
    figures: dict[str, float] = {}
    try:
        say(f"building {n_append} pending events")
        threads = 4
        per_thread = [
            telemetry_batches(n_append // threads, 1000, 1000, first_vehicle=1000 * k)
            for k in range(threads)
        ]
        say("raw pyarrow write + fsync (baseline)")
        every_batch = [b for part in per_thread for b in part]
        figures["raw_write_events_per_s"] = bench_raw(every_batch, folder)
        say("raw pyarrow write, one fsync per 1,000-event batch (the log's ack contract)")
        figures["raw_write_events_per_s_fsync_per_batch"] = bench_raw(every_batch, folder, chunk=1)
        say("direct appends, 4 threads, 1,000-event batches")
        rate, ack = bench_direct(per_thread, folder)
        figures["append_events_per_s_direct"] = rate
        figures["append_p99_ack_ms"] = ack
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace="v2gfleet",
            log_to_driver=False,
        )
        say("the log actor through Ray: 2 senders, pre-built 1,000-event batches")
        figures.update(bench_log_via_ray(per_thread[:2], folder))
        figures["ratio_log_via_ray_to_raw"] = (
            figures["log_append_events_per_s_via_ray"] / figures["raw_write_events_per_s"]
        )
        figures["ratio_log_via_ray_to_raw_fsync_per_batch"] = (
            figures["log_append_events_per_s_via_ray"]
            / figures["raw_write_events_per_s_fsync_per_batch"]
        )
        say("the same with 8 batches in flight per sender: the log actor's own limit")
        figures.update(bench_log_via_ray(per_thread[:2], folder, in_flight=8))
        figures["ratio_log_via_ray_8_in_flight_to_raw"] = (
            figures["log_append_events_per_s_via_ray_8_in_flight"]
            / figures["raw_write_events_per_s"]
        )
        say("through Ray: client → 2 host shards → log actor")
        figures.update(bench_via_ray(n_vehicles, n_ray, folder))
        figures["ratio_via_ray_to_raw"] = (
            figures["append_events_per_s_via_ray"] / figures["raw_write_events_per_s"]
        )
        figures["ratio_via_ray_to_raw_fsync_per_batch"] = (
            figures["append_events_per_s_via_ray"]
            / figures["raw_write_events_per_s_fsync_per_batch"]
        )
        say("recovery")
        figures.update(bench_recovery(n_vehicles, n_recovery, folder))
        figures["load_average_1m"] = os.getloadavg()[0]
        figures["recovery_events"] = n_recovery
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    for k, v in figures.items():
        say(f"  {k}: {v:,.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
