"""`v2g`: the command line of v2gfleet.

Exit codes scripts can rely on: 0 success, 1 the system said no (a rejected
command, a log that fails verification), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def _data_dir(args: argparse.Namespace) -> str:
    return str(args.data_dir or os.environ.get("V2G_DATA_DIR", "var"))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


@contextlib.contextmanager
def _progress(label: str, machine_readable: bool) -> Iterator[Callable[[int, int], None]]:
    """The backtest's progress bar; `update(done, total)` moves it.

    With `--json` it goes to stderr, so stdout stays one JSON document.
    """
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=machine_readable)) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


# --------------------------------------------------------------------- log verify


def cmd_log_verify(args: argparse.Namespace) -> int:
    from events.verify import verify_log

    root = os.path.join(_data_dir(args), "log")
    try:
        report = verify_log(root)
    except FileNotFoundError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        _print_json(
            {
                "ok": report.ok,
                "events_checked": report.events_checked,
                "heads": report.heads,
                "problem": str(report.problem) if report.problem else None,
            }
        )
    else:
        print(f"checked {report.events_checked} events in {len(report.heads)} partitions")
        for partition, head in sorted(report.heads.items()):
            print(f"  partition {partition} head {head}")
        print("log verified: unaltered" if report.ok else f"TAMPERED: {report.problem}")
    return EXIT_OK if report.ok else EXIT_REFUSED


# -------------------------------------------------------------------- commands


def command_classes() -> dict[str, type]:
    from cluster.runtime import default_deciders

    return {t.__name__: t for d in default_deciders() for t in d.command_types}


def parse_command(text: str, now: datetime) -> Any:
    """A command from JSON: `{"type": "PlugIn", "vehicle_id": ..., ...}`.

    `command_id` defaults to a hash of the content (so re-sending the same line is
    idempotent) and `issued_at` to now.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"command is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "type" not in doc:
        raise ValueError('command must be a JSON object with a "type", e.g. {"type": "Unplug"}')
    classes = command_classes()
    name = doc.pop("type")
    if name not in classes:
        raise ValueError(f"unknown command type {name!r}; known: {', '.join(sorted(classes))}")
    if "command_id" not in doc:
        import hashlib

        digest = hashlib.sha256(json.dumps([name, doc], sort_keys=True).encode()).hexdigest()
        doc["command_id"] = f"cli-{digest[:16]}"
    doc.setdefault("issued_at", now.isoformat())
    return classes[name].model_validate(doc)


