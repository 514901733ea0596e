"""Price files: historical day-ahead prices as a pyarrow table, and the `PriceFeed` seam.

The loader reads CSV or Parquet through a `ColumnMapping` (which column holds the
UTC interval start, which the price, which timestamp formats to accept) into a
table with two columns, `interval_start` (timestamp[s, UTC]) and
`price_eur_per_mwh` (float64), sorted and unique by interval start. It copes with
what the ENTSO-E Netherlands file (as distributed in ev2gym 2.0.0) really holds:

- the timestamp format changes from ISO to day/month/year at the end of 2022;
- 2023 holds overlapping and repeated hours: identical repeats are dropped and
  counted; a repeat with a *different* price is an error naming both lines;
- a row with no timestamp ("Netherlands,,,0.0") is a bad line, reported with
  its line number and skipped (up to `max_bad_lines`, then an error);
- negative prices are real and kept; everything is UTC (local time is ignored).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "ENTSOE_NL",
    "SHIPPED",
    "SHIPPED_NL_2024",
    "ColumnMapping",
    "FilePriceFeed",
    "LoadReport",
    "PriceFeed",
    "PriceFileError",
    "load_prices",
    "write_prices_csv",
]

SHIPPED_NL_2024 = Path(__file__).resolve().parent.parent / "data" / "nl_day_ahead_2024.csv"


class PriceFileError(ValueError):
    """A price file that cannot be trusted; the message names file, line and problem."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which source columns hold what, and how timestamps are written (all UTC)."""

    interval_start: str
    price_eur_per_mwh: str
    timestamp_formats: tuple[str, ...] = ("%Y-%m-%dT%H:%M:%SZ",)


ENTSOE_NL = ColumnMapping(
    interval_start="Datetime (UTC)",
    price_eur_per_mwh="Price (EUR/MWhe)",
    timestamp_formats=("%Y-%m-%d %H:%M:%S", "%d/%m/%Y %H:%M"),
)
"""The ev2gym/ENTSO-E Netherlands file: ISO until 2022, then day/month/year."""

SHIPPED = ColumnMapping(interval_start="interval_start", price_eur_per_mwh="price_eur_per_mwh")
"""The project's own files (ISO 8601 with Z), as `write_prices_csv` writes them."""


@dataclass
class LoadReport:
    file: str
    rows_read: int = 0
    rows_kept: int = 0
    duplicates_dropped: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    outside_range: int = 0
    missing_intervals: list[datetime] = field(default_factory=list)


def _parse_time(text: str, formats: Sequence[str]) -> datetime:
    for fmt in formats:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise ValueError(f"timestamp {text!r} matches none of {list(formats)}")


def _rows(path: Path, mapping: ColumnMapping) -> list[tuple[int, str, str]]:
    """(line number, timestamp text, price text) per data row."""
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
        for name in (mapping.interval_start, mapping.price_eur_per_mwh):
            if name not in table.column_names:
                raise PriceFileError(f"{path}: no column {name!r} (has {table.column_names})")
        times = table.column(mapping.interval_start).to_pylist()
        prices = table.column(mapping.price_eur_per_mwh).to_pylist()
        return [
            (i + 1, "" if ts is None else str(ts), "" if p is None else str(p))
            for i, (ts, p) in enumerate(zip(times, prices, strict=True))
        ]
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise PriceFileError(f"{path}: empty file")
        try:
            t_col = header.index(mapping.interval_start)
            p_col = header.index(mapping.price_eur_per_mwh)
        except ValueError:
            raise PriceFileError(
                f"{path}, line 1: header {header} lacks {mapping.interval_start!r} "
                f"or {mapping.price_eur_per_mwh!r}"
            ) from None
        out = []
        for record in reader:
            line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                out.append((line, "", ""))
                continue
            if len(record) != len(header):
                out.append((line, "\0", f"{len(record)} fields, header has {len(header)}"))
                continue
            out.append((line, record[t_col].strip(), record[p_col].strip()))
        return out


