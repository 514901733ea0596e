"""Read-only SQL over the projection database, for users and the `v2g sql` command.

Two locks, so a mistake in one is caught by the other:

1. Before running anything, every statement is classified by DuckDB's own parser
   (``duckdb.extract_statements``); anything but a query is refused with a
   :class:`ForbiddenStatement` naming its kind (``INSERT``, ``ATTACH``, ``COPY``,
   ``SET``/``RESET``/``USE``, ``PRAGMA``, ``INSTALL``/``LOAD``, ``EXPORT DATABASE``,
   ``CALL``, ``PREPARE``/``EXECUTE``, transactions, ...). Several statements are run
   only if every one of them is a query; the result is the last one's.
2. The query runs on a connection opened ``read_only`` with external access disabled
   and the configuration locked: it cannot write the database, read or write files
   (``read_csv``, ``read_parquet``, ``glob``, ``COPY`` ...), reach the network, or
   change a setting back.

A malformed query raises :class:`QueryError` with DuckDB's message (no traceback
from DuckDB's internals).
"""

from __future__ import annotations

import os
import re

import duckdb
import pyarrow as pa

__all__ = ["ForbiddenStatement", "QueryError", "query"]

# What each refused statement type is called in the error message.
_FORBIDDEN_KINDS: dict[str, str] = {
    "INSERT": "INSERT (writes rows)",
    "UPDATE": "UPDATE (writes rows)",
    "DELETE": "DELETE (writes rows)",
    "CREATE": "CREATE (changes the schema)",
    "DROP": "DROP (changes the schema)",
    "ALTER": "ALTER (changes the schema)",
    "ATTACH": "ATTACH (opens another database)",
    "DETACH": "DETACH (closes a database)",
    "COPY": "COPY (reads or writes files)",
    "COPY_DATABASE": "COPY DATABASE (writes a database)",
    "EXPORT": "EXPORT DATABASE (writes files)",
    "LOAD": "INSTALL/LOAD (extensions)",
    "SET": "SET/RESET/USE (changes settings)",
    "VARIABLE_SET": "SET VARIABLE (changes settings)",
    "PRAGMA": "PRAGMA (changes or reads settings)",
    "CALL": "CALL (runs a procedure)",
    "TRANSACTION": "BEGIN/COMMIT/ROLLBACK (transaction control)",
    "VACUUM": "VACUUM (writes the database)",
    "ANALYZE": "ANALYZE (writes statistics)",
    "PREPARE": "PREPARE (prepared statements)",
    "EXECUTE": "EXECUTE (prepared statements)",
    "MULTI": "a statement that expands to several (e.g. PIVOT ... creating types)",
    "UPDATE_EXTENSIONS": "UPDATE EXTENSIONS",
    "LOGICAL_PLAN": "a logical plan statement",
    "RELATION": "a relation statement",
    "EXTENSION": "an extension statement",
}
_ALLOWED = {"SELECT", "EXPLAIN"}


class QueryError(Exception):
    """The query could not be run: malformed SQL, unknown table, a DuckDB error."""


class ForbiddenStatement(QueryError):
    """The SQL holds a statement that is not a read-only query."""

    def __init__(self, kind: str, statement: str) -> None:
        text = " ".join(statement.split())
        if len(text) > 80:
            text = text[:77] + "..."
        super().__init__(f"refused: {kind} is not allowed, only read-only queries: {text!r}")
        self.kind = kind
        self.statement = statement


def _kind(statement: duckdb.Statement) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", re.IGNORECASE)


def _check(statement: duckdb.Statement) -> None:
    kind = _kind(statement)
    if kind not in _ALLOWED:
        raise ForbiddenStatement(_FORBIDDEN_KINDS.get(kind, kind), statement.query)
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: judge that one
        inner = _EXPLAIN.sub("", statement.query, count=1)
        for st in duckdb.extract_statements(inner):
            _check(st)


def query(db_path: str, sql: str) -> pa.Table:
    """Run read-only SQL against the projection database and return the result as Arrow.

    Args:
        db_path: the projection database file.
        sql: one or more SELECT statements (``WITH``, ``FROM t``, ``VALUES``,
            ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` and ``EXPLAIN`` are queries too).

    Raises:
        ForbiddenStatement: a statement that could write, load, attach, change a
            setting or touch files; nothing was run.
        QueryError: malformed SQL or a DuckDB error while running it.

    Example::

        >>> query("var/projections.duckdb",
        ...       "SELECT stream, sum(revenue_eur) FROM revenue_lines GROUP BY stream")
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    for st in statements:
        _check(st)
    if not os.path.exists(db_path):
        raise QueryError(f"no projection database at {db_path!r}")
    config = {"enable_external_access": False, "lock_configuration": True}
    try:
        with duckdb.connect(db_path, read_only=True, config=config) as con:
            result: pa.Table | None = None
            for st in statements:
                result = con.sql(st.query).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    assert result is not None
    return result