def cmd_command(args: argparse.Namespace) -> int:
    from cluster.client import FleetError

    texts = [args.json] if args.json else [line for line in sys.stdin if line.strip()]
    try:
        commands = [parse_command(t, datetime.now(UTC)) for t in texts]
    except (ValueError, ValidationError) as exc:
        print(f"v2g: invalid command: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _client(args) as fleet:
            results = fleet.send_many(commands)
    except FleetError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for r in results:
        if args.output_json:
            _print_json(dataclasses.asdict(r))
        else:
            detail = r.reason or ", ".join(r.event_types)
            dup = " (repeat: first answer)" if r.duplicate else ""
            print(f"{r.command_id}: {r.status}{dup} {detail}")
    return EXIT_OK if all(r.ok for r in results) else EXIT_REFUSED


def cmd_state(args: argparse.Namespace) -> int:
    from cluster.client import FleetError

    try:
        with _client(args) as fleet:
            state = fleet.state(args.kind, args.entity_id)
    except FleetError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _print_json(state.model_dump(mode="json"))
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from events.reader import read_log

    table = read_log(os.path.join(_data_dir(args), "log"))
    rows = [r for r in table.to_pylist() if r["stream_id"] == args.stream_id]
    for r in rows:
        print(f"{r['position']:>8} v{r['stream_version']:<4} {r['type']:<28} {r['payload']}")
    return EXIT_OK if rows else EXIT_REFUSED


def _client(args: argparse.Namespace) -> Any:
    from cluster.client import FleetClient

    if args.address:
        return FleetClient.connect(args.address, data_dir=_data_dir(args))
    return FleetClient.embedded(_data_dir(args))


# ---------------------------------------------------------------- projections


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    data = _data_dir(args)
    return os.path.join(data, "log"), os.path.join(data, "projections.duckdb")


def cmd_replay(args: argparse.Namespace) -> int:
    from projections.replay import replay

    log_root, db_path = _paths(args)
    until = None
    if args.until:
        try:
            until = datetime.fromisoformat(args.until)
        except ValueError:
            print(f"v2g: --until {args.until!r} is not an ISO-8601 time", file=sys.stderr)
            return EXIT_USAGE
        if until.tzinfo is None:
            print("v2g: --until needs a timezone, e.g. 2024-06-01T00:00Z", file=sys.stderr)
            return EXIT_USAGE
    if not os.path.exists(os.path.join(log_root, "log.json")):
        print(f"v2g: no event log at {log_root}", file=sys.stderr)
        return EXIT_USAGE
    with _progress("events replayed", args.json) as update:
        positions = replay(log_root, db_path, until=until, on_progress=update)
    if args.json:
        _print_json(positions)
    else:
        for name, position in sorted(positions.items()):
            print(f"{name:<24} rebuilt through position {position}")
    return EXIT_OK


def cmd_audit_projections(args: argparse.Namespace) -> int:
    from projections.replay import verify

    log_root, db_path = _paths(args)
    if not os.path.exists(db_path):
        print(f"v2g: no projection database at {db_path}; run `v2g replay`", file=sys.stderr)
        return EXIT_USAGE
    report = verify(log_root, db_path)
    if args.json:
        _print_json(dataclasses.asdict(report))
    elif report.ok:
        print("projections equal a fresh replay of the log")
    else:
        print(f"projections DIFFER from a replay: {', '.join(report.differing_tables)}")
    return EXIT_OK if report.ok else EXIT_REFUSED


def cmd_export(args: argparse.Namespace) -> int:
    from projections.export import ExportError, export

    _, db_path = _paths(args)
    try:
        with _progress(f"tables exported ({args.format})", args.json) as update:
            written = export(
                db_path, args.format, args.output, on_table=lambda _, n, of: update(n, of)
            )
    except ExportError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        _print_json(written)
        return EXIT_OK
    for table, path in sorted(written.items()):
        print(f"{table:<16} {path}")
    return EXIT_OK


def cmd_sql(args: argparse.Namespace) -> int:
    from projections.sql_guard import ForbiddenStatement, QueryError, query

    _, db_path = _paths(args)
    try:
        table = query(db_path, args.query)
    except ForbiddenStatement as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except QueryError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.format == "json":
        _print_json(table.to_pylist())
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    else:
        from rich.console import Console
        from rich.table import Table

        out = Table()
        for name in table.column_names:
            out.add_column(name)
        for row in table.to_pylist():
            out.add_row(*("" if v is None else str(v) for v in row.values()))
        Console().print(out)
    return EXIT_OK


def cmd_roi_report(args: argparse.Namespace) -> int:
    from projections.report import roi_report
    from projections.roi_config import RoiConfigError

    _, db_path = _paths(args)
    config = args.config or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "projections",
        "roi_example.toml",
    )
    try:
        report = roi_report(config, db_path, args.output)
    except (RoiConfigError, FileNotFoundError) as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name, path in sorted(report.charts.items()):
        print(f"chart {name}: {path}")
    return EXIT_OK


# --------------------------------------------------------------- serve, status

ALARM_TYPES = (
    "WatchdogTripped",
    "EmergencyStopActivated",
    "AntiIslandingTripped",
    "ChargerPowerDivergenceDetected",
    "ChargerWentOffline",
    "InverterFaulted",
    "VehicleSafeStateEntered",
    "OcppConnectionRejected",
    "TelemetryMessageRejected",
    # a dispatcher restarted after losing the record of a decision that reached
    # vehicles (those with no vehicle are numbers a restart merely does not reuse)
    "OrphanedDecisionRecorded",
)


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config
    from cluster.serve import serve_forever

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"v2g: {exc}", file=sys.stderr)
        return EXIT_USAGE
    runtime = config.runtime(data_dir=args.data_dir, address=args.address)
    return serve_forever(config, runtime, say=lambda line: print(line, flush=True))