def load_prices(
    path: str | Path,
    mapping: ColumnMapping = ENTSOE_NL,
    start: datetime | None = None,
    end: datetime | None = None,
    max_bad_lines: int = 10,
    interval_minutes: int = 60,
) -> tuple[pa.Table, LoadReport]:
    """Read a price file into (table, report), keeping intervals in [start, end).

    Args:
        path: a .csv or .parquet file.
        mapping: which columns hold the UTC interval start and the price.
        start, end: optional UTC bounds (aware datetimes); rows outside are counted.
        max_bad_lines: how many unreadable rows to skip (and report) before giving up.
        interval_minutes: the file's resolution, used to list missing intervals.

    Raises:
        PriceFileError: missing file or column, more bad lines than allowed, or one
            interval with two different prices (naming both lines).

    Example:
        >>> table, report = load_prices(SHIPPED_NL_2024, SHIPPED)  # doctest: +SKIP
        >>> report.rows_kept  # doctest: +SKIP
        8783
    """
    path = Path(path)
    if not path.is_file():
        raise PriceFileError(f"{path}: no such file")
    report = LoadReport(file=path.name)
    seen: dict[datetime, tuple[float, int]] = {}
    for line, ts_text, price_text in _rows(path, mapping):
        report.rows_read += 1
        if ts_text == "\0":
            report.bad_lines.append((line, price_text))
        elif not ts_text:
            report.bad_lines.append((line, "no timestamp"))
        else:
            try:
                when = _parse_time(ts_text, mapping.timestamp_formats)
                price = float(price_text)
                if price != price or price in (float("inf"), float("-inf")):
                    raise ValueError(f"price {price_text!r} is not a finite number")
            except ValueError as exc:
                report.bad_lines.append((line, str(exc)))
            else:
                if (start is not None and when < start) or (end is not None and when >= end):
                    report.outside_range += 1
                elif when in seen:
                    first_price, first_line = seen[when]
                    if first_price != price:
                        raise PriceFileError(
                            f"{path.name}, line {line}: {when.isoformat()} priced {price} "
                            f"EUR/MWh, but line {first_line} says {first_price}"
                        )
                    report.duplicates_dropped += 1
                else:
                    seen[when] = (price, line)
        if len(report.bad_lines) > max_bad_lines:
            listed = "; ".join(f"line {n}: {why}" for n, why in report.bad_lines[:5])
            raise PriceFileError(f"{path.name}: more than {max_bad_lines} bad lines ({listed})")
    times = sorted(seen)
    report.rows_kept = len(times)
    step = interval_minutes * 60
    for before, after in pairwise(times):
        gap = int((after - before).total_seconds()) // step
        report.missing_intervals.extend(
            datetime.fromtimestamp(before.timestamp() + k * step, UTC) for k in range(1, gap)
        )
    table = pa.table(
        {
            "interval_start": pa.array(times, type=pa.timestamp("s", tz="UTC")),
            "price_eur_per_mwh": pa.array([seen[t][0] for t in times], type=pa.float64()),
        }
    )
    return table, report


def write_prices_csv(table: pa.Table, path: str | Path) -> None:
    """Write a loaded table as the project's own CSV (ISO 8601 UTC with Z)."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([SHIPPED.interval_start, SHIPPED.price_eur_per_mwh])
        times = table.column("interval_start").to_pylist()
        prices = table.column("price_eur_per_mwh").to_pylist()
        for when, price in zip(times, prices, strict=True):
            writer.writerow([when.strftime("%Y-%m-%dT%H:%M:%SZ"), repr(float(price))])


class PriceFeed(Protocol):
    """A source of prices: the file below, or a live adapter (see MARKET_SOURCES.md).

    `prices(start, end)` returns the table shape `load_prices` returns, for the
    intervals in [start, end) the source knows.
    """

    market_id: str

    def prices(self, start: datetime, end: datetime) -> pa.Table: ...


class FilePriceFeed:
    """A `PriceFeed` over one price file, loaded once.

    Example:
        >>> feed = FilePriceFeed("nl-day-ahead")  # the shipped 2024 file  # doctest: +SKIP
        >>> day = feed.prices(datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 2, tzinfo=UTC))
    """

    def __init__(
        self,
        market_id: str,
        path: str | Path = SHIPPED_NL_2024,
        mapping: ColumnMapping = SHIPPED,
    ) -> None:
        self.market_id = market_id
        self.table, self.report = load_prices(path, mapping)

    def prices(self, start: datetime, end: datetime) -> pa.Table:
        column = self.table.column("interval_start")
        lo = pa.scalar(start, type=column.type)
        hi = pa.scalar(end, type=column.type)
        mask = pc.and_(pc.greater_equal(column, lo), pc.less(column, hi))
        return self.table.filter(mask)
