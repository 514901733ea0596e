"""`v2g serve` on a real local Ray: it starts from its config, projections follow the log."""

from __future__ import annotations

import time

import pytest

from cluster.cli import fleet_status
from cluster.client import FleetClient
from cluster.config import load_config
from cluster.demo import demo_commands
from cluster.serve import start
from projections.sql_guard import query

pytestmark = pytest.mark.ray


def test_serve_starts_everything_and_the_projections_follow_the_log(
    ray_session, tmp_path, monkeypatch
):
    config = load_config(
        None,
        env={
            "V2G__SYSTEM__NAME": "served",
            "V2G__PROJECTIONS__POLL_S": "0.2",
        },
    )
    runtime_config = config.runtime(data_dir=str(tmp_path))
    serving = start(config, runtime_config)
    try:
        fleet = FleetClient(serving.runtime, owns_ray=False)
        for batch in demo_commands(3):
            results = fleet.send_many(batch)
            assert all(r.ok for r in results), [r for r in results if not r.ok]
        deadline = time.monotonic() + 30
        rows = 0
        while time.monotonic() < deadline and rows < 3:
            time.sleep(0.3)
            if (tmp_path / "projections.duckdb").exists():
                try:
                    rows = (
                        query(
                            str(tmp_path / "projections.duckdb"),
                            "SELECT count(*) AS n FROM telemetry",
                        )
                        .column("n")[0]
                        .as_py()
                    )
                except Exception:  # the follower holds the file this instant
                    rows = 0
        assert rows == 3, "the follower must have applied the three telemetry readings"
        status = fleet_status(str(tmp_path))
        assert (status["vehicles"], status["plugged_in"]) == (3, 3)
    finally:
        serving.stop()
    assert serving.projection_rounds > 0