def fleet_status(data_dir: str) -> dict[str, Any]:
    """The fleet at a glance, as of the newest event in the log (no running system needed).

    Vehicle states are folded with the vehicle decider's own `evolve`, so "plugged
    in" and "setpoint" mean exactly what the system means by them; today's alarms
    and revenue are those of the newest event's day (a backtest's log lives in
    simulated time).
    """
    import duckdb
    import pyarrow.compute as pc

    from actors.vehicle import VEHICLE
    from events.base import load_event
    from events.reader import read_log

    table = read_log(os.path.join(data_dir, "log"))
    if table.num_rows == 0:
        return {"as_of": None, "vehicles": 0}
    as_of = table.column("occurred_at")[-1].as_py()
    vehicles = table.filter(pc.starts_with(table.column("stream_id"), "vehicle-"))
    states: dict[str, Any] = {}
    for sid, typ, version, payload in zip(
        vehicles.column("stream_id").to_pylist(),
        vehicles.column("type").to_pylist(),
        vehicles.column("schema_version").to_pylist(),
        vehicles.column("payload").to_pylist(),
        strict=True,
    ):
        state = states.get(sid) or VEHICLE.initial_state(sid.removeprefix("vehicle-"))
        states[sid] = VEHICLE.evolve(state, load_event(typ, version, payload))
    plugged = [st for st in states.values() if st.connection is not None]
    readings = [st.reading.soc for st in states.values() if st.reading is not None]
    power_kw = sum(
        st.setpoint.power_kw
        for st in plugged
        if st.setpoint is not None and st.setpoint.valid_until > as_of
    )
    day_start = as_of.replace(hour=0, minute=0, second=0, microsecond=0)
    con = duckdb.connect()
    con.register("log_events", table.select(["type", "occurred_at", "payload"]))
    alarms = dict(
        con.execute(
            "SELECT type, count(*) FROM log_events WHERE type IN ("
            + ", ".join("?" * len(ALARM_TYPES))
            + ") AND occurred_at >= ? AND NOT (type = 'OrphanedDecisionRecorded' AND "
            "json_array_length(payload::JSON -> 'vehicle_ids') = 0) "
            "GROUP BY type ORDER BY type",
            [*ALARM_TYPES, day_start],
        ).fetchall()
    )
    revenue = None
    db_path = os.path.join(data_dir, "projections.duckdb")
    if os.path.exists(db_path):
        from projections.sql_guard import QueryError, query

        with contextlib.suppress(QueryError):
            result = query(
                db_path,
                "SELECT coalesce(sum(revenue_eur), 0) AS eur FROM revenue_daily "
                f"WHERE day = DATE '{as_of.date().isoformat()}'",
            )
            revenue = float(result.column("eur")[0].as_py())
    return {
        "as_of": as_of.isoformat(),
        "vehicles": sum(st.registered for st in states.values()),
        "plugged_in": len(plugged),
        "mean_soc": round(sum(readings) / len(readings), 3) if readings else None,
        "setpoint_power_kw": round(power_kw, 3),
        "revenue_today_eur": revenue,
        "alarms_today": alarms,
    }


def cmd_status(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    if not os.path.exists(os.path.join(data_dir, "log", "log.json")):
        print(f"v2g: no event log in {data_dir}", file=sys.stderr)
        return EXIT_USAGE
    status = fleet_status(data_dir)
    if args.json:
        _print_json(status)
        return EXIT_OK
    if status["as_of"] is None:
        print("the log is empty")
        return EXIT_OK
    soc = "-" if status["mean_soc"] is None else f"{100 * status['mean_soc']:.0f} %"
    print(f"as of         {status['as_of']} (the newest event)")
    revenue = status["revenue_today_eur"]
    print(f"vehicles      {status['vehicles']} registered, {status['plugged_in']} plugged in")
    print(f"mean SoC      {soc}")
    print(f"setpoints     {status['setpoint_power_kw']:+.1f} kW (> 0 charging, < 0 discharging)")
    print(f"revenue today {'-' if revenue is None else f'{revenue:.2f} EUR'}")
    alarms = status["alarms_today"]
    print("alarms today  " + (", ".join(f"{k} x{v}" for k, v in alarms.items()) or "none"))
    return EXIT_OK


# -------------------------------------------------------------------- backtest


def cmd_backtest(args: argparse.Namespace) -> int:
    from cluster.backtest import main as backtest_main

    rest = list(args.rest)
    if args.data_dir and "--data-dir" not in rest:
        rest = ["--data-dir", args.data_dir, *rest]
    return backtest_main(rest)


# ------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    return run_demo(
        _data_dir(args),
        vehicles=args.vehicles,
        fresh=not args.keep,
        chargers=args.chargers,
        inverters=args.inverters,
        days=args.days,
        output=args.output,
    )


