"""Benchmark the projections: rebuild rate, a plain Python fold, live lag, Monte Carlo.

Usage: python scripts/bench_projections.py [--quick] [--events N] [--keep DIR]

Builds a real log (EventLog.append_batch with large columnar batches, checked by
verify_log in --quick runs) of vehicle telemetry, metered energy, setpoints and charger
meter values for a fleet, with hourly day-ahead prices, then measures:

  rebuild_events_per_s      every projection from position 0 (projections.replay)
  python_fold_events_per_s  a per-event Python loop computing the arbitrage revenue
                            over the same events (json.loads per event)
  rebuild_to_python_fold    their ratio (wall clock)
  rebuild_to_python_fold_cpu  the same ratio in CPU seconds of this process (the
                            rebuild's DuckDB threads included), which other work on a
                            shared machine disturbs less
  incremental_lag_ms_p99    appends at 10,000 events/s for ~20 s while a runner
                            follows the folder; lag from an append's acknowledgement
                            to the runner's commit that includes it
  monte_carlo_10k_ms        projections.roi.monte_carlo, 10,000 iterations

Progress goes to stderr-like lines on stdout; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from events.log import EventLog
from events.schema import PENDING_SCHEMA, PendingBatchBuilder, micros
from events.verify import verify_log

START = datetime(2024, 6, 1, tzinfo=UTC)
TICK_S = 900  # one 15-minute interval per tick
SEP = "\x1f"


def say(msg: str) -> None:
    print(f"[bench_projections] {msg}", flush=True)


def _s(values: np.ndarray | pa.Array) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _join(*parts: object) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


class Generator:
    """Columnar PENDING_SCHEMA batches; one command (and event) per row."""

    def __init__(self, vehicles: int) -> None:
        self.vehicles = vehicles
        self.vids = np.array([f"v{i:05d}" for i in range(vehicles)], dtype=object)
        self.streams = np.array([f"vehicle-{v}" for v in self.vids], dtype=object)
        self.stream_hash = np.array([zlib.crc32(s.encode()) for s in self.streams], np.uint32)
        self.chargers = np.array([f"charger-cp{i:05d}" for i in range(vehicles)], dtype=object)
        self.charger_hash = np.array([zlib.crc32(s.encode()) for s in self.chargers], np.uint32)
        self.versions = np.zeros(vehicles, np.int64)
        self.charger_versions = np.zeros(vehicles, np.int64)
        self.import_kwh = np.zeros(vehicles)
        self.batch_no = 0

    def setup(self, log: EventLog, ticks: int) -> int:
        """Registrations, plug-ins and the hourly prices (ordinary per-event path)."""
        b = PendingBatchBuilder()
        n = 0

        def add(stream: str, version: int, typ: str, payload: dict[str, object]) -> None:
            nonlocal n
            n += 1
            b.add(
                stream,
                version,
                f"setup-{n}/0",
                typ,
                1,
                START,
                f"setup-{n}",
                "",
                json.dumps(payload, separators=(",", ":")),
            )

        add(
            "market-nl",
            1,
            "MarketRegistered",
            {"market_id": "nl", "kind": "day_ahead", "deadline_ms": None},
        )
        for h in range(ticks // 4 + 2):
            t = START + timedelta(hours=h)
            add(
                "market-nl",
                2 + h,
                "PricePublished",
                {
                    "market_id": "nl",
                    "interval_start": t.isoformat().replace("+00:00", "Z"),
                    "interval_minutes": 60,
                    "price_eur_per_mwh": round(60 + 50 * np.sin(h / 3.8), 2),
                    "version": 1,
                    "received_at": "2024-05-31T12:00:00Z",
                },
            )
        for i, v in enumerate(self.vids):
            add(
                self.streams[i],
                1,
                "VehicleRegistered",
                {
                    "vehicle_id": v,
                    "at": "2024-06-01T00:00:00Z",
                    "model": "Van",
                    "site_id": f"site-{i % 20}",
                    "battery_capacity_kwh": 60.0,
                    "max_charge_kw": 11.0,
                    "max_discharge_kw": 11.0,
                    "soc_floor": 0.2,
                    "derate_above_c": 45.0,
                    "refuse_discharge_above_c": 65.0,
                    "min_soh_for_discharge": 0.7,
                    "discharge_throughput_budget_kwh": None,
                    "charge_efficiency": 0.95,
                    "discharge_efficiency": 0.95,
                },
            )
            add(
                self.streams[i],
                2,
                "VehiclePluggedIn",
                {
                    "vehicle_id": v,
                    "at": "2024-06-01T00:00:00Z",
                    "charger_id": f"cp{i:05d}",
                    "charger_max_charge_kw": 11.0,
                    "charger_max_discharge_kw": 11.0,
                },
            )
            add(
                self.chargers[i],
                1,
                "ChargerRegistered",
                {
                    "charger_id": f"cp{i:05d}",
                    "site_id": f"site-{i % 20}",
                    "max_charge_kw": 11.0,
                    "max_discharge_kw": 11.0,
                    "ocpp_version": "2.1",
                    "divergence_tolerance_kw": 1.0,
                    "divergence_tolerance_ratio": 0.1,
                    "divergence_samples": 3,
                },
            )
        self.versions[:] = 2
        self.charger_versions[:] = 1
        log.append_batch(b.build())
        return n

    def tick_batch(self, first_tick: int, ticks: int, rng: np.random.Generator) -> pa.RecordBatch:
        """Per tick and vehicle: telemetry, metered energy, a setpoint, a charger meter sample
        (the last two every other tick): 3 events per vehicle and tick on average."""
        self.batch_no += 1
        cols: dict[str, list[pa.Array]] = defaultdict(list)
        for k in range(first_tick, first_tick + ticks):
            t = START + timedelta(seconds=TICK_S * (k + 1))
            t_iso = t.isoformat().replace("+00:00", "Z")
            t0_iso = (t - timedelta(seconds=TICK_S)).isoformat().replace("+00:00", "Z")
            n = self.vehicles
            kinds = ["tel", "energy"] + (["setpoint", "meter"] if k % 2 == 0 else [])
            power = np.round(rng.uniform(-11, 11, n), 2)
            for kind in kinds:
                vid = pa.array(self.vids, pa.string())
                if kind == "meter":
                    streams, hashes = self.chargers, self.charger_hash
                    self.charger_versions += 1
                    versions = self.charger_versions.copy()
                else:
                    streams, hashes = self.streams, self.stream_hash
                    self.versions += 1
                    versions = self.versions.copy()
                if kind == "tel":
                    typ, sv = "VehicleTelemetryReported", 2
                    soc = _s(np.round(rng.uniform(0.2, 0.9, n), 3))
                    temp = _s(np.round(rng.normal(25, 6, n), 1))
                    payload = _join(
                        '{"vehicle_id":"',
                        vid,
                        f'","at":"{t_iso}","measured_at":"{t_iso}","soc":',
                        soc,
                        ',"battery_temp_c":',
                        temp,
                        ',"soh":0.97,"source":"simulator"}',
                    )
                elif kind == "energy":
                    typ, sv = "VehicleEnergyRecorded", 1
                    kwh = np.abs(power) / 4
                    ch = _s(np.round(np.where(power > 0, kwh, 0.0), 4))
                    dis = _s(np.round(np.where(power < 0, kwh, 0.0), 4))
                    payload = _join(
                        '{"vehicle_id":"',
                        vid,
                        f'","at":"{t_iso}","interval_start":'
                        f'"{t0_iso}","interval_end":"{t_iso}","charged_kwh":',
                        ch,
                        ',"discharged_kwh":',
                        dis,
                        "}",
                    )
                elif kind == "setpoint":
                    typ, sv = "VehicleSetpointAccepted", 1
                    p = _s(power)
                    until = (t + timedelta(seconds=2 * TICK_S)).isoformat().replace("+00:00", "Z")
                    payload = _join(
                        '{"vehicle_id":"',
                        vid,
                        f'","at":"{t_iso}","controller_id":"d","requested_power_kw":',
                        p,
                        ',"power_kw":',
                        p,
                        f',"valid_until":"{until}","limited_by":[]}}',
                    )
                else:
                    typ, sv = "ChargerMeterValuesRecorded", 1
                    self.import_kwh += np.abs(power) / 2
                    imp = _s(np.round(self.import_kwh, 3))
                    payload = _join(
                        f'{{"evse_id":1,"transaction_id":"t","sampled_at":"{t_iso}",'
                        '"power_kw":null,"energy_import_kwh":',
                        imp,
                        ',"energy_export_kwh":0.0,"soc":null}',
                    )
                idx = pa.array(np.arange(n) + k * n * 4 + kinds.index(kind) * n)
                cmd = _join(f"b{kind[0]}-", pc.cast(idx, pa.string()))
                cols["stream_id"].append(pa.array(streams, pa.string()))
                cols["stream_hash"].append(pa.array(hashes, pa.uint32()))
                cols["stream_version"].append(pa.array(versions, pa.int64()))
                cols["event_id"].append(_join(cmd, "/0"))
                cols["type"].append(pa.array([typ] * n, pa.string()))
                cols["schema_version"].append(pa.array(np.full(n, sv, np.int32)))
                cols["occurred_at"].append(
                    pa.array(np.full(n, micros(t), np.int64)).cast(pa.timestamp("us", tz="UTC"))
                )
                cols["command_id"].append(cmd)
                cols["correlation_id"].append(pa.array([""] * n, pa.string()))
                cols["payload"].append(payload)
                cols["metadata"].append(pa.array(["{}"] * n, pa.string()))
                body = pc.binary_join_element_wise(
                    pa.array(streams, pa.string()),
                    _s(versions),
                    _join(cmd, "/0"),
                    typ,
                    str(sv),
                    str(micros(t)),
                    cmd,
                    "",
                    payload,
                    "{}",
                    SEP,
                )
                cols["body"].append(body.cast(pa.binary()))
        arrays = [pa.concat_arrays(cols[f.name]).cast(f.type) for f in PENDING_SCHEMA]
        return pa.RecordBatch.from_arrays(arrays, schema=PENDING_SCHEMA)


def build_log(root: str, events: int, vehicles: int, seal_events: int) -> tuple[int, float]:
    rng = np.random.default_rng(7)
    per_tick = 3 * vehicles
    ticks = max(2, events // per_tick)
    gen = Generator(vehicles)
    t0 = time.perf_counter()
    with EventLog(root, partitions=4, seal_events=seal_events) as log:
        gen.setup(log, ticks)
        step = max(2, (400_000 // per_tick) // 2 * 2)
        pending = []
        for first in range(0, ticks, step):
            batch = gen.tick_batch(first, min(step, ticks - first), rng)
            pending.append(log.submit_batch(batch))
            if len(pending) > 2:
                pending.pop(0).result()
            if (first // step) % 5 == 0:
                say(f"  generated {log.watermark:,} events ({time.perf_counter() - t0:.0f} s)")
        for f in pending:
            f.result()
        log.flush_seals()
        total = log.watermark
    return total, time.perf_counter() - t0


_MICRO = Decimal("0.000001")
_QUARTER = timedelta(minutes=15)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC).replace(tzinfo=None)


def _bucket(t: datetime) -> datetime:
    return t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0)


def _money(x: Decimal) -> Decimal:
    return x.quantize(_MICRO, ROUND_HALF_UP)  # DuckDB's DECIMAL cast: half away from zero


def python_fold(root: str, settlement_kind: str = "day_ahead") -> tuple[int, float, Decimal, float]:
    """The revenue projection as one would write it without SQL: event by event.

    Every event's payload is decoded (``json.loads``), as a per-event handler does, and
    folded into dictionaries: markets, vehicles' sites, the latest price version per
    market and 15-minute slot, metered energy split into 15-minute pieces, regulation
    and peak-shaving lines, all in exact ``Decimal`` like the SQL. Returns the number
    of events, the seconds it took, the total revenue (EUR) over every stream, which
    must equal the SQL projection's, and the CPU seconds it took.
    """
    import duckdb

    from events.sql import attach_log

    t0 = time.perf_counter()
    cpu0 = _cpu_s()
    con = duckdb.connect()
    attach_log(con, root)
    reader = con.sql(
        "SELECT type, payload, position FROM events ORDER BY position"
    ).to_arrow_reader(1_000_000)
    kinds: dict[str, str] = {}
    sites: dict[str, str] = {}
    slots: dict[tuple[str, datetime], tuple[int, int, Decimal]] = {}
    pieces: list[tuple[datetime, Decimal, str | None]] = []  # (slot, net export kWh, site)
    other = Decimal(0)
    peaks: dict[tuple[str, datetime], Decimal] = {}
    n = 0
    for batch in reader:
        types = batch.column(0).to_pylist()
        payloads = batch.column(1).to_pylist()
        positions = batch.column(2).to_pylist()
        for typ, payload, position in zip(types, payloads, positions, strict=True):
            n += 1
            p = json.loads(payload, parse_float=Decimal)
            if typ == "VehicleEnergyRecorded":
                s, e = _utc(p["interval_start"]), _utc(p["interval_end"])
                c, d = Decimal(p["charged_kwh"]), Decimal(p["discharged_kwh"])
                site = sites.get(p["vehicle_id"])
                b = _bucket(s)
                if b + _QUARTER >= e:  # one interval: the whole amount
                    pieces.append((b, d - c, site))
                    continue
                span = (e - s).total_seconds()
                while b < e:
                    share = ((min(e, b + _QUARTER) - max(s, b)).total_seconds()) / span
                    pc_, pd_ = (Decimal(repr(float(x) * share)) for x in (c, d))
                    pieces.append((b, _money(pd_) - _money(pc_), site))
                    b += _QUARTER
            elif typ in ("PricePublished", "PriceRevised"):
                start = _utc(p["interval_start"])
                price = p.get("new_price_eur_per_mwh")
                if price is None:
                    price = p["price_eur_per_mwh"]
                slot = _bucket(start - timedelta(microseconds=1)) + _QUARTER
                end = start + timedelta(minutes=p["interval_minutes"])
                while slot < end:
                    key = (p["market_id"], slot)
                    seen = slots.get(key)
                    if seen is None or (seen[0], seen[1]) < (p["version"], position):
                        slots[key] = (p["version"], position, Decimal(price))
                    slot += _QUARTER
            elif typ == "MarketRegistered":
                kinds[p["market_id"]] = p["kind"]
            elif typ == "VehicleRegistered":
                sites[p["vehicle_id"]] = p["site_id"]
            elif typ == "RegulationCapacityReserved":
                mw = (Decimal(p["up_kw"]) + Decimal(p["down_kw"])) * p["interval_minutes"]
                other += _money(mw * Decimal(p["price_eur_per_mw_per_h"]) / 60000)
            elif typ == "RegulationEnergyDelivered":
                other += _money(Decimal(p["energy_kwh"]) * Decimal(p["price_eur_per_mwh"]) / 1000)
            elif typ == "PeakShavingDelivered":
                month = _utc(p["interval_start"]).replace(day=1, hour=0, minute=0, second=0)
                saving = _money(
                    Decimal(p["avoided_peak_kw"]) * Decimal(p["demand_charge_eur_per_kw_month"])
                )
                key = (p["site_id"], month)
                peaks[key] = max(peaks.get(key, saving), saving)
    con.close()
    best: dict[datetime, Decimal] = {}
    for (market, slot), (_v, _pos, price) in sorted(slots.items(), reverse=True):
        if kinds.get(market) == settlement_kind:
            best[slot] = price  # reverse order: the lowest market id is written last
    total = other + sum(peaks.values(), Decimal(0))
    for slot, kwh, _site in pieces:
        price = best.get(slot)
        if price is not None:
            total += _money(kwh * price / 1000)
    return n, time.perf_counter() - t0, total, _cpu_s() - cpu0


def _cpu_s() -> float:
    """CPU seconds of this process so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _follow(root: str, db: str, conn: Any, stop: Any) -> None:
    """The runner of the lag test, in its own process as in a deployment (the log's
    writer lives elsewhere): sends (revenue position, commit time) after each round."""
    from projections.store import ProjectionStore

    with ProjectionStore(db) as store:
        store.apply(root)
        conn.send((-1, time.perf_counter()))

        def applied(positions: dict[str, int]) -> None:
            conn.send((positions["revenue"], time.perf_counter()))

        store.follow(root, stop, poll_s=0.02, on_applied=applied)
    conn.close()


