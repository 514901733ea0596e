"""DuckDB reads the log itself: sealed Parquet segments plus the unsealed tail."""

from __future__ import annotations

import duckdb

from events.log import EventLog
from events.sql import attach_log
from tests.events.conftest import T0, Pinged


def test_duckdb_sees_every_event_sealed_or_not(tmp_path):
    root = str(tmp_path / "log")
    with EventLog(root, partitions=2, seal_events=20) as log:
        for i in range(75):
            log.append(f"vehicle-{i % 3}", [Pinged(n=i)], i // 3, f"cmd-{i}", T0)
        log.flush_seals()
        assert log.sealed_segment_paths()

        con = duckdb.connect()
        attach_log(con, root)
        count, total, streams = con.execute(
            "SELECT count(*), sum(CAST(json_extract(payload, '$.n') AS INTEGER)),"
            " count(DISTINCT stream_id) FROM events"
        ).fetchone()

    assert (count, total, streams) == (75, sum(range(75)), 3)


def test_an_empty_log_is_an_empty_view(tmp_path):
    root = str(tmp_path / "log")
    EventLog(root).close()
    con = duckdb.connect()
    attach_log(con, root)
    assert con.execute("SELECT count(*) FROM events").fetchone() == (0,)
