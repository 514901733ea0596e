"""Read-only SQL: queries run, everything that could write, load or touch files is refused."""

from __future__ import annotations

import os

import duckdb
import pytest

from projections.sql_guard import ForbiddenStatement, QueryError, query


@pytest.fixture
def db(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "p.duckdb")
    with duckdb.connect(path) as con:
        con.execute(
            "CREATE TABLE revenue_lines AS SELECT 'arbitrage' AS stream, 1.5 AS revenue_eur"
        )
    return path


def test_a_select_returns_an_arrow_table(db: str) -> None:
    table = query(db, "SELECT stream, revenue_eur FROM revenue_lines")
    assert table.to_pylist() == [{"stream": "arbitrage", "revenue_eur": 1.5}]


@pytest.mark.parametrize(
    "sql",
    [
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "FROM revenue_lines",
        "VALUES (1)",
        "DESCRIBE revenue_lines",
        "SHOW TABLES",
        "SUMMARIZE revenue_lines",
        "EXPLAIN SELECT * FROM revenue_lines",
        "SELECT 1; SELECT 2 AS two",
    ],
)
def test_other_read_only_queries_run(db: str, sql: str) -> None:
    assert query(db, sql).num_rows >= 1


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("INSERT INTO revenue_lines VALUES ('x', 1)", "INSERT"),
        ("UPDATE revenue_lines SET revenue_eur = 0", "UPDATE"),
        ("DELETE FROM revenue_lines", "DELETE"),
        ("CREATE TABLE t (a INT)", "CREATE"),
        ("CREATE VIEW v AS SELECT 1", "CREATE"),
        ("DROP TABLE revenue_lines", "DROP"),
        ("ALTER TABLE revenue_lines ADD COLUMN b INT", "ALTER"),
        ("ATTACH 'other.duckdb' AS o", "ATTACH"),
        ("DETACH o", "DETACH"),
        ("COPY revenue_lines TO 'out.csv'", "COPY"),
        ("COPY (SELECT 1) TO 'out.csv'", "COPY"),
        ("COPY revenue_lines FROM 'in.csv'", "COPY"),
        ("INSTALL httpfs", "INSTALL/LOAD"),
        ("LOAD httpfs", "INSTALL/LOAD"),
        ("SET threads = 1", "SET"),
        ("RESET threads", "SET"),
        ("SET enable_external_access = true", "SET"),
        ("PRAGMA enable_profiling", "PRAGMA"),
        ("EXPORT DATABASE 'dump'", "EXPORT DATABASE"),
        ("CALL pragma_version()", "CALL"),
        ("CHECKPOINT", "CALL"),
        ("BEGIN TRANSACTION", "BEGIN/COMMIT"),
        ("VACUUM", "VACUUM"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("SELECT 1; DELETE FROM revenue_lines", "DELETE"),
        ("EXPLAIN ANALYZE DELETE FROM revenue_lines", "DELETE"),
    ],
)
def test_statements_that_are_not_queries_are_refused_by_kind(db: str, sql: str, kind: str) -> None:
    with pytest.raises(ForbiddenStatement, match="refused: " + kind.split("/")[0]) as info:
        query(db, sql)
    assert kind.split(" ")[0].split("/")[0] in info.value.kind
    assert query(db, "SELECT count(*) AS n FROM revenue_lines").to_pylist() == [{"n": 1}]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM read_parquet('x.parquet')",
    ],
)
def test_table_functions_that_read_files_are_refused(db: str, sql: str) -> None:
    with pytest.raises(QueryError, match="disabled by configuration"):
        query(db, sql)


def test_malformed_sql_is_our_error_with_duckdbs_message(db: str) -> None:
    with pytest.raises(QueryError, match="syntax error") as info:
        query(db, "SELEC stream FROM revenue_lines")
    assert not isinstance(info.value, ForbiddenStatement)
    with pytest.raises(QueryError, match="no_such_table"):
        query(db, "SELECT * FROM no_such_table")
    with pytest.raises(QueryError, match="no SQL statement"):
        query(db, "  ")
    with pytest.raises(QueryError, match="no projection database"):
        query(db + ".missing", "SELECT 1")
