"""Benchmark the projections: rebuild rate, a plain Python fold, live lag, Monte Carlo.

Usage: python scripts/bench_projections.py [--quick] [--events N] [--keep DIR]

Builds a real log (EventLog.append_batch with large columnar batches, checked by
verify_log in --quick runs) of vehicle telemetry, metered energy, setpoints and charger
meter values for a fleet, with hourly day-ahead prices, then measures:

  rebuild_events_per_s      every projection from position 0 (projections.replay)
  python_fold_events_per_s  a per-event Python loop computing the arbitrage revenue
                            over the same events (json.loads per event)
  rebuild_to_python_fold    their ratio
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
import shutil
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from datetime import UTC, datetime, timedelta

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


def python_fold(root: str) -> tuple[int, float, float]:
    """Arbitrage revenue, event by event, as one would write it without SQL."""
    import duckdb

    from events.sql import attach_log

    t0 = time.perf_counter()
    con = duckdb.connect()
    attach_log(con, root)
    reader = con.sql(
        "SELECT type, payload, position FROM events ORDER BY position"
    ).to_arrow_reader(1_000_000)
    prices: dict[tuple[str, str], tuple[int, float]] = {}
    pieces: list[tuple[str, float]] = []
    n = 0
    for batch in reader:
        types = batch.column(0).to_pylist()
        payloads = batch.column(1).to_pylist()
        for typ, payload in zip(types, payloads, strict=True):
            n += 1
            if typ == "VehicleEnergyRecorded":
                p = json.loads(payload)
                start = datetime.fromisoformat(p["interval_start"])
                slot = start.replace(minute=0, second=0, microsecond=0).isoformat()
                pieces.append((slot, p["discharged_kwh"] - p["charged_kwh"]))
            elif typ in ("PricePublished", "PriceRevised"):
                p = json.loads(payload)
                key = (p["market_id"], datetime.fromisoformat(p["interval_start"]).isoformat())
                price = p.get("new_price_eur_per_mwh", p.get("price_eur_per_mwh"))
                if key not in prices or prices[key][0] < p["version"]:
                    prices[key] = (p["version"], price)
    total = sum(kwh * prices.get(("nl", slot), (0, 0.0))[1] / 1000 for slot, kwh in pieces)
    con.close()
    return n, time.perf_counter() - t0, total


def lag_test(root: str, db: str, vehicles: int, seconds: float, rate: int) -> list[float]:
    from projections.store import ProjectionStore

    acks: list[tuple[int, float]] = []
    lags: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def on_applied(positions: dict[str, int]) -> None:
        now = time.perf_counter()
        top = positions["revenue"]
        with lock:
            while acks and acks[0][0] <= top:
                lags.append(now - acks.pop(0)[1])

    store = ProjectionStore(db)
    runner = threading.Thread(
        target=store.follow, args=(root, stop), kwargs={"poll_s": 0.02, "on_applied": on_applied}
    )
    log = EventLog(root)
    gen = Generator(vehicles)
    # continue the streams where the log left them
    for i in range(vehicles):
        gen.versions[i] = log.version(gen.streams[i])
        gen.charger_versions[i] = log.version(gen.chargers[i])
    store.apply(root)
    runner.start()
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
    ap.add_argument("--keep", default=None, help="keep the log and databases in this folder")
    args = ap.parse_args()
    events = args.events or (1_000_000 if args.quick else 10_000_000)
    vehicles = 2_000
    work = args.keep or tempfile.mkdtemp(prefix="bench-projections-")
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "log")
    result: dict[str, object] = {"events_target": events, "vehicles": vehicles}
    try:
        say(f"building a {events:,}-event log in {work}")
        total, gen_s = build_log(root, events, vehicles, seal_events=250_000)
        result.update(
            events=total, generate_s=round(gen_s, 1), generate_events_per_s=round(total / gen_s)
        )
        say(f"log: {total:,} events in {gen_s:.1f} s")
        if args.quick:
            t0 = time.perf_counter()
            report = verify_log(root)
            result["verify_ok"] = report.ok
            say(f"verify_log: ok={report.ok} ({time.perf_counter() - t0:.1f} s)")

        from projections.replay import replay

        db = os.path.join(work, "rebuild.duckdb")
        say("rebuilding every projection from position 0")
        t0 = time.perf_counter()
        replay(root, db)
        rebuild_s = time.perf_counter() - t0
        result.update(rebuild_s=round(rebuild_s, 2), rebuild_events_per_s=round(total / rebuild_s))
        say(f"rebuild: {rebuild_s:.2f} s = {total / rebuild_s:,.0f} events/s")

        say("python fold of the revenue projection")
        n, fold_s, _ = python_fold(root)
        result.update(python_fold_s=round(fold_s, 2), python_fold_events_per_s=round(n / fold_s))
        result["rebuild_to_python_fold"] = round((total / rebuild_s) / (n / fold_s), 2)
        say(f"fold: {fold_s:.2f} s = {n / fold_s:,.0f} events/s")

        say(f"incremental lag: 10,000 events/s for {args.lag_seconds:.0f} s while following")
        live = os.path.join(work, "live.duckdb")
        shutil.copy(db, live)
        lags = lag_test(root, live, vehicles, args.lag_seconds, 10_000)
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