# ------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="v2g", description="Run and audit a V2G fleet as a virtual power plant."
    )
    parser.add_argument(
        "--data-dir", help="folder of the log and snapshots (default: $V2G_DATA_DIR or ./var)"
    )
    parser.add_argument("--address", help="Ray cluster address to join (default: local Ray)")
    sub = parser.add_subparsers(dest="verb", required=True)

    serve = sub.add_parser("serve", help="start the system from a config file and keep it running")
    serve.add_argument("--config", help="TOML file (see cluster/config.py); env: V2G__SECTION__KEY")
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="the fleet at a glance: plugged in, SoC, power, alarms")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="the depot week end to end on the embedded default")
    demo.add_argument("--vehicles", type=int, default=50, help="how many vans (default 50)")
    demo.add_argument("--chargers", type=int, default=25, help="OCPP 2.1 stations (default 25)")
    demo.add_argument("--inverters", type=int, default=2, help="Modbus inverters (default 2)")
    demo.add_argument("--days", type=int, default=7, help="simulated days (default 7)")
    demo.add_argument("--output", help="charts, CSVs, summary (default <data-dir>/demo-output)")
    demo.add_argument("--keep", action="store_true", help="keep an existing log (default: fresh)")
    demo.set_defaults(func=cmd_demo)

    for name in ("log", "audit"):
        group = sub.add_parser(name, help="verify the log's hash chain (audit: and projections)")
        verbs = group.add_subparsers(dest="log_verb", required=True)
        verify = verbs.add_parser("verify", help="report the first altered/missing/reordered event")
        verify.add_argument("--json", action="store_true", help="machine-readable output")
        verify.set_defaults(func=cmd_log_verify)
        if name == "audit":
            proj = verbs.add_parser(
                "projections", help="check the projections equal a fresh replay of the log"
            )
            proj.add_argument("--json", action="store_true", help="machine-readable output")
            proj.set_defaults(func=cmd_audit_projections)

    replay = sub.add_parser("replay", help="rebuild every projection from the log")
    replay.add_argument("--until", help="only events that occurred up to this ISO-8601 time")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.set_defaults(func=cmd_replay)

    export = sub.add_parser("export", help="write telemetry, energy, revenue, degradation")
    export.add_argument("--format", choices=["csv", "parquet"], default="csv")
    export.add_argument("--output", default="export", help="folder (default ./export)")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    export.set_defaults(func=cmd_export)

    sql = sub.add_parser("sql", help="read-only SQL over the projections (see docs)")
    sql.add_argument("query", help='e.g. "SELECT * FROM revenue LIMIT 5"')
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.set_defaults(func=cmd_sql)

    backtest = sub.add_parser(
        "backtest",
        help="the dispatcher in simulated time over historical prices (v2g backtest --help)",
        add_help=False,
    )
    backtest.add_argument("rest", nargs=argparse.REMAINDER)
    backtest.set_defaults(func=cmd_backtest)

    roi = sub.add_parser("roi", help="return on investment")
    roi_verbs = roi.add_subparsers(dest="roi_verb", required=True)
    report = roi_verbs.add_parser("report", help="summary table and PNG charts")
    report.add_argument("--config", help="ROI config TOML (default: the shipped example)")
    report.add_argument("--output", default="roi-report", help="folder for the charts")
    report.set_defaults(func=cmd_roi_report)

    command = sub.add_parser(
        "command",
        help="send commands: --json '{...}' or one JSON object per line on stdin",
        description='Example: v2g command --json \'{"type": "Unplug", "vehicle_id": "van-1"}\'',
    )
    command.add_argument("--json", help='one command as a JSON object with a "type"')
    command.add_argument("--output-json", action="store_true", help="print results as JSON")
    command.set_defaults(func=cmd_command)

    state = sub.add_parser("state", help="print one entity's current state as JSON")
    state.add_argument("kind", help="entity kind, e.g. vehicle")
    state.add_argument("entity_id")
    state.set_defaults(func=cmd_state)

    events = sub.add_parser("events", help="print one stream's events from the log")
    events.add_argument("stream_id", help="e.g. vehicle-van-1")
    events.set_defaults(func=cmd_events)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "func", None) is cmd_backtest:  # its own options, parsed by it
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
