"""The projection runner: DuckDB tables kept in step with the event log, position by position.

Every projection owns some tables in one DuckDB file (``<data_dir>/projections.duckdb``)
and one row of ``projection_positions(name, position)``: the last log position whose
events its tables include. :meth:`ProjectionStore.apply` brings each projection up to
the log's end, set-based: the projection's SQL reads the events with
``position > its position`` from the view :func:`events.sql.attach_log` gives (Parquet
segments plus the unsealed tail) and writes its rows and its new position in one
transaction. A position at or below the one recorded is refused
(:class:`PositionAlreadyApplied`), so an event applied twice counts once.

A projection is written so that applying events in several steps gives exactly the
tables one step would (the audit replay, :mod:`projections.replay`, relies on it):
money and energy are DECIMAL (sums are exact, in any order), every value that depends
on an earlier fact looks it up by log position, and rows that a later event can change
(a setpoint's end, a price revision) are deleted and recomputed by key.

Positions are global but a reader of the folder can see a partition's frame of a
commit round before another partition's frame of the same round: a short-lived gap.
The runner therefore applies only up to the last position before the first gap; a gap
still there after ``gap_grace_s`` is taken as permanent (events a crash never
acknowledged; see :mod:`events.log`) and skipped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import duckdb

from events.sql import attach_log

__all__ = [
    "DEFAULT_DB_NAME",
    "PositionAlreadyApplied",
    "Projection",
    "ProjectionError",
    "ProjectionStore",
    "default_projections",
    "event_rows",
]

DEFAULT_DB_NAME = "projections.duckdb"


class ProjectionError(Exception):
    """Base of the projections' own errors."""


class PositionAlreadyApplied(ProjectionError):
    """The projection already holds events up to this position (or beyond)."""

    def __init__(self, name: str, position: int, current: int) -> None:
        super().__init__(
            f"projection {name!r} is at position {current}; refusing to apply up to {position}"
        )
        self.name = name
        self.position = position
        self.current = current


