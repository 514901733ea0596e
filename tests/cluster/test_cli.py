"""The `v2g` command: the demo's outputs, command parsing, and `log verify` exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from cluster.cli import main, parse_command
from events.log import EventLog
from tests.events.conftest import T0, Pinged

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def test_a_command_is_parsed_from_json_with_a_stable_default_id():
    a = parse_command('{"type": "Unplug", "vehicle_id": "van-1"}', NOW)
    b = parse_command('{"type": "Unplug", "vehicle_id": "van-1"}', NOW)
    assert a.vehicle_id == "van-1" and a.command_id == b.command_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"vehicle_id": "van-1"}', 'must be a JSON object with a "type"'),
        ('{"type": "Teleport"}', "unknown command type 'Teleport'"),
        ('{"type": "PlugIn", "vehicle_id": "van-1"}', "charger_id"),
    ],
)
def test_bad_commands_get_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_command(text, NOW)


def test_invalid_command_exits_2_without_starting_anything(capsys):
    assert main(["command", "--json", '{"type": "Teleport"}']) == 2
    assert "unknown command type" in capsys.readouterr().err


def test_log_verify_exit_codes_say_verified_or_tampered(tmp_path, capsys):
    data = tmp_path / "data"
    with EventLog(str(data / "log"), partitions=1, seal_events=5) as log:
        for i in range(12):
            log.append("vehicle-1", [Pinged(n=i)], i, f"c{i}", T0)
        log.flush_seals()
        segment = log.sealed_segment_paths()[0]
    assert main(["--data-dir", str(data), "log", "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    table = pq.read_table(segment)
    payloads = table.column("payload").to_pylist()
    payloads[2] = '{"n":42}'
    pq.write_table(
        table.set_column(table.schema.get_field_index("payload"), "payload", [payloads]), segment
    )
    assert main(["--data-dir", str(data), "audit", "verify"]) == 1
    assert "TAMPERED: partition 0, position 3" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path / "nowhere"), "log", "verify"]) == 2


def _small_fleet_log(data) -> None:
    from actors.host import EntityHost
    from actors.vehicle import VEHICLE
    from cluster.demo import demo_commands

    with EventLog(str(data / "log")) as log:
        host = EntityHost(VEHICLE, log)
        for batch in demo_commands(3):
            host.handle(batch)


def test_replay_sql_audit_and_export_work_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    _small_fleet_log(data)
    args = ["--data-dir", str(data)]

    assert main([*args, "audit", "projections"]) == 2  # nothing replayed yet
    assert main([*args, "replay", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy"] > 0
    assert main([*args, "sql", "SELECT count(*) AS n FROM telemetry", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 3}]
    assert main([*args, "sql", "DELETE FROM telemetry"]) == 1
    assert "not allowed" in capsys.readouterr().err
    assert main([*args, "sql", "SELEC 1"]) == 2
    assert main([*args, "audit", "projections"]) == 0
    out = tmp_path / "export"
    assert main([*args, "export", "--format", "parquet", "--output", str(out)]) == 0
    assert pq.read_table(out / "telemetry.parquet").num_rows == 3
    assert main([*args, "replay", "--until", "2024-01-15"]) == 2  # no timezone


def test_backtest_options_are_parsed_by_the_backtest_itself(capsys):
    # bad input fails before any system starts; --help lists the backtest's own options
    assert main(["backtest", "--start", "not-a-date"]) == 2
    assert "expected YYYY-MM-DD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["backtest", "--help"])
    assert "--json" in capsys.readouterr().out


def test_replay_and_export_show_progress_and_keep_json_output_clean(tmp_path, capsys):
    data = tmp_path / "data"
    _small_fleet_log(data)
    args = ["--data-dir", str(data)]

    assert main([*args, "replay"]) == 0
    out = capsys.readouterr().out
    assert "events replayed" in out and "100%" in out
    assert "energy                   rebuilt through position" in out

    assert main([*args, "replay", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["energy"] > 0  # stdout: the JSON and nothing else
    assert "events replayed" in captured.err and "100%" in captured.err

    out_dir = tmp_path / "export"
    assert main([*args, "export", "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "tables exported (csv)" in out and "100%" in out
    assert str(out_dir / "revenue.csv") in out

    assert main([*args, "export", "--format", "parquet", "--output", str(out_dir), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {
        name: str(out_dir / f"{name}.parquet")
        for name in ("telemetry", "energy", "revenue", "degradation")
    }
    assert "tables exported (parquet)" in captured.err


def test_status_alarms_on_a_lost_decision_not_on_numbers_a_restart_skips(tmp_path):
    from cluster.cli import fleet_status
    from events.dispatch import OrphanedDecisionRecorded
    from events.schema import PendingBatchBuilder

    def orphan(seq: int, vehicles: tuple[str, ...], reason: str) -> str:
        event = OrphanedDecisionRecorded(
            site_id="a", at=NOW, decision_seq=seq, vehicle_ids=vehicles, reason=reason
        )
        return event.model_dump_json()

    builder = PendingBatchBuilder()
    for seq, vehicles, reason in [
        (2, ("ev1",), "decision 2 reached 1 vehicle(s) but its own record is not in the log"),
        (3, (), "decision 3 may have been in flight when the previous dispatcher stopped"),
    ]:
        cmd = f"dispatch-a:orphan:{seq}"
        builder.add(
            "dispatch-a",
            seq - 1,  # the stream's versions 1 and 2
            f"{cmd}/0",
            "OrphanedDecisionRecorded",
            1,
            NOW,
            cmd,
            "",
            orphan(seq, vehicles, reason),
        )
    with EventLog(str(tmp_path / "log")) as log:
        log.append_batch(builder.build())
    assert fleet_status(str(tmp_path))["alarms_today"] == {"OrphanedDecisionRecorded": 1}
