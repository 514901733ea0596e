"""Price files: the real file's quirks, clear errors, the shipped 2024 year."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.gateways.price_files import (
    ENTSOE_NL,
    SHIPPED,
    SHIPPED_NL_2024,
    ColumnMapping,
    FilePriceFeed,
    PriceFeed,
    PriceFileError,
    load_prices,
)

HEADER = "Country,Datetime (UTC),Datetime (Local),Price (EUR/MWhe)\n"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + body, encoding="utf-8")
    return path


def test_both_timestamp_formats_duplicates_and_an_empty_row(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Netherlands,2022-12-31 22:00:00,2022-12-31 23:00:00,1.61\r\n"
        "Netherlands,2022-12-31 23:00:00,2023-01-01 00:00:00,-3.61\r\n"
        "Netherlands,,,0.0\r\n"
        "Netherlands,31/12/2022 23:00,01/01/2023 00:00,-3.61\r\n"
        "Netherlands,01/01/2023 00:00,01/01/2023 01:00,-1.46\r\n",
    )
    table, report = load_prices(path)
    assert table.num_rows == 3
    assert table.column("interval_start").type == pa.timestamp("s", tz="UTC")
    assert table.column("price_eur_per_mwh").to_pylist() == [1.61, -3.61, -1.46]
    assert (report.rows_read, report.duplicates_dropped) == (5, 1)
    assert report.bad_lines == [(4, "no timestamp")]


def test_a_repeat_with_another_price_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Netherlands,2023-01-01 00:00:00,x,1.0\nNetherlands,01/01/2023 00:00,x,2.0\n",
    )
    with pytest.raises(PriceFileError, match=r"prices.csv, line 3: .* line 2 says 1.0"):
        load_prices(path)


def test_too_many_bad_lines_is_an_error_naming_them(tmp_path: Path) -> None:
    path = write(tmp_path, "Netherlands,yesterday,x,1.0\n" * 3)
    with pytest.raises(PriceFileError, match="line 2: timestamp 'yesterday'"):
        load_prices(path, max_bad_lines=2)


def test_a_bad_price_and_a_short_row_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "Netherlands,2023-01-01 00:00:00,x,cheap\nNetherlands,2023\n")
    _, report = load_prices(path)
    assert [n for n, _ in report.bad_lines] == [2, 3]
    assert "fields" in report.bad_lines[1][1]


def test_missing_column_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PriceFileError, match="line 1"):
        load_prices(write(tmp_path, ""), ColumnMapping("when", "price"))
    with pytest.raises(PriceFileError, match="no such file"):
        load_prices(tmp_path / "nope.csv")


def test_parquet_with_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"ts": ["2024-01-01T00:00:00Z"], "eur": [-5.0]}), path)
    table, report = load_prices(path, ColumnMapping("ts", "eur"))
    assert table.column("price_eur_per_mwh").to_pylist() == [-5.0]
    assert report.rows_kept == 1


def test_the_shipped_year_is_2024_in_utc_and_names_its_gap() -> None:
    table, report = load_prices(SHIPPED_NL_2024, SHIPPED)
    times = table.column("interval_start").to_pylist()
    assert times[0] == datetime(2024, 1, 1, tzinfo=UTC)
    assert times[-1] == datetime(2024, 12, 31, 23, tzinfo=UTC)
    assert report.rows_kept == 8783 and report.duplicates_dropped == 0
    assert report.missing_intervals == [datetime(2024, 12, 30, 23, tzinfo=UTC)]
    assert min(table.column("price_eur_per_mwh").to_pylist()) < 0


def test_the_file_feed_is_a_price_feed() -> None:
    feed: PriceFeed = FilePriceFeed("nl-day-ahead")
    day = feed.prices(datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 2, tzinfo=UTC))
    assert day.num_rows == 24


def test_entsoe_mapping_reads_the_source_columns() -> None:
    assert ENTSOE_NL.interval_start == "Datetime (UTC)"
