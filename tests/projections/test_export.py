"""Export for accounting tools: the four tables, CSV and Parquet, with clear errors."""

from __future__ import annotations

import csv
import os

import pyarrow.parquet as pq
import pytest

from projections.export import ExportError, export
from projections.replay import replay
from tests.projections.test_store import build_story


@pytest.fixture
def db(tmp_path: object) -> str:
    build_story(os.path.join(str(tmp_path), "log"))
    path = os.path.join(str(tmp_path), "p.duckdb")
    replay(os.path.join(str(tmp_path), "log"), path)
    return path


def test_csv_export_has_the_four_tables_with_headers(db: str, tmp_path: object) -> None:
    paths = export(db, "csv", os.path.join(str(tmp_path), "csv"))
    assert set(paths) == {"telemetry", "energy", "revenue", "degradation"}
    with open(paths["revenue"], newline="") as f:
        lines = list(csv.DictReader(f))
    first = lines[0]
    assert first["stream"] == "arbitrage"
    assert first["interval_start"] == "2024-06-03T10:00:00.000000"
    assert first["revenue_eur"] == "-0.330000"
    assert {"energy_position", "price_position"} <= set(first)


def test_parquet_export_keeps_decimals(db: str, tmp_path: object) -> None:
    paths = export(db, "parquet", os.path.join(str(tmp_path), "pq"))
    table = pq.read_table(paths["energy"])
    assert str(table.schema.field("charged_kwh").type).startswith("decimal")
    assert pq.read_table(paths["telemetry"]).num_rows == 2


def test_bad_format_and_missing_database(tmp_path: object, db: str) -> None:
    with pytest.raises(ExportError, match="unknown export format"):
        export(db, "xlsx", str(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="run a replay"):
        export(db + ".nope", "csv", str(tmp_path))


def test_each_table_written_is_reported_for_progress(db: str, tmp_path: object) -> None:
    reported: list[tuple[str, int, int]] = []
    export(db, "csv", os.path.join(str(tmp_path), "csv"), on_table=lambda *t: reported.append(t))
    assert reported == [
        ("telemetry", 1, 4),
        ("energy", 2, 4),
        ("revenue", 3, 4),
        ("degradation", 4, 4),
    ]