class Projection(Protocol):
    """One projection: its tables, and set-based SQL that folds events into them."""

    name: str
    depends_on: tuple[str, ...]
    tables: tuple[str, ...]  # base tables, dropped on reset (views are recreated by create)

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the tables and views if missing (idempotent)."""

    def apply(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        """Fold the events with ``after < position <= through`` of the view ``events``."""


def event_rows(types: Sequence[str], fields: dict[str, str]) -> str:
    """SQL for the events of ``types`` in the window ``($after, $through]``, payload parsed once.

    ``fields`` maps payload field -> DuckDB type; the parsed payload is the struct ``p``.
    Timestamps should be asked for as ``TIMESTAMPTZ`` and turned into naive UTC with
    ``timezone('UTC', ...)``, so nothing depends on the session's time zone.
    """
    structure = "{" + ", ".join(f'"{k}": "{v}"' for k, v in fields.items()) + "}"
    names = ", ".join("'" + t + "'" for t in types)
    return (
        "SELECT position, stream_id, type, occurred_at, "
        f"from_json(payload, '{structure}') AS p FROM events "
        f"WHERE position > $after AND position <= $through AND type IN ({names})"
    )


def default_projections() -> list[Projection]:
    from projections.degradation_view import DegradationProjection
    from projections.energy import EnergyProjection
    from projections.revenue import RevenueProjection

    return [EnergyProjection(), RevenueProjection(), DegradationProjection()]


@dataclass(frozen=True)
class _Window:
    after: int
    through: int


class ProjectionStore:
    """The projection database and the positions its projections have reached.

    Args:
        db_path: the DuckDB file (created if missing).
        projections: defaults to energy, revenue and degradation, in dependency order.
        gap_grace_s: how long a hole in the log's positions may stay before it is
            taken as permanent and skipped.

    Example::

        with ProjectionStore("var/projections.duckdb") as store:
            store.apply("var/log")            # catch up with the log
            print(store.positions())          # {'energy': 1234, 'revenue': 1234, ...}
    """

    def __init__(
        self,
        db_path: str,
        projections: Sequence[Projection] | None = None,
        *,
        gap_grace_s: float = 2.0,
        threads: int | None = None,
    ) -> None:
        self.db_path = db_path
        self.projections = list(projections) if projections is not None else default_projections()
        names = [p.name for p in self.projections]
        for p in self.projections:
            for dep in p.depends_on:
                if dep not in names or names.index(dep) > names.index(p.name):
                    raise ProjectionError(f"projection {p.name!r} needs {dep!r} applied before it")
        self.gap_grace_s = gap_grace_s
        parent = os.path.dirname(os.path.abspath(db_path))
        os.makedirs(parent, exist_ok=True)
        self.con = duckdb.connect(db_path)
        if threads is not None:
            self.con.execute(f"SET threads = {int(threads)}")
        self._gap_seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS projection_positions "
            "(name VARCHAR PRIMARY KEY, position BIGINT NOT NULL)"
        )
        for p in self.projections:
            p.create(self.con)
            self.con.execute(
                "INSERT INTO projection_positions VALUES (?, 0) ON CONFLICT DO NOTHING", [p.name]
            )

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> ProjectionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ positions

    def positions(self) -> dict[str, int]:
        rows = self.con.execute(
            "SELECT name, position FROM projection_positions ORDER BY name"
        ).fetchall()
        return {str(n): int(p) for n, p in rows}

    def position(self, name: str) -> int:
        rows = self.con.execute(
            "SELECT position FROM projection_positions WHERE name = ?", [name]
        ).fetchall()
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ applying

    def apply(self, log_root: str, through: int | None = None) -> dict[str, int]:
        """Bring every projection up to the log's end (or ``through``); returns the positions.

        Projections already at that position are left alone; the log is read once
        (as a DuckDB view) for all of them.
        """
        with self._lock:
            attach_log(self.con, log_root)
            target = self._settled_end(through)
            for p in self.projections:
                if self.position(p.name) < target:
                    self._apply_one(p, target)
            return self.positions()

    def apply_attached(self, through: int) -> dict[str, int]:
        """Like :meth:`apply` over a view ``events`` the caller attached (replay uses it)."""
        with self._lock:
            for p in self.projections:
                if self.position(p.name) < through:
                    self._apply_one(p, through)
            return self.positions()

    def apply_projection(self, name: str, log_root: str, through: int) -> int:
        """Apply one projection up to ``through``; refuses a position it already has."""
        with self._lock:
            attach_log(self.con, log_root)
            [p] = [q for q in self.projections if q.name == name] or [None]
            if p is None:
                raise ProjectionError(f"no projection named {name!r}")
            return self._apply_one(p, through)

    def _apply_one(self, p: Projection, through: int) -> int:
        con = self.con
        con.begin()
        try:
            current = self.position(p.name)
            if through <= current:
                raise PositionAlreadyApplied(p.name, through, current)
            for dep in p.depends_on:
                if self.position(dep) < through:
                    raise ProjectionError(
                        f"projection {p.name!r} needs {dep!r} at position {through} first"
                    )
            p.apply(con, current, through)
            con.execute(
                "UPDATE projection_positions SET position = ? WHERE name = ?", [through, p.name]
            )
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return through

    def _settled_end(self, through: int | None) -> int:
        """The last position before the first hole in the log (see the module docstring)."""
        low = min(self.position(p.name) for p in self.projections)
        bound = "" if through is None else f" AND position <= {int(through)}"
        [(count, top)] = self.con.execute(
            f"SELECT count(*), coalesce(max(position), 0) FROM events WHERE position > ?{bound}",
            [low],
        ).fetchall()
        count, top = int(count), int(top)
        if top == 0 or count == top - low:
            self._gap_seen.clear()
            return max(top, low)
        first_gap = self._first_gap(low, bound)
        seen = self._gap_seen.setdefault(first_gap, time.monotonic())
        if time.monotonic() - seen >= self.gap_grace_s:
            return top  # permanent: a crash left these positions unacknowledged
        return first_gap - 1

    def _first_gap(self, low: int, bound: str) -> int:
        rows = self.con.execute(
            "SELECT min(position) + 1 FROM (SELECT position, lead(position) OVER "
            "(ORDER BY position) AS nxt FROM (SELECT position FROM events "
            f"WHERE position > ?{bound}"
            " UNION ALL SELECT ?)) WHERE nxt IS NOT NULL AND nxt <> position + 1",
            [low, low],
        ).fetchall()
        return int(rows[0][0]) if rows and rows[0][0] is not None else low + 1

    # ------------------------------------------------------------------ live

    def follow(
        self,
        log_root: str,
        stop: threading.Event,
        *,
        poll_s: float = 0.05,
        on_applied: Callable[[dict[str, int]], None] | None = None,
        max_rounds: int | None = None,
    ) -> None:
        """Keep applying new events until ``stop`` is set (or after ``max_rounds`` polls).

        Polls the log folder every ``poll_s``; each round is one :meth:`apply`.
        ``on_applied`` is called with the positions after every round that moved them.
        """
        rounds = 0
        last: dict[str, int] = {}
        while not stop.is_set() and (max_rounds is None or rounds < max_rounds):
            rounds += 1
            try:
                now = self.apply(log_root)
            except FileNotFoundError:
                now = last  # the log folder is not created yet
            if now != last:
                last = now
                if on_applied is not None:
                    on_applied(now)
            stop.wait(poll_s)

    # ------------------------------------------------------------------ rebuild

    def reset(self) -> None:
        """Drop every projection's tables and positions (the next apply starts at 0)."""
        with self._lock:
            for p in reversed(self.projections):
                for table in p.tables:
                    self.con.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
            self.con.execute("DELETE FROM projection_positions")
            for p in self.projections:
                p.create(self.con)
                self.con.execute("INSERT INTO projection_positions VALUES (?, 0)", [p.name])


@contextmanager
def opened_store(db_path: str, **kwargs: object) -> Iterator[ProjectionStore]:
    store = ProjectionStore(db_path, **kwargs)  # type: ignore[arg-type]
    try:
        yield store
    finally:
        store.close()


def window(after: int, through: int) -> dict[str, int]:
    """The named parameters every projection statement takes."""
    return {"after": after, "through": through}
