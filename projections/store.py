"""The projection runner: DuckDB tables kept in step with the event log, position by position.

Every projection owns some tables in one DuckDB file (``<data_dir>/projections.duckdb``)
and one row of ``projection_positions(name, position)``: the last log position whose
events its tables include. :meth:`ProjectionStore.apply` brings each projection up to
the log's end, set-based. Each round reads the new events once: one pass over the
view :class:`events.sql.LogView` gives (Parquet segments plus the unsealed tail, read
incrementally) copies the rows of the event types the projections declare in
``reads``, and each type's payload is parsed once into a typed staging table
``_ev_<Type>`` (a struct ``p`` with the union of the fields every projection asks for).
Each projection's SQL reads those tables for ``position > its position`` and writes its
rows and its new position in one transaction. A position at or below the one recorded is refused
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

from events.base import UnknownEventType, event_class
from events.sql import LogView, TypedSources, forget_typed, typed_sources
from events.typed import COLUMN_PREFIX, TypedFile, json_structure, model_columns

__all__ = [
    "DEFAULT_DB_NAME",
    "PositionAlreadyApplied",
    "Projection",
    "ProjectionError",
    "ProjectionStore",
    "default_projections",
    "event_rows",
    "staged_table",
    "window_has",
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
    # event type -> payload field -> DuckDB type: what the runner parses for it
    reads: dict[str, dict[str, str]]

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create the tables and views if missing (idempotent)."""

    def apply(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        """Fold the events with ``after < position <= through`` of the view ``events``."""


def staged_table(type_name: str) -> str:
    """The temporary view of this round's events of ``type_name``, payload parsed."""
    if not type_name.isidentifier():
        raise ProjectionError(f"event type {type_name!r} is not a plain identifier")
    return f"_ev_{type_name}"


def event_rows(types: Sequence[str], fields: Sequence[str] | None = None) -> str:
    """SQL for the events of ``types`` in the window ``($after, $through]``, payload parsed.

    The payload is the struct ``p``, parsed once per round by the runner into the
    staging tables (:func:`staged_table`) with every field the projections declare in
    ``reads`` for that type. Several types are read together through ``fields``: then
    ``p`` holds just those (each type must declare them), so the structs line up.
    Timestamps are declared as ``TIMESTAMPTZ`` and turned into naive UTC with
    ``make_timestamp(epoch_us(...))`` (plain arithmetic, unlike ``timezone('UTC', ...)``,
    which goes through the ICU calendar), so nothing depends on the session's time zone.
    """
    if fields is None and len(types) > 1:
        raise ProjectionError("reading several event types together needs `fields`")
    payload = (
        "p"
        if fields is None
        else "struct_pack(" + ", ".join(f'"{f}" := p."{f}"' for f in fields) + ") AS p"
    )
    return " UNION ALL ".join(
        f"SELECT position, stream_id, type, occurred_at, {payload} FROM {staged_table(t)} "
        "WHERE position > $after AND position <= $through"
        for t in types
    )


# Per connection (by id, while its store is staging): the staged window and the event
# types it holds, so that `window_has` answers "absent" without a query.
_STAGED: dict[int, tuple[int, int, frozenset[str]]] = {}


def window_has(
    con: duckdb.DuckDBPyConnection, types: Sequence[str], after: int, through: int
) -> bool:
    """Whether this round's staged events of ``types`` include one in ``(after, through]``.

    Lets a projection skip statements whose only input is absent (a live round of a
    few hundred events rarely holds every type), instead of scanning its tables. A
    type absent from the whole staged window is known absent without a query.
    """
    staged = _STAGED.get(id(con))
    if staged is not None:
        lo, hi, present = staged
        if lo <= after and through <= hi:
            types = [t for t in types if t in present]
            if not types:
                return False
    probes = " UNION ALL ".join(
        f"SELECT 1 FROM {staged_table(t)} WHERE position > {int(after)} "
        f"AND position <= {int(through)}"
        for t in types
    )
    [(found,)] = con.execute(f"SELECT EXISTS ({probes})").fetchall()
    return bool(found)


def merged_reads(projections: Sequence[Projection]) -> dict[str, dict[str, str]]:
    """The union of the projections' ``reads``; one field must have one type everywhere."""
    merged: dict[str, dict[str, str]] = {}
    for p in projections:
        for typ, fields in p.reads.items():
            into = merged.setdefault(typ, {})
            for name, sql_type in fields.items():
                if into.setdefault(name, sql_type) != sql_type:
                    raise ProjectionError(
                        f"{typ}.{name}: projection {p.name!r} reads it as {sql_type}, "
                        f"another as {into[name]}"
                    )
    return merged


def _reaches(model_type: str, declared: str) -> bool:
    """Whether the payload is parsed as the model's type and then cast to the declared one.

    Numbers are parsed as the model holds them (a float is a DOUBLE, then rounded to a
    DECIMAL column's scale); a typed file (:mod:`events.typed`) holds the same DOUBLE,
    so a log read from typed files and one read from JSON give the same values.
    """
    declared = declared.upper()
    if model_type == declared or (model_type, declared) == ("BIGINT", "INTEGER"):
        return True
    exact = declared == "DOUBLE" or declared.startswith("DECIMAL")
    return model_type in ("DOUBLE", "BIGINT") and exact


@dataclass(frozen=True)
class _Plan:
    """How one event type's declared fields are staged.

    ``model`` is set when every declared field is typed by the event model (or absent
    from a model that never had another version: then no stored payload holds it and
    it is NULL); such a type is read from typed files where the log wrote them.
    """

    fields: dict[str, str]  # declared: field -> DuckDB type
    model: dict[str, str | None]  # field -> the model's type, None: absent (NULL)

    @property
    def typed(self) -> bool:
        return bool(self.model)

    def structure(self) -> str:
        """The ``from_json`` structure: the model's types (typed), else the declared ones."""
        if not self.model:
            return json_structure(self.fields)
        return json_structure({f: t for f, t in self.model.items() if t is not None})

    def struct(self, column: Callable[[str], str]) -> str:
        """``struct_pack`` of the declared fields, each cast from ``column(field)``."""
        parts = []
        for name, sql_type in self.fields.items():
            model_type = self.model.get(name, sql_type.upper()) if self.model else None
            if self.model and model_type is None:
                expr = f"CAST(NULL AS {sql_type})"
            else:
                expr = column(name)
                if self.model and model_type != sql_type.upper():
                    expr = f"CAST({expr} AS {sql_type})"
            parts.append(f'"{name}" := {expr}')
        return "struct_pack(" + ", ".join(parts) + ")"


def _plan(type_name: str, fields: dict[str, str]) -> _Plan:
    model = model_columns(type_name)
    try:
        first_version = event_class(type_name).schema_version == 1
    except UnknownEventType:
        return _Plan(fields, {})
    plan: dict[str, str | None] = {}
    for name, sql_type in fields.items():
        if name in model and _reaches(model[name], sql_type):
            plan[name] = model[name]
        elif name not in model and first_version:
            plan[name] = None
        else:
            return _Plan(fields, {})
    return _Plan(fields, plan)


def default_projections() -> list[Projection]:
    from projections.degradation_view import DegradationProjection
    from projections.energy import EnergyProjection
    from projections.revenue import RevenueProjection

    return [EnergyProjection(), RevenueProjection(), DegradationProjection()]


_VIEWS: dict[str, LogView] = {}
_VIEWS_LOCK = threading.Lock()


def shared_view(log_root: str) -> LogView:
    """The process's :class:`LogView` of a log folder, shared by every store that reads it.

    A caller that opens a new :class:`ProjectionStore` per round still reads only the
    write-ahead frames appended since the previous round.
    """
    key = os.path.abspath(log_root)
    with _VIEWS_LOCK:
        view = _VIEWS.get(key)
        if view is None:
            view = _VIEWS[key] = LogView(key)
        return view


@dataclass(frozen=True)
class _Window:
    after: int
    through: int


class ProjectionStore:
    """The projection database and the positions its projections have reached.

    Args:
        db_path: the DuckDB file (created if missing), or ``":memory:"``.
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
        self.reads = merged_reads(self.projections)
        self._plans = {t: _plan(t, f) for t, f in self.reads.items()}
        if db_path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
        self.con = _connect(db_path)
        if threads is not None:
            self.con.execute(f"SET threads = {int(threads)}")
        # sealed segments never change: their footers can be cached across polls
        self.con.execute("SET parquet_metadata_cache = true")
        self._staged_empty: set[str] = set()  # staging tables known to be empty
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
        _STAGED.pop(id(self.con), None)
        forget_typed(self.con)
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

        Projections already at that position are left alone; the new events are read
        once (only what was appended since the last call) for all of them.
        """
        with self._lock:
            at = self.positions()
            low = min(at.values(), default=0)
            self._view(log_root).attach(self.con, after=low)
            target = self._settled_end(low, through)
            return self._apply_all(target, at)

    def apply_attached(self, through: int) -> dict[str, int]:
        """Like :meth:`apply` over a view ``events`` the caller attached (replay uses it)."""
        with self._lock:
            return self._apply_all(through, self.positions())

    def apply_projection(self, name: str, log_root: str, through: int) -> int:
        """Apply one projection up to ``through``; refuses a position it already has."""
        with self._lock:
            [p] = [q for q in self.projections if q.name == name] or [None]
            if p is None:
                raise ProjectionError(f"no projection named {name!r}")
            current = self.position(p.name)
            self._view(log_root).attach(self.con, after=min(current, through))
            self._stage(min(current, through), through)
            return self._apply_one(p, through)

    def _view(self, log_root: str) -> LogView:
        return shared_view(log_root)

    def _apply_all(self, through: int, at: dict[str, int]) -> dict[str, int]:
        """Apply every projection behind ``through``; ``at`` are the positions before."""
        behind = [p for p in self.projections if at.get(p.name, 0) < through]
        if not behind:
            return dict(at)
        self._stage(min(at.get(p.name, 0) for p in behind), through)
        after = dict(at)
        for p in behind:
            after[p.name] = self._apply_one(p, through)
        return dict(sorted(after.items()))

    def _stage(self, after: int, through: int) -> None:
        """Stage the window's events once, one typed table per event type.

        Sealed events come from the typed files of their segments where the log wrote
        them; only the rest (the unsealed tail, segments sealed without typed files,
        types the model does not type) is parsed from JSON.
        """
        con = self.con
        window = f"position > {int(after)} AND position <= {int(through)}"
        typed = typed_sources(con)
        if typed is not None and not self._view_is_whole(typed, window):
            typed = None  # `events` is a filtered view of what was attached: read it all
        files = self._typed_files(typed, after, through)
        con.execute("CREATE OR REPLACE TEMP TABLE _ev_raw AS " + self._raw_rows(typed, window))
        parsed = {str(t) for (t,) in con.execute("SELECT DISTINCT type FROM _ev_raw").fetchall()}
        present = parsed | {t for t, f in files.items() if f}
        _STAGED[id(con)] = (after, through, frozenset(present))
        for typ, plan in self._plans.items():
            view = staged_table(typ)
            if typ not in present and view in self._staged_empty:
                continue  # still the empty view of an earlier round: no statement
            # the JSON-parsed rows are a table (parsed once, read by several projections);
            # the typed files are read in place, through the view
            where = "type = " + _quote(typ) if typ in parsed else "false"
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {_parsed_table(typ)} AS SELECT position, "
                f"stream_id, type, occurred_at, {plan.struct(_json_field)} AS p FROM ("
                "SELECT position, stream_id, type, occurred_at, "
                f"from_json(payload, {_quote(plan.structure())}) AS j FROM _ev_raw WHERE {where})"
            )
            selects = [f"SELECT * FROM {_parsed_table(typ)}"]
            if files.get(typ):
                selects.insert(0, _typed_rows(typ, plan, files[typ], window))
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS " + " UNION ALL ".join(selects))
            if typ in present:
                self._staged_empty.discard(view)
            else:
                self._staged_empty.add(view)
        con.execute("DROP TABLE _ev_raw")

    def _view_is_whole(self, typed: TypedSources, window: str) -> bool:
        """Whether ``events`` holds, in the window, every event of the view attached."""
        if typed.view == "events":
            return True
        # the audit replay's `events` over the whole log: known without counting
        rows = self.con.execute(
            "SELECT sql FROM duckdb_views() WHERE temporary AND view_name = 'events'"
        ).fetchall()
        if rows and " ".join(str(rows[0][0]).split()).rstrip(";").endswith(
            f"events AS SELECT * FROM {typed.view}"
        ):
            return True
        [(same,)] = self.con.execute(
            f"SELECT (SELECT count(*) FROM events WHERE {window}) = "
            f"(SELECT count(*) FROM {typed.view} WHERE {window})"
        ).fetchall()
        return bool(same)

    def _typed_files(
        self, typed: TypedSources | None, after: int, through: int
    ) -> dict[str, list[TypedFile]]:
        """Per typed event type, its typed files that may hold events of the window."""
        if typed is None:
            return {}
        out: dict[str, list[TypedFile]] = {}
        for typ, plan in self._plans.items():
            if not plan.typed:
                continue
            out[typ] = [
                f
                for f in typed.files.get(typ, [])
                if f.last_position > after and f.first_position <= through and _fits(f, plan)
            ]
        return out

    def _raw_rows(self, typed: TypedSources | None, window: str) -> str:
        """SQL: the window's events whose payload is parsed from JSON this round."""
        columns = "SELECT position, stream_id, type, occurred_at, payload FROM"
        if typed is None:
            return f"{columns} events WHERE {window} AND type IN ({_names(list(self._plans))})"
        selects = []
        untyped = [t for t, p in self._plans.items() if not p.typed]
        if untyped:
            selects.append(f"{columns} events WHERE {window} AND type IN ({_names(untyped)})")
        typed_types = [t for t, p in self._plans.items() if p.typed]
        if typed_types:
            selects.append(
                f"{columns} {typed.json_view} WHERE {window} AND type IN ({_names(typed_types)})"
            )
        for typ in typed_types:
            # segments with typed files, but none (or one of another shape) for this type
            plan = self._plans[typ]
            segments = list(typed.untyped.get(typ, []))
            segments += [_segment_of(f) for f in typed.files.get(typ, []) if not _fits(f, plan)]
            if segments:
                paths = ", ".join(_quote(p) for p in segments)
                selects.append(
                    f"{columns} read_parquet([{paths}]) WHERE {window} AND type = {_quote(typ)}"
                )
        return " UNION ALL ".join(selects)

    def _apply_one(self, p: Projection, through: int) -> int:
        con = self.con
        con.begin()
        try:
            at = self.positions()  # read inside the transaction that writes the new one
            current = at.get(p.name, 0)
            if through <= current:
                raise PositionAlreadyApplied(p.name, through, current)
            for dep in p.depends_on:
                if at.get(dep, 0) < through:
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

    def _settled_end(self, low: int, through: int | None) -> int:
        """The last position before the first hole in the log (see the module docstring)."""
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

        Polls the log folder every ``poll_s`` (at once after a round that applied
        events); each round is one :meth:`apply`.
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
            moved = now != last
            if moved:
                last = now
                if on_applied is not None:
                    on_applied(now)
            # a round that applied events took a while: what came meanwhile is read at once
            stop.wait(0 if moved else poll_s)

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


