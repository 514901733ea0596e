"""Typed payload columns of sealed segments, so readers scan fields without parsing JSON.

When the log seals ``seg-<first>-<last>.parquet`` it also writes, in the same folder:

    typ-<first>-<last>-<Type>.parquet   per event type of the segment: ``position``,
                                        ``stream_id``, ``occurred_at`` and one column
                                        ``p_<field>`` per scalar field of the type's
                                        event model, in position order
    typ-<first>-<last>.json             the index: which types have a typed file (with
                                        row count, position range and column types)
                                        and which are in the segment without one

Each file is written to a temporary name, fsynced and renamed, the index last, all
before the manifest names the segment; a segment listed without an index (a log sealed
before typed files existed) is read from its JSON payloads, and so is a type listed as
``untyped`` (no model, or a payload the model's types do not parse).

The JSON ``payload`` column stays the source of truth the hash chain covers: the typed
columns are derived from it by DuckDB's ``from_json`` with the types
:func:`model_columns` derives from the pydantic event model (number -> DOUBLE, integer
-> BIGINT, date-time -> TIMESTAMPTZ, string or enum -> VARCHAR, boolean -> BOOLEAN;
lists and objects are left out). A reader of the JSON parses with the same types, so
both give the same values; ``v2g log verify`` checks that they do (:func:`check_typed`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import duckdb
import pyarrow as pa

from events.base import UnknownEventType, event_class
from events.wal import fsync_dir

__all__ = [
    "COLUMN_PREFIX",
    "TypedFile",
    "TypedIndex",
    "check_typed",
    "index_path",
    "model_columns",
    "read_index",
    "write_typed",
]

COLUMN_PREFIX = "p_"
_FORMAT = 1
_ENVELOPE = ("position", "stream_id", "occurred_at")


@cache
def model_columns(type_name: str) -> dict[str, str]:
    """The scalar fields of an event type's current model and their DuckDB types.

    Empty for an unknown type. Lists, objects and unions of several types are left out
    (readers parse those from the JSON).
    """
    try:
        cls = event_class(type_name)
    except UnknownEventType:
        return {}
    schema = cls.model_json_schema()
    columns: dict[str, str] = {}
    for name, prop in schema.get("properties", {}).items():
        sql_type = _sql_type(prop, schema.get("$defs", {}))
        if sql_type is not None:
            columns[name] = sql_type
    return columns


def _sql_type(prop: dict[str, Any], defs: dict[str, Any]) -> str | None:
    if "$ref" in prop:
        return _sql_type(defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), defs)
    if "anyOf" in prop:  # X | None is X, nullable; any other union is left to the JSON
        kinds = [p for p in prop["anyOf"] if p.get("type") != "null"]
        return _sql_type(kinds[0], defs) if len(kinds) == 1 else None
    kind = prop.get("type")
    if kind == "number":
        return "DOUBLE"
    if kind == "integer":
        return "BIGINT"
    if kind == "boolean":
        return "BOOLEAN"
    if kind == "string":
        return "TIMESTAMPTZ" if prop.get("format") == "date-time" else "VARCHAR"
    return None


def json_structure(columns: dict[str, str]) -> str:
    """The ``from_json`` structure argument for these fields and types."""
    return "{" + ", ".join(f'"{k}": "{v}"' for k, v in columns.items()) + "}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def index_path(folder: str, first: int, last: int) -> str:
    return os.path.join(folder, f"typ-{first:020d}-{last:020d}.json")


def _file_name(first: int, last: int, type_name: str) -> str:
    return f"typ-{first:020d}-{last:020d}-{type_name}.parquet"


@dataclass(frozen=True)
class TypedFile:
    type: str
    path: str
    count: int
    first_position: int
    last_position: int
    columns: dict[str, str]  # payload field -> DuckDB type (the column is p_<field>)


@dataclass(frozen=True)
class TypedIndex:
    files: dict[str, TypedFile]
    untyped: frozenset[str]  # types in the segment without a typed file


def write_typed(table: pa.Table, folder: str, first: int, last: int) -> list[str]:
    """Write the typed files and the index of one segment (before the manifest names it).

    ``table`` holds the segment's rows (``events.schema.RECORD_SCHEMA``), in position
    order. Returns the paths written; each is durable when this returns. Never fails on
    a payload: a type whose payloads the model's types do not parse is listed untyped.
    """
    con = duckdb.connect()
    try:
        con.execute("SET threads = 1")  # a background job beside the log's writer
        con.register(
            "_segment", table.select(["position", "stream_id", "occurred_at", "type", "payload"])
        )
        types = sorted(
            str(t) for (t,) in con.execute("SELECT DISTINCT type FROM _segment").fetchall()
        )
        written: list[str] = []
        files: dict[str, dict[str, Any]] = {}
        untyped: list[str] = []
        for type_name in types:
            columns = model_columns(type_name) if type_name.isidentifier() else {}
            if not columns:
                untyped.append(type_name)
                continue
            path = os.path.join(folder, _file_name(first, last, type_name))
            try:
                count, lo, hi = _write_type(con, type_name, columns, path)
            except duckdb.Error:
                untyped.append(type_name)
                _remove(path + ".tmp")
                continue
            written.append(path)
            files[type_name] = {
                "file": os.path.basename(path),
                "count": count,
                "first_position": lo,
                "last_position": hi,
                "columns": columns,
            }
        doc = {"format": _FORMAT, "types": files, "untyped": untyped}
        index = index_path(folder, first, last)
        with open(index + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(index + ".tmp", index)
        fsync_dir(folder)
        return [*written, index]
    finally:
        con.close()


def _write_type(
    con: duckdb.DuckDBPyConnection, type_name: str, columns: dict[str, str], path: str
) -> tuple[int, int, int]:
    # one thread keeps the rows in the segment's (position) order: no sort needed
    rows = _typed_rows("_segment", type_name, columns)
    tmp = path + ".tmp"
    con.execute(
        f"COPY ({rows}) TO {_quote(tmp)} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 131072)"
    )
    [(count, lo, hi)] = con.execute(
        "SELECT count(*), min(position), max(position) FROM _segment "
        f"WHERE type = {_quote(type_name)}"
    ).fetchall()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return int(count), int(lo), int(hi)


def _typed_rows(source: str, type_name: str, columns: dict[str, str]) -> str:
    """SQL: the rows of ``type_name`` in ``source`` (a table or a FROM-able expression),
    payload parsed into the typed file's columns."""
    fields = ", ".join(f'j."{k}" AS "{COLUMN_PREFIX}{k}"' for k in columns)
    structure = _quote(json_structure(columns))
    return (
        f"SELECT position, stream_id, occurred_at, {fields} FROM ("
        f"SELECT position, stream_id, occurred_at, from_json(payload, {structure}) AS j "
        f"FROM {source} WHERE type = {_quote(type_name)})"
    )


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def read_index(segment_path: str, first: int, last: int) -> TypedIndex | None:
    """The typed files of a sealed segment, or None if it has none (sealed before them)."""
    folder = os.path.dirname(segment_path)
    try:
        with open(index_path(folder, first, last)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    if doc.get("format") != _FORMAT:
        return None  # a layout this code does not know: read the JSON
    files = {
        t: TypedFile(
            t,
            os.path.join(folder, e["file"]),
            int(e["count"]),
            int(e["first_position"]),
            int(e["last_position"]),
            dict(e["columns"]),
        )
        for t, e in doc["types"].items()
    }
    return TypedIndex(files, frozenset(doc["untyped"]))


def check_typed(segment_path: str, first: int, last: int) -> str | None:
    """Whether a segment's typed files hold exactly what its JSON payloads say.

    Returns None when they do (or the segment has no typed files), else what differs.
    """
    index = read_index(segment_path, first, last)
    if index is None:
        return None
    con = duckdb.connect()
    try:
        seg = _quote(segment_path)
        rows = con.execute(
            f"SELECT type, count(*) FROM read_parquet({seg}) GROUP BY type"
        ).fetchall()
        in_segment = {str(t): int(n) for t, n in rows}
        listed = set(index.files) | set(index.untyped)
        if set(in_segment) != listed:
            return f"types {sorted(set(in_segment) ^ listed)} differ between segment and index"
        for type_name, tf in index.files.items():
            if in_segment[type_name] != tf.count:
                return f"{type_name}: {tf.count} typed rows, {in_segment[type_name]} in the segment"
            parsed = _typed_rows(f"read_parquet({seg})", type_name, tf.columns)
            names = ["stream_id", "occurred_at", *(f"{COLUMN_PREFIX}{k}" for k in tf.columns)]
            differs = " OR ".join(f'a."{n}" IS DISTINCT FROM b."{n}"' for n in names)
            # positions are unique: pair the rows by position, every unpaired row differs
            [(diff,)] = con.execute(
                f"SELECT count(*) FROM ({parsed}) a FULL OUTER JOIN "
                f"read_parquet({_quote(tf.path)}) b ON a.position = b.position "
                f"WHERE a.position IS NULL OR b.position IS NULL OR {differs}"
            ).fetchall()
            if diff:
                return f"{type_name}: {diff} typed rows differ from the JSON payloads"
        return None
    finally:
        con.close()
