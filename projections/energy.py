"""Energy per vehicle, charger, site and 15-minute interval: metered and commanded.

Three sources, each kept as detail rows that name the event they come from, and the
view ``energy`` that sums them per interval:

``vehicle_meter``  ``VehicleEnergyRecorded``: grid-side kWh over ``[interval_start,
    interval_end)``, split over the 15-minute intervals it overlaps in proportion to
    the overlap. Site from the vehicle's latest ``VehicleRegistered`` and charger from
    its latest ``VehiclePluggedIn`` (none after a ``VehicleUnplugged``) before the record
    (by log position), both kept per vehicle in ``energy_vehicle_context``.
``charger_meter``  ``ChargerMeterValuesRecorded``: the increase of the import/export
    registers since the previous sample of the same charger and EVSE, in the interval
    that holds the sample's time (a sample exactly on a boundary closes the interval
    before it). A register that goes down (meter replaced, reset) counts 0.
``setpoint``  ``VehicleSetpointAccepted``: ``power_kw`` x the overlap of its validity
    with the interval. A setpoint runs from ``at`` until ``valid_until`` or the next
    setpoint, curtailment, safe state, plug-in, unplug or control release of that
    vehicle, whichever is first. ``VehicleSetpointCurtailed`` starts a new stretch at its
    ``power_kw`` until the curtailed setpoint's ``valid_until``.

Import (power > 0, into the vehicle) is ``charged_kwh``, export is ``discharged_kwh``;
both are DECIMAL(18, 6) (a milliwatt-hour), so sums are exact. Times are naive UTC.
"""

from __future__ import annotations

import duckdb

from projections.store import event_rows, window_has

__all__ = ["ENERGY_SOURCES", "INTERVAL_MINUTES", "EnergyProjection", "split_vehicle_energy_sql"]

INTERVAL_MINUTES = 15
ENERGY_SOURCES = ("charger_meter", "setpoint", "vehicle_meter")
_KWH = "DECIMAL(18,6)"
_BUCKET = "INTERVAL 15 MINUTE"
_TS = "TIMESTAMPTZ"
_AT = {"vehicle_id": "VARCHAR", "at": _TS}
_STRETCH_ENDS = (
    "VehicleSafeStateEntered",
    "VehiclePluggedIn",
    "VehicleUnplugged",
    "VehicleControlReleased",
)
_SETPOINT_FACTS = ("VehicleSetpointAccepted", "VehicleSetpointCurtailed", *_STRETCH_ENDS)

# What this projection reads of each event type's payload (parsed once per round).
READS: dict[str, dict[str, str]] = {
    "VehicleRegistered": {"vehicle_id": "VARCHAR", "site_id": "VARCHAR"},
    "VehiclePluggedIn": {**_AT, "charger_id": "VARCHAR"},
    "VehicleUnplugged": {**_AT, "charger_id": "VARCHAR"},
    "ChargerRegistered": {"charger_id": "VARCHAR", "site_id": "VARCHAR"},
    "VehicleEnergyRecorded": {
        "vehicle_id": "VARCHAR",
        "interval_start": _TS,
        "interval_end": _TS,
        "charged_kwh": _KWH,
        "discharged_kwh": _KWH,
    },
    "ChargerMeterValuesRecorded": {
        "evse_id": "INTEGER",
        "sampled_at": _TS,
        "energy_import_kwh": _KWH,
        "energy_export_kwh": _KWH,
    },
    "VehicleSetpointAccepted": {**_AT, "power_kw": "DOUBLE", "valid_until": _TS},
    "VehicleSetpointCurtailed": {**_AT, "power_kw": "DOUBLE"},
    "VehicleSafeStateEntered": _AT,
    "VehicleControlReleased": _AT,
}


