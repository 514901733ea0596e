"""Export the projection tables for accounting tools, as CSV or Parquet.

One file per table, rows in a total, documented order, so the same database always
gives the same bytes (the audit replay compares hashes of these files):

============  =======================================  =====================================
file          what                                     order
============  =======================================  =====================================
telemetry     every battery reading                    position
energy        kWh per interval, site, charger,         interval_start, site_id, charger_id,
              vehicle and source                       vehicle_id, source
revenue       every revenue line with the positions    stream, interval_start, energy_position,
              of its quantity and price events         price_position, site_id, vehicle_id
degradation   wear and its cost per vehicle            vehicle_id
============  =======================================  =====================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import duckdb

__all__ = ["EXPORT_TABLES", "ExportError", "export"]

EXPORT_TABLES: dict[str, str] = {
    "telemetry": "SELECT * FROM telemetry ORDER BY position",
    "energy": (
        "SELECT * FROM energy ORDER BY interval_start, site_id NULLS FIRST, "
        "charger_id NULLS FIRST, vehicle_id NULLS FIRST, source"
    ),
    "revenue": (
        "SELECT * FROM revenue_lines ORDER BY stream, interval_start, energy_position, "
        "price_position NULLS FIRST, site_id NULLS FIRST, vehicle_id NULLS FIRST"
    ),
    "degradation": "SELECT * FROM degradation ORDER BY vehicle_id",
}


class ExportError(Exception):
    """The export could not be written (unknown format, missing database or table)."""


def export(
    db_path: str,
    fmt: Literal["csv", "parquet"] = "csv",
    output_dir: str = "export",
    on_table: Callable[[str, int, int], None] | None = None,
) -> dict[str, str]:
    """Write telemetry, energy, revenue and degradation to ``output_dir``; returns the paths.

    Args:
        db_path: the projection database (opened read-only).
        fmt: ``"csv"`` (header, comma, ISO timestamps, UTC) or ``"parquet"`` (zstd).
        output_dir: created if missing; existing files of the same names are replaced.
        on_table: called as ``on_table(name, done, total)`` after each table is
            written (progress bars).

    Raises:
        ExportError: unknown format, no database at ``db_path``, or a table missing.

    Example::

        export("var/projections.duckdb", "parquet", "out/2024")
    """
    if fmt not in ("csv", "parquet"):
        raise ExportError(f"unknown export format {fmt!r}: use 'csv' or 'parquet'")
    if not os.path.exists(db_path):
        raise ExportError(f"no projection database at {db_path!r}; run a replay first")
    os.makedirs(output_dir, exist_ok=True)
    options = (
        "FORMAT csv, HEADER true, DELIMITER ',', TIMESTAMPFORMAT '%Y-%m-%dT%H:%M:%S.%f'"
        if fmt == "csv"
        else "FORMAT parquet, COMPRESSION zstd"
    )
    paths: dict[str, str] = {}
    try:
        with duckdb.connect(db_path, read_only=True) as con:
            con.execute("SET threads = 1")  # one writer thread: the same bytes every time
            for name, query in EXPORT_TABLES.items():
                path = os.path.join(output_dir, f"{name}.{fmt}")
                quoted = path.replace("'", "''")
                con.execute(f"COPY ({query}) TO '{quoted}' ({options})")
                paths[name] = path
                if on_table is not None:
                    on_table(name, len(paths), len(EXPORT_TABLES))
    except duckdb.Error as exc:
        raise ExportError(f"export failed: {exc}") from None
    return paths
