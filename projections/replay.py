"""The audit replay: rebuild every projection from position 0, and check a live database.

:func:`replay` builds the projections straight into a new file next to ``db_path``
and moves it into place only once it is complete, so a failed replay leaves the old
database untouched (a replay killed outright leaves its ``.replay-*.duckdb`` beside it,
to be deleted). (Building in memory and copying the finished database to a file
cost a second pass over every row: at 10M events, 8.3 s against 7.3 s, 15 against
13 s of CPU. DuckDB writes large inserts straight to the file's blocks, without
its write-ahead log, so the direct build pays little for being on disk.)
Two replays of the same log give byte-identical exports (:mod:`projections.export`):
money and energy are DECIMAL, and every export has a total ORDER BY.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import duckdb

from events.sql import attach_log
from projections.export import EXPORT_TABLES, export
from projections.store import Projection, ProjectionStore

__all__ = ["AuditReport", "Progress", "replay", "verify"]

#: ``on_progress(done, total)``: positions replayed so far, of the log's last position.
Progress = Callable[[int, int], None]

#: With a progress callback, a long log is replayed in windows of positions (at
#: most ``_MAX_WINDOWS``, at least ``window_events`` each). Every projection is
#: incremental, so window by window gives the same tables as one pass, but each
#: window costs a fixed share of a pass (measured on a 1M-event log: about 0.45 s
#: CPU a window against 3 s for the pass), so windows are few and large, and a log
#: shorter than one window is replayed in one pass.
_MAX_WINDOWS = 5


def _windows(through: int, window_events: int) -> list[int]:
    """The upper positions of the windows that cover 1..through."""
    count = min(_MAX_WINDOWS, math.ceil(through / window_events))
    size = math.ceil(through / count)
    return [min(through, size * k) for k in range(1, count + 1)]


def replay(
    log_root: str,
    db_path: str,
    until: datetime | None = None,
    projections: list[Projection] | None = None,
    on_progress: Progress | None = None,
    window_events: int = 2_000_000,
) -> dict[str, int]:
    """Rebuild every projection from position 0 into ``db_path`` (replacing it).

    Args:
        log_root: the event log folder.
        db_path: the projection database to (re)create.
        until: keep only events with ``occurred_at <= until`` (an aware datetime).
        projections: defaults to :func:`projections.store.default_projections`.
        on_progress: called as ``on_progress(done, total)`` after each window of
            positions (progress bars); without it the log is applied in one pass.
        window_events: the smallest window when ``on_progress`` is given.

    Returns:
        The position each projection reached.

    Example::

        replay("var/log", "var/projections.duckdb")
        replay("var/log", "audit-2024.duckdb", until=datetime(2025, 1, 1, tzinfo=UTC))
    """
    if until is not None and until.tzinfo is None:
        raise ValueError("until must be timezone-aware (UTC)")
    folder = os.path.dirname(os.path.abspath(db_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".replay-", suffix=".duckdb", dir=folder)
    os.close(fd)
    os.remove(tmp)  # DuckDB creates the file itself
    try:
        with ProjectionStore(tmp, projections) as store:
            con = store.con
            attach_log(con, log_root, view="events_all")
            if until is None:
                con.execute("CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM events_all")
            else:
                micros = int(until.astimezone(UTC).timestamp() * 1_000_000)
                con.execute(
                    "CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM events_all "
                    f"WHERE epoch_us(occurred_at) <= {micros}"
                )
            [(top,)] = con.execute("SELECT coalesce(max(position), 0) FROM events").fetchall()
            through = int(top)
            if on_progress is None or not through:
                positions = store.apply_attached(through) if through else store.positions()
            else:
                on_progress(0, through)
                for upper in _windows(through, window_events):
                    positions = store.apply_attached(upper)
                    on_progress(upper, through)
            con.execute("CHECKPOINT")  # all in the file itself, none in its .wal
        os.replace(tmp, db_path)
        for suffix in (".wal",):
            if os.path.exists(db_path + suffix):
                os.remove(db_path + suffix)
        return positions
    finally:
        for leftover in (tmp, tmp + ".wal"):
            if os.path.exists(leftover):
                os.remove(leftover)


@dataclass
class AuditReport:
    """Whether a live projection database equals a fresh replay of the log."""

    ok: bool
    live_positions: dict[str, int]
    replay_positions: dict[str, int]
    table_hashes: dict[str, str] = field(default_factory=dict)  # of the replay
    differing_tables: list[str] = field(default_factory=list)


def _hashes(db_path: str, out_dir: str) -> dict[str, str]:
    paths = export(db_path, "csv", out_dir)
    result = {}
    for name, path in sorted(paths.items()):
        with open(path, "rb") as f:
            result[name] = hashlib.sha256(f.read()).hexdigest()
    return result


def verify(log_root: str, db_path: str) -> AuditReport:
    """Replay the log up to the live database's positions and compare every exported table.

    The live database is only read. Differences name the tables that do not match
    (a projection bug, or a database edited by hand).
    """
    with duckdb.connect(db_path, read_only=True) as con:
        live = {
            str(n): int(p)
            for n, p in con.execute("SELECT name, position FROM projection_positions").fetchall()
        }
    with tempfile.TemporaryDirectory(prefix="v2g-audit-") as tmp:
        fresh = os.path.join(tmp, "replay.duckdb")
        through = min(live.values()) if live else 0
        with ProjectionStore(fresh) as store:
            attach_log(store.con, log_root, view="events_all")
            store.con.execute(
                "CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM events_all "
                f"WHERE position <= {through}"
            )
            if through:
                store.apply_attached(through)
            replayed = store.positions()
        mine = _hashes(fresh, os.path.join(tmp, "replay"))
        theirs = _hashes(db_path, os.path.join(tmp, "live"))
    differing = [t for t in EXPORT_TABLES if mine.get(t) != theirs.get(t)]
    ok = not differing and live == replayed
    return AuditReport(ok, live, replayed, mine, differing)