# A vehicle's site and charger as of each of its registration and plug events, so one
# ASOF join (rather than one per lookup) finds both; kept for the vehicles that move.
_VEHICLE_CONTEXT = """
    INSERT INTO energy_vehicle_context
    SELECT vehicle_id, position,
           (last_value(site IGNORE NULLS) OVER w).s AS site_id,
           (last_value(plug IGNORE NULLS) OVER w).c AS charger_id
    FROM (SELECT vehicle_id, position, struct_pack(s := site_id) AS site, NULL AS plug
          FROM energy_vehicle_sites
          UNION ALL
          -- an unplug (NULL charger) is a value to carry, hence the struct
          SELECT vehicle_id, position, NULL, struct_pack(c := charger_id)
          FROM energy_vehicle_plugs)
    WHERE {vehicles}
    WINDOW w AS (PARTITION BY vehicle_id ORDER BY position
                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
"""


def _params(sql: str, after: int, through: int) -> dict[str, int]:
    return {k: v for k, v in (("after", after), ("through", through)) if f"${k}" in sql}


def run(con: duckdb.DuckDBPyConnection, sql: str, after: int, through: int) -> None:
    """Execute one projection statement with the window parameters it uses."""
    con.execute(sql, _params(sql, after, through))


def split_vehicle_energy_sql() -> str:
    """New ``VehicleEnergyRecorded`` events as 15-minute pieces (shared with revenue)."""
    records = event_rows(["VehicleEnergyRecorded"])
    return f"""
        WITH rec AS (
            SELECT position, p.vehicle_id AS vehicle_id,
                   make_timestamp(epoch_us(p.interval_start)) AS s,
                   make_timestamp(epoch_us(p.interval_end)) AS e,
                   p.charged_kwh AS c, p.discharged_kwh AS d
            FROM ({records})
        ),
        -- most records lie in one interval: no series to unnest, the whole amount
        one AS (
            SELECT position, vehicle_id, time_bucket({_BUCKET}, s) AS interval_start,
                   c AS charged_kwh, d AS discharged_kwh
            FROM rec
            WHERE time_bucket({_BUCKET}, s) = time_bucket({_BUCKET}, e - INTERVAL 1 MICROSECOND)
        ),
        pieces AS (
            SELECT *, unnest(generate_series(time_bucket({_BUCKET}, s),
                                             e - INTERVAL 1 MICROSECOND, {_BUCKET})) AS b
            FROM rec
            WHERE time_bucket({_BUCKET}, s) <> time_bucket({_BUCKET}, e - INTERVAL 1 MICROSECOND)
        )
        SELECT * FROM one
        UNION ALL
        SELECT position, vehicle_id, b AS interval_start,
               CASE WHEN b <= s AND b + {_BUCKET} >= e THEN c
                    ELSE CAST(c * epoch(least(e, b + {_BUCKET}) - greatest(s, b)) / epoch(e - s)
                              AS {_KWH}) END AS charged_kwh,
               CASE WHEN b <= s AND b + {_BUCKET} >= e THEN d
                    ELSE CAST(d * epoch(least(e, b + {_BUCKET}) - greatest(s, b)) / epoch(e - s)
                              AS {_KWH}) END AS discharged_kwh
        FROM pieces
    """


