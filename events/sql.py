"""DuckDB over the log, with no Python loop over events.

Sealed segments are Parquet files DuckDB scans itself; the unsealed tail is handed
over as an Arrow table (zero-copy). The view `events` has the columns of
`events.schema.RECORD_SCHEMA`.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from events.reader import list_partitions
from events.schema import RECORD_SCHEMA
from events.wal import scan


def attach_log(con: duckdb.DuckDBPyConnection, root: str, view: str = "events") -> None:
    """Create (or replace) the view `view` over the log folder `root` as it is now."""
    parquet: list[str] = []
    tail: list[pa.RecordBatch] = []
    for part in list_partitions(root):
        parquet.extend(s.path for s in part.segments)
        sealed = part.segments[-1].last_position if part.segments else 0
        for path in part.wal_paths:
            for batch in scan(path).batches:
                kept = batch.filter(pc.greater(batch.column("position"), sealed))
                if kept.num_rows:
                    tail.append(kept)
    tail_table = pa.Table.from_batches(tail, RECORD_SCHEMA)
    con.register(f"{view}_tail", tail_table)
    selects = [f"SELECT * FROM {view}_tail"]
    if parquet:
        files = ", ".join("'" + p.replace("'", "''") + "'" for p in parquet)
        selects.insert(0, f"SELECT * FROM read_parquet([{files}])")
    con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS " + " UNION ALL BY NAME ".join(selects))
