"""`v2g serve`'s projection follower waits out a reader that holds the file."""

from __future__ import annotations

import threading
import time

import duckdb

from cluster.serve import follow_projections
from events.log import EventLog
from projections.store import ProjectionStore


def test_the_follower_skips_rounds_while_a_reader_in_this_process_holds_the_file(tmp_path):
    log_root, db_path = str(tmp_path / "log"), str(tmp_path / "projections.duckdb")
    EventLog(log_root).close()
    ProjectionStore(db_path).close()
    rounds: list[float] = []
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_projections,
        args=(log_root, db_path, stop, 0.02, lambda: rounds.append(time.monotonic())),
    )
    reader = duckdb.connect(db_path, read_only=True)  # as `v2g sql` in the same process
    try:
        follower.start()
        time.sleep(0.3)
        assert follower.is_alive(), "a held file must cost a round, not the follower"
        assert rounds == []
    finally:
        reader.close()
    deadline = time.monotonic() + 10
    while not rounds and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    follower.join(timeout=10)
    assert rounds, "once the reader is gone the follower applies again"
    assert not follower.is_alive()