class EnergyProjection:
    name = "energy"
    depends_on: tuple[str, ...] = ()
    reads = READS
    tables = (
        "energy_vehicle_sites",
        "energy_vehicle_plugs",
        "energy_vehicle_context",
        "energy_charger_sites",
        "energy_charger_last",
        "energy_setpoint_facts",
        "energy_vehicle_metered",
        "energy_charger_metered",
        "energy_commanded",
    )

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        [(had_context,)] = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = 'energy_vehicle_context'"
        ).fetchall()
        con.execute(f"""
            CREATE TABLE IF NOT EXISTS energy_vehicle_sites (
                vehicle_id VARCHAR, position BIGINT, site_id VARCHAR);
            CREATE TABLE IF NOT EXISTS energy_vehicle_plugs (
                vehicle_id VARCHAR, position BIGINT, charger_id VARCHAR);
            CREATE TABLE IF NOT EXISTS energy_vehicle_context (
                vehicle_id VARCHAR, position BIGINT, site_id VARCHAR, charger_id VARCHAR);
            CREATE TABLE IF NOT EXISTS energy_charger_sites (
                charger_id VARCHAR, position BIGINT, site_id VARCHAR);
            CREATE TABLE IF NOT EXISTS energy_charger_last (
                charger_id VARCHAR, evse_id INTEGER, position BIGINT,
                import_kwh {_KWH}, export_kwh {_KWH}, PRIMARY KEY (charger_id, evse_id));
            CREATE TABLE IF NOT EXISTS energy_setpoint_facts (
                vehicle_id VARCHAR, position BIGINT, kind VARCHAR, starts_at TIMESTAMP,
                power_kw DOUBLE, valid_until TIMESTAMP);
            CREATE TABLE IF NOT EXISTS energy_vehicle_metered (
                position BIGINT, vehicle_id VARCHAR, site_id VARCHAR, charger_id VARCHAR,
                interval_start TIMESTAMP, charged_kwh {_KWH}, discharged_kwh {_KWH});
            CREATE TABLE IF NOT EXISTS energy_charger_metered (
                position BIGINT, charger_id VARCHAR, evse_id INTEGER, site_id VARCHAR,
                interval_start TIMESTAMP, charged_kwh {_KWH}, discharged_kwh {_KWH});
            CREATE TABLE IF NOT EXISTS energy_commanded (
                setpoint_position BIGINT, vehicle_id VARCHAR, site_id VARCHAR,
                charger_id VARCHAR, interval_start TIMESTAMP, power_kw DOUBLE,
                charged_kwh {_KWH}, discharged_kwh {_KWH});
            CREATE OR REPLACE VIEW energy AS
            SELECT interval_start, site_id, charger_id, vehicle_id, source,
                   sum(charged_kwh) AS charged_kwh, sum(discharged_kwh) AS discharged_kwh
            FROM (
                SELECT interval_start, site_id, charger_id, vehicle_id, 'vehicle_meter' AS source,
                       charged_kwh, discharged_kwh FROM energy_vehicle_metered
                UNION ALL
                SELECT interval_start, site_id, charger_id, NULL, 'charger_meter',
                       charged_kwh, discharged_kwh FROM energy_charger_metered
                UNION ALL
                SELECT interval_start, site_id, charger_id, vehicle_id, 'setpoint',
                       charged_kwh, discharged_kwh FROM energy_commanded
            )
            GROUP BY ALL;
        """)
        if not had_context:  # a database from before the table: derive it once
            con.execute(_VEHICLE_CONTEXT.format(vehicles="true"))

    def apply(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        self._context(con, after, through)
        self._vehicle_meter(con, after, through)
        self._charger_meter(con, after, through)
        self._setpoints(con, after, through)

    # ------------------------------------------------------------------ lookups

    def _context(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        plugs = event_rows(["VehiclePluggedIn", "VehicleUnplugged"], ["vehicle_id", "charger_id"])
        for types, sql in (
            (
                ["VehicleRegistered"],
                "INSERT INTO energy_vehicle_sites SELECT p.vehicle_id, position, p.site_id "
                f"FROM ({event_rows(['VehicleRegistered'])})",
            ),
            (
                ["VehiclePluggedIn", "VehicleUnplugged"],
                "INSERT INTO energy_vehicle_plugs SELECT p.vehicle_id, position, "
                f"CASE WHEN type = 'VehiclePluggedIn' THEN p.charger_id END FROM ({plugs})",
            ),
            (
                ["ChargerRegistered"],
                "INSERT INTO energy_charger_sites SELECT p.charger_id, position, p.site_id "
                f"FROM ({event_rows(['ChargerRegistered'])})",
            ),
        ):
            if window_has(con, types, after, through):
                run(con, sql, after, through)
        moved = ["VehicleRegistered", "VehiclePluggedIn", "VehicleUnplugged"]
        if window_has(con, moved, after, through):
            # the vehicles that registered or (un)plugged: their context, recomputed
            touched = (
                f"vehicle_id IN (SELECT p.vehicle_id FROM ({event_rows(moved, ['vehicle_id'])}))"
            )
            run(con, f"DELETE FROM energy_vehicle_context WHERE {touched}", after, through)
            run(con, _VEHICLE_CONTEXT.format(vehicles=touched), after, through)

    # ------------------------------------------------------------------ metered

    def _vehicle_meter(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if not window_has(con, ["VehicleEnergyRecorded"], after, through):
            return
        run(
            con,
            f"""
            INSERT INTO energy_vehicle_metered
            SELECT r.position, r.vehicle_id, vc.site_id, vc.charger_id, r.interval_start,
                   r.charged_kwh, r.discharged_kwh
            FROM ({split_vehicle_energy_sql()}) r
            ASOF LEFT JOIN energy_vehicle_context vc
                ON vc.vehicle_id = r.vehicle_id AND r.position > vc.position
            """,
            after,
            through,
        )

    def _charger_meter(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if not window_has(con, ["ChargerMeterValuesRecorded"], after, through):
            return
        samples = event_rows(["ChargerMeterValuesRecorded"])
        run(
            con,
            f"""
            CREATE OR REPLACE TEMP TABLE _samples AS
            SELECT position, substr(stream_id, 9) AS charger_id, p.evse_id AS evse_id,
                   make_timestamp(epoch_us(p.sampled_at)) AS sampled_at,
                   p.energy_import_kwh AS import_kwh, p.energy_export_kwh AS export_kwh
            FROM ({samples})
            WHERE p.energy_import_kwh IS NOT NULL OR p.energy_export_kwh IS NOT NULL
            """,
            after,
            through,
        )
        con.execute(f"""
            INSERT INTO energy_charger_metered
            WITH seq AS (
                SELECT position, charger_id, evse_id, sampled_at, import_kwh, export_kwh,
                       lag(import_kwh) OVER w AS prev_import, lag(export_kwh) OVER w AS prev_export,
                       row_number() OVER w AS k
                FROM _samples WINDOW w AS (PARTITION BY charger_id, evse_id ORDER BY position)
            ),
            deltas AS (
                SELECT s.position, s.charger_id, s.evse_id, s.sampled_at,
                       s.import_kwh - coalesce(CASE WHEN s.k = 1 THEN l.import_kwh
                                                    ELSE s.prev_import END, s.import_kwh) AS di,
                       s.export_kwh - coalesce(CASE WHEN s.k = 1 THEN l.export_kwh
                                                    ELSE s.prev_export END, s.export_kwh) AS de
                FROM seq s
                LEFT JOIN energy_charger_last l USING (charger_id, evse_id)
            )
            SELECT d.position, d.charger_id, d.evse_id, cs.site_id,
                   time_bucket({_BUCKET}, d.sampled_at - INTERVAL 1 MICROSECOND),
                   CAST(greatest(coalesce(d.di, 0), 0) AS {_KWH}),
                   CAST(greatest(coalesce(d.de, 0), 0) AS {_KWH})
            FROM deltas d
            ASOF LEFT JOIN energy_charger_sites cs
                ON cs.charger_id = d.charger_id AND d.position > cs.position
            WHERE coalesce(d.di, 0) > 0 OR coalesce(d.de, 0) > 0
        """)
        con.execute("""
            INSERT OR REPLACE INTO energy_charger_last
            SELECT charger_id, evse_id, position, import_kwh, export_kwh FROM _samples
            QUALIFY row_number() OVER (PARTITION BY charger_id, evse_id ORDER BY position DESC) = 1
        """)
        con.execute("DROP TABLE _samples")

    # ------------------------------------------------------------------ commanded

    def _setpoints(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if not window_has(con, _SETPOINT_FACTS, after, through):
            return  # no stretch starts or ends in this window
        accepted = event_rows(["VehicleSetpointAccepted"])
        ends = event_rows(_STRETCH_ENDS, ["vehicle_id", "at"])
        run(
            con,
            f"""
            INSERT INTO energy_setpoint_facts
            SELECT p.vehicle_id, position, 'setpoint', make_timestamp(epoch_us(p.at)), p.power_kw,
                   make_timestamp(epoch_us(p.valid_until)) FROM ({accepted})
            UNION ALL
            SELECT p.vehicle_id, position, 'end', make_timestamp(epoch_us(p.at)), NULL, NULL
            FROM ({ends})
            """,
            after,
            through,
        )
        if window_has(con, ["VehicleSetpointCurtailed"], after, through):
            self._curtailments(con, after, through)
        self._commanded(con, after, through)

    def _curtailments(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        curtailed = event_rows(["VehicleSetpointCurtailed"])
        run(
            con,
            f"""
            INSERT INTO energy_setpoint_facts
            SELECT c.vehicle_id, c.position, 'curtail', c.starts_at, c.power_kw, s.valid_until
            FROM (SELECT p.vehicle_id AS vehicle_id, position,
                         make_timestamp(epoch_us(p.at)) AS starts_at,
                         p.power_kw AS power_kw FROM ({curtailed})) c
            ASOF LEFT JOIN (SELECT * FROM energy_setpoint_facts WHERE kind = 'setpoint') s
                ON s.vehicle_id = c.vehicle_id AND c.position > s.position
            """,
            after,
            through,
        )

    def _commanded(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        # Per vehicle touched: recompute from its last fact before this window (the
        # stretch that was open, whose end the new facts may set) onwards.
        run(
            con,
            """
            CREATE OR REPLACE TEMP TABLE _scope AS
            SELECT f.vehicle_id,
                   coalesce((SELECT max(o.position) FROM energy_setpoint_facts o
                             WHERE o.vehicle_id = f.vehicle_id AND o.position <= $after),
                            min(f.position)) AS from_position
            FROM energy_setpoint_facts f
            WHERE f.position > $after AND f.position <= $through
            GROUP BY f.vehicle_id
            """,
            after,
            through,
        )
        con.execute("""
            DELETE FROM energy_commanded c USING _scope s
            WHERE c.vehicle_id = s.vehicle_id AND c.setpoint_position >= s.from_position
        """)
        run(
            con,
            f"""
            INSERT INTO energy_commanded
            WITH stretch AS (
                SELECT f.vehicle_id, f.position, f.kind, f.starts_at, f.power_kw, f.valid_until,
                       lead(f.starts_at) OVER (PARTITION BY f.vehicle_id ORDER BY f.position)
                           AS next_at
                FROM energy_setpoint_facts f JOIN _scope s
                    ON f.vehicle_id = s.vehicle_id AND f.position >= s.from_position
                WHERE f.position <= $through
            ),
            spans AS (
                SELECT vehicle_id, position, power_kw, starts_at AS s,
                       greatest(starts_at, least(valid_until, coalesce(next_at, valid_until))) AS e
                FROM stretch WHERE kind <> 'end' AND power_kw <> 0
            ),
            -- site and charger once per setpoint, before it is split into intervals
            located AS (
                SELECT sp.*, vc.site_id, vc.charger_id
                FROM (SELECT * FROM spans WHERE e > s) sp
                ASOF LEFT JOIN energy_vehicle_context vc
                    ON vc.vehicle_id = sp.vehicle_id AND sp.position > vc.position
            ),
            pieces AS (
                SELECT *, unnest(generate_series(time_bucket({_BUCKET}, s),
                                                 e - INTERVAL 1 MICROSECOND, {_BUCKET})) AS b
                FROM located
            )
            SELECT x.position, x.vehicle_id, x.site_id, x.charger_id, x.b, x.power_kw,
                   CAST(greatest(x.kwh, 0) AS {_KWH}), CAST(greatest(-x.kwh, 0) AS {_KWH})
            FROM (SELECT position, vehicle_id, site_id, charger_id, b, power_kw,
                         power_kw * epoch(least(e, b + {_BUCKET}) - greatest(s, b)) / 3600.0 AS kwh
                  FROM pieces) x
            """,
            after,
            through,
        )
        con.execute("DROP TABLE _scope")
