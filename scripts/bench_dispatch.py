"""Benchmark the dispatcher: frequency response on a local Ray, a backtest, the planner.

Run from the repository root: `python -m scripts.bench_dispatch [--quick]`.
Progress goes to stderr; the last line is one JSON object:

- freq_response_p99_ms: 1,000 vehicles of one site on a local Ray (2 vehicle shards).
  From a grid-frequency event entering the system (the call to the site dispatcher
  actor) to every vehicle's `RequestSetpoint` accepted by the hosts (appended to the
  log, fsynced) and the answer back; each event moves all 1,000 setpoints.
  Afterwards the log is read back: `freq_response_setpoints_durable_min` is the
  fewest setpoint events (accepted, curtailed or refused by the vehicle, each a
  durable answer) any frequency decision has in the log (1,000 expected), and
  `freq_response_setpoints_refused` how many of them the vehicles refused.
- backtest_revenue_eur, violations: `cluster.backtest.run_backtest` over 2 days of
  the shipped 2024 NL prices with 20 vehicles on 2 sites (violations counted from the
  log, expected 0).
- plan_s_1k, plan_s_10k, monolithic_lp_s_1k, speedup_vs_monolithic_1k,
  objective_gap_pct_1k: the planner bench's winter-evening fleets and functions
  (`scripts/bench_dispatch_plan.py`, imported; its own run reports more).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import ray

from actors.dispatch import ConfigureDispatcher
from actors.planning import plan, solve_monolithic, violations
from actors.vehicle import PlugIn, RegisterVehicle, ReportTelemetry
from cluster.backtest import run_backtest
from cluster.dispatcher import embedded_fleet, start_dispatchers, stop_all
from events.dispatch import TransformerLimit
from events.market import PublishPrice, RegisterMarket
from scripts.bench_dispatch_plan import (
    WINTER_START,
    gap_pct,
    prices_from,
    timed,
    winter_evening_fleet,
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


_SETPOINT_EVENTS = frozenset(
    {"VehicleSetpointAccepted", "VehicleSetpointCurtailed", "VehicleSetpointRejected"}
)


def durable_setpoints(log: Any, after_position: int, controller_id: str) -> tuple[int, int, int]:
    """Read back what the frequency decisions after `after_position` left in the log.

    Returns (frequency decisions, the fewest setpoint events one of them has, refusals
    among them). A decision's vehicle commands are `<controller_id>:<seq>:<vehicle>`.
    """
    columns = ["command_id", "type", "payload"]
    table = ray.get(log.read_all.remote(after_position + 1, None, columns))
    rows = table.to_pylist()
    seqs = {
        str(json.loads(r["payload"])["decision_seq"])
        for r in rows
        if r["type"] == "FrequencyResponseIssued"
    }
    per_decision: Counter[str] = Counter()
    refused = 0
    for r in rows:
        if r["type"] not in _SETPOINT_EVENTS:
            continue
        owner, seq, _ = r["command_id"].split(":", 2)
        if owner == controller_id and seq in seqs:
            per_decision[seq] += 1
            refused += r["type"] == "VehicleSetpointRejected"
    return len(seqs), min((per_decision[s] for s in seqs), default=0), refused


def frequency_response(data_dir: str, vehicles: int = 1000, events: int = 200) -> dict[str, float]:
    client = embedded_fleet(data_dir, name="bench-freq")
    try:
        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        setup: list = [
            RegisterMarket(
                command_id="m", issued_at=now, market_id="nl-day-ahead", kind="day_ahead"
            )
        ]
        # a flat price at 0 EUR/MWh: the plan idles, so every vehicle has headroom both ways
        setup += [
            PublishPrice(
                command_id=f"p-{h}",
                issued_at=now,
                market_id="nl-day-ahead",
                interval_start=day + timedelta(hours=h),
                interval_minutes=60,
                price_eur_per_mwh=0.0,
                version=0,
            )
            for h in range(48)
        ]
        for i in range(vehicles):
            vid = f"ev{i:04d}"
            setup += [
                RegisterVehicle(
                    command_id=f"reg-{vid}",
                    issued_at=now,
                    vehicle_id=vid,
                    model="Volkswagen ID.4",
                    site_id="bench",
                ),
                PlugIn(
                    command_id=f"plug-{vid}",
                    issued_at=now,
                    vehicle_id=vid,
                    charger_id=f"cp-{i}",
                    charger_max_charge_kw=11,
                    charger_max_discharge_kw=11,
                ),
                ReportTelemetry(
                    command_id=f"tel-{vid}",
                    issued_at=now,
                    vehicle_id=vid,
                    measured_at=now,
                    soc=0.6,
                    battery_temp_c=25,
                    soh=0.95,
                ),
            ]
        assert all(r.ok for r in client.send_many(setup))
        config = ConfigureDispatcher(
            command_id="cfg-bench",
            issued_at=now,
            site_id="bench",
            transformers=(
                TransformerLimit(transformer_id="t", import_kw=20_000, export_kw=20_000),
            ),
            lease_s=3600,
        )
        handles = start_dispatchers(client.runtime, [config], watched=(), loop_period_s=None)
        site = handles["bench"]
        ray.get(site.tick.remote())
        say(f"frequency: {vehicles} vehicles leased, {ray.get(site.status.remote())}")
        after_position = ray.get(client.runtime.log.watermark.remote())
        latencies_ms = []
        moved = []
        for k in range(events):
            if k % 25 == 0:
                ray.get(site.tick.remote())  # keeps the base setpoints valid
            f_hz = 49.9 if k % 2 == 0 else 50.1
            start = time.perf_counter()
            accepted = ray.get(site.grid_signal.remote(f_hz))
            latencies_ms.append((time.perf_counter() - start) * 1000)
            moved.append(accepted)
        stop_all(handles)
        decisions, durable_min, refused = durable_setpoints(
            client.runtime.log, after_position, "dispatch-bench"
        )
        say(
            f"frequency: {decisions} frequency decisions in the log, each with at least "
            f"{durable_min} setpoint events ({refused} refused by the vehicles)"
        )
        latencies_ms.sort()
        p99 = latencies_ms[int(0.99 * (len(latencies_ms) - 1))]
        say(
            f"frequency: p50 {statistics.median(latencies_ms):.1f} ms, p99 {p99:.1f} ms, "
            f"setpoints accepted per event {min(moved)}..{max(moved)}"
        )
        return {
            "freq_response_p50_ms": round(statistics.median(latencies_ms), 2),
            "freq_response_p99_ms": round(p99, 2),
            "freq_response_setpoints_min": min(moved),
            "freq_response_setpoints_durable_min": durable_min,
            "freq_response_setpoints_refused": refused,
        }
    finally:
        client.close()


def planner(quick: bool) -> dict[str, float]:
    """The planner bench's headline figures (its winter-evening fleet, binding limits)."""
    prices = prices_from(WINTER_START)
    p1k = winter_evening_fleet(1000, prices)
    plan_1k, _, fast = timed("plan 1k", plan, p1k, 1 if quick else 3)
    assert violations(p1k, fast) == []
    mono_1k, _, ref = timed("monolithic 1k", solve_monolithic, p1k, 1)
    plan_10k, _, _ = timed("plan 10k", plan, winter_evening_fleet(10_000, prices), 1)
    say(f"planner: 1k {plan_1k:.3f} s, monolithic {mono_1k:.3f} s, 10k {plan_10k:.3f} s")
    return {
        "plan_s_1k": round(plan_1k, 3),
        "plan_s_10k": round(plan_10k, 3),
        "monolithic_lp_s_1k": round(mono_1k, 3),
        "speedup_vs_monolithic_1k": round(mono_1k / plan_1k, 2),
        "objective_gap_pct_1k": round(gap_pct(ref, fast), 4),
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    quick = "--quick" in args
    ray.init(num_cpus=2, include_dashboard=False, namespace="v2gfleet", log_to_driver=False)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        figures |= frequency_response(f"{tmp}/freq", events=60 if quick else 200)
        start = time.perf_counter()
        report = run_backtest(
            f"{tmp}/backtest", datetime(2024, 3, 11, tzinfo=UTC), days=2, vehicles=20, sites=2
        )
        say(f"backtest ({time.perf_counter() - start:.1f} s): {report.as_dict()}")
        figures |= {
            "backtest_revenue_eur": report.revenue_eur,
            "backtest_net_eur": report.net_eur,
            "backtest_events": report.events,
            "violations": report.violations,
        }
    ray.shutdown()
    figures |= planner(quick)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