def lag_test(
    root: str, db: str, vehicles: int, seconds: float, rate: int, runner_mode: str = "process"
) -> list[float]:
    """Append at ``rate`` events/s for ``seconds`` while a runner follows the folder.

    ``runner_mode`` "process" (default) runs the runner in its own process, as the
    projection service would run beside the log's writer; "thread" runs it in this
    process, where it shares the interpreter lock with the appender and the log's
    writer thread. CLOCK_MONOTONIC (``time.perf_counter``) is the same in both.
    """
    import multiprocessing

    acks: list[tuple[int, float]] = []
    lags: list[float] = []
    lock = threading.Lock()

    def applied_at(top: int, now: float) -> None:
        with lock:
            while acks and acks[0][0] <= top:
                lags.append(now - acks.pop(0)[1])

    if runner_mode == "thread":
        from projections.store import ProjectionStore

        stop: Any = threading.Event()
        store = ProjectionStore(db)
        store.apply(root)
        runner: Any = threading.Thread(
            target=store.follow,
            args=(root, stop),
            kwargs={
                "poll_s": 0.02,
                "on_applied": lambda p: applied_at(p["revenue"], time.perf_counter()),
            },
        )
        runner.start()
        receiver = None
    else:
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        recv_end, send_end = ctx.Pipe(duplex=False)
        runner = ctx.Process(target=_follow, args=(root, db, send_end, stop))
        runner.start()
        send_end.close()
        recv_end.recv()  # caught up with the log as it is

        def receive() -> None:
            while True:
                try:
                    top, now = recv_end.recv()
                except EOFError:
                    return
                applied_at(top, now)

        receiver = threading.Thread(target=receive)
        receiver.start()
    log = EventLog(root)
    gen = Generator(vehicles)
    # continue the streams where the log left them
    for i in range(vehicles):
        gen.versions[i] = log.version(gen.streams[i])
        gen.charger_versions[i] = log.version(gen.chargers[i])
    rng = np.random.default_rng(11)
    per_batch = 100
    period = per_batch / rate
    t_end = time.perf_counter() + seconds
    k = 10_000_000
    nxt = time.perf_counter()
    while time.perf_counter() < t_end:
        b = PendingBatchBuilder()
        for _ in range(per_batch):
            k += 1
            i = int(rng.integers(0, vehicles))
            gen.versions[i] += 1
            t = START + timedelta(days=30, seconds=k)
            b.add(
                gen.streams[i],
                int(gen.versions[i]),
                f"lag-{k}/0",
                "VehicleEnergyRecorded",
                1,
                t,
                f"lag-{k}",
                "",
                json.dumps(
                    {
                        "vehicle_id": gen.vids[i],
                        "at": t.isoformat(),
                        "interval_start": (t - timedelta(minutes=15)).isoformat(),
                        "interval_end": t.isoformat(),
                        "charged_kwh": 0.0,
                        "discharged_kwh": 1.5,
                    }
                ),
            )
        log.append_batch(b.build())
        with lock:
            acks.append((log.watermark, time.perf_counter()))
        nxt += period
        time.sleep(max(0.0, nxt - time.perf_counter()))
    deadline = time.perf_counter() + 30
    while acks and time.perf_counter() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join()
    if receiver is not None:
        receiver.join()
    else:
        store.close()
    log.close()
    if acks:
        say(f"  {len(acks)} appends never became visible within 30 s")
    return lags


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1M events instead of 10M")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--lag-seconds", type=float, default=20.0)
    ap.add_argument("--lag-runner", choices=("process", "thread"), default="process")
    ap.add_argument("--rebuilds", type=int, default=3, help="rebuilds to time (median)")
    ap.add_argument("--log", default=None, help="reuse this log folder (left as it was)")
    ap.add_argument("--keep", default=None, help="keep the log and databases in this folder")
    args = ap.parse_args()
    events = args.events or (1_000_000 if args.quick else 10_000_000)
    vehicles = 2_000
    work = args.keep or tempfile.mkdtemp(prefix="bench-projections-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "log")
    result: dict[str, object] = {"events_target": events, "vehicles": vehicles}
    try:
        if args.log:  # a log an earlier run kept: copied, as the lag test appends to it
            shutil.copytree(args.log, root)
            with EventLog(root) as log:
                total = log.watermark
            say(f"log: {total:,} events copied from {args.log}")
        else:
            say(f"building a {events:,}-event log in {work}")
            total, gen_s = build_log(root, events, vehicles, seal_events=250_000)
            result.update(generate_s=round(gen_s, 1), generate_events_per_s=round(total / gen_s))
            say(f"log: {total:,} events in {gen_s:.1f} s")
        result["events"] = total
        if args.quick:
            t0 = time.perf_counter()
            report = verify_log(root)
            result["verify_ok"] = report.ok
            say(f"verify_log: ok={report.ok} ({time.perf_counter() - t0:.1f} s)")

        from projections.replay import replay

        db = os.path.join(work, "rebuild.duckdb")
        say("rebuilding every projection from position 0")
        runs = []
        for _ in range(args.rebuilds):
            load = os.getloadavg()[0]
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            replay(root, db)
            wall = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
            runs.append((wall, cpu, load))
            say(
                f"rebuild: {wall:.2f} s = {total / wall:,.0f} events/s "
                f"(cpu {cpu:.2f} s, load {load:.1f})"
            )
        rebuild_s = float(np.median([r[0] for r in runs]))
        result.update(
            rebuild_s=round(rebuild_s, 2),
            rebuild_events_per_s=round(total / rebuild_s),
            rebuild_runs_s=[round(r[0], 2) for r in runs],
            rebuild_cpu_s=round(float(np.median([r[1] for r in runs])), 2),
            load_avg_1m=[round(r[2], 1) for r in runs],
        )

        say("python fold of the revenue projection")
        n, fold_s, fold_total, fold_cpu_s = python_fold(root)
        result.update(
            python_fold_s=round(fold_s, 2),
            python_fold_cpu_s=round(fold_cpu_s, 2),
            python_fold_events_per_s=round(n / fold_s),
        )
        import duckdb

        with duckdb.connect(db, read_only=True) as con:
            [(sql_total,)] = con.execute("SELECT sum(revenue_eur) FROM revenue_lines").fetchall()
        result["revenue_total_eur"] = str(sql_total)
        result["python_fold_equals_sql"] = fold_total == sql_total
        say(f"revenue total: SQL {sql_total} EUR, python fold {fold_total} EUR")
        result["rebuild_to_python_fold"] = round((total / rebuild_s) / (n / fold_s), 2)
        rebuild_cpu_s = float(np.median([r[1] for r in runs]))
        result["rebuild_to_python_fold_cpu"] = round((total / rebuild_cpu_s) / (n / fold_cpu_s), 2)
        say(f"fold: {fold_s:.2f} s = {n / fold_s:,.0f} events/s (cpu {fold_cpu_s:.2f} s)")

        say(f"incremental lag: 10,000 events/s for {args.lag_seconds:.0f} s while following")
        live = os.path.join(work, "live.duckdb")
        shutil.copy(db, live)
        lags = lag_test(root, live, vehicles, args.lag_seconds, 10_000, args.lag_runner)
        result["lag_runner"] = args.lag_runner
        if lags:
            ms = np.asarray(lags) * 1000
            result.update(
                incremental_lag_ms_p50=round(float(np.percentile(ms, 50)), 1),
                incremental_lag_ms_p99=round(float(np.percentile(ms, 99)), 1),
                incremental_lag_samples=len(lags),
            )
            say(f"lag p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms")

        from projections.roi import monte_carlo
        from projections.roi_config import load_roi_config

        cfg = load_roi_config(
            os.path.join(os.path.dirname(__file__), "..", "projections", "roi_example.toml")
        )
        monte_carlo(cfg, iterations=10_000)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            monte_carlo(cfg, iterations=10_000)
            times.append(time.perf_counter() - t0)
        result["monte_carlo_10k_ms"] = round(min(times) * 1000, 1)
        say(f"monte carlo 10k: {min(times) * 1000:.1f} ms (best of 5)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