#: Rows per row group in the projection file. DuckDB's default, 122,880, makes a live
#: round's checkpoint rewrite the table's last, partly filled row group whole: an
#: append of 1,000 rows to a 3.3M-row table then checkpoints in ~200 ms once in every
#: 10 to 30 checkpoints, against 3-8 ms otherwise (measured at 10M events). At 16,384
#: the rewrite is at most that many rows.
_ROW_GROUP_ROWS = 16_384


def _connect(db_path: str) -> duckdb.DuckDBPyConnection:
    """A connection whose current database is ``db_path`` (row groups see above)."""
    con = duckdb.connect()
    if db_path != ":memory:":
        con.execute(f"ATTACH {_quote(db_path)} AS projections (ROW_GROUP_SIZE {_ROW_GROUP_ROWS})")
        con.execute("USE projections")
    return con


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _parsed_table(type_name: str) -> str:
    return "_evjson" + staged_table(type_name)


def _json_field(name: str) -> str:
    return f'j."{name}"'


def _names(types: Sequence[str]) -> str:
    return ", ".join(_quote(t) for t in types)


def _fits(f: TypedFile, plan: _Plan) -> bool:
    """Whether a typed file holds each field as the model types it (or not at all: a
    field the model gained since, absent from those payloads)."""
    return all(
        model is None or f.columns.get(name, model) == model for name, model in plan.model.items()
    )


def _segment_of(f: TypedFile) -> str:
    name = os.path.basename(f.path)  # typ-<first>-<last>-<Type>.parquet
    return os.path.join(os.path.dirname(f.path), "seg-" + name[4:45] + ".parquet")


def _typed_rows(typ: str, plan: _Plan, files: list[TypedFile], window: str) -> str:
    """SQL: the window's events of ``typ`` from typed files, shaped like the parsed ones."""
    held = set().union(*(f.columns for f in files))
    paths = ", ".join(_quote(f.path) for f in files)
    return (
        f"SELECT position, stream_id, {_quote(typ)} AS type, occurred_at, "
        + plan.struct(
            lambda f: f'"{COLUMN_PREFIX}{f}"' if f in held else f"CAST(NULL AS {plan.model[f]})"
        )
        + f" AS p FROM read_parquet([{paths}], union_by_name = true) WHERE {window}"
    )


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
