"""Revenue by stream, every euro traced to the events it comes from.

One row of ``revenue_lines`` per amount; ``energy_position`` is the event that states
the quantity (metered kWh, reserved capacity, delivered regulation energy, avoided
peak) and ``price_position`` the event that states its price.

``arbitrage``  metered kWh (``VehicleEnergyRecorded``, split into 15-minute pieces by
    the energy projection) x the price of the interval holding the piece's start, from a
    market registered as ``settlement_kind`` (``day_ahead`` by default). The price is the
    latest version (``PricePublished`` / ``PriceRevised``) the log holds for that market
    and interval, so a revision re-prices the energy it covers; with several settlement
    markets the lowest ``market_id`` wins. Discharged kWh earn, charged kWh cost:
    ``quantity`` is the net export (discharged - charged) in kWh. Energy with no price
    yet has a row with NULL price and revenue, so unpriced energy stays visible.
``regulation_capacity``  ``RegulationCapacityReserved``: (up_kw + down_kw) / 1000 MW x
    ``price_eur_per_mw_per_h`` x interval_minutes / 60.
``regulation_energy``  ``RegulationEnergyDelivered``: energy_kwh / 1000 MWh x
    ``price_eur_per_mwh``.
``peak_shaving``  ``PeakShavingDelivered``: a demand charge is billed on the month's
    highest peak, so the saving of a site in a (UTC) month is its largest
    ``avoided_peak_kw x demand_charge_eur_per_kw_month`` of the month, on the row of
    the event that achieved it (ties: the earliest).

Amounts are DECIMAL(18, 6) EUR, rounded half away from zero per row. Arbitrage and
regulation energy are computed exactly (DECIMAL products); regulation capacity divides
by 60 minutes, which DuckDB does in DOUBLE before the rounding.
"""

from __future__ import annotations

import duckdb

from projections.energy import run
from projections.store import event_rows, window_has

__all__ = ["REVENUE_STREAMS", "RevenueProjection"]

REVENUE_STREAMS = ("arbitrage", "peak_shaving", "regulation_capacity", "regulation_energy")
_DEC = "DECIMAL(18,6)"
_BUCKET = "INTERVAL 15 MINUTE"
_TS = "TIMESTAMPTZ"
# DuckDB divides DECIMALs in DOUBLE; kWh x EUR/MWh / 1000 stays exact as a product with
# 0.001 in a DECIMAL wide enough for both scales (38 digits, 15 after the point).
_PER_MILLE = "CAST(0.001 AS DECIMAL(4,3))"


def _exact(expr: str) -> str:
    return f"CAST({expr} AS DECIMAL(38,6))"


_PRICE = {
    "market_id": "VARCHAR",
    "interval_start": _TS,
    "interval_minutes": "INTEGER",
    "version": "BIGINT",
    "price_eur_per_mwh": _DEC,
    "new_price_eur_per_mwh": _DEC,
}

# What this projection reads of each event type's payload (parsed once per round).
READS: dict[str, dict[str, str]] = {
    "MarketRegistered": {"market_id": "VARCHAR", "kind": "VARCHAR"},
    "PricePublished": _PRICE,
    "PriceRevised": _PRICE,
    "RegulationCapacityReserved": {
        "site_id": "VARCHAR",
        "interval_start": _TS,
        "interval_minutes": "INTEGER",
        "up_kw": _DEC,
        "down_kw": _DEC,
        "price_eur_per_mw_per_h": _DEC,
    },
    "RegulationEnergyDelivered": {
        "site_id": "VARCHAR",
        "vehicle_id": "VARCHAR",
        "interval_start": _TS,
        "energy_kwh": _DEC,
        "price_eur_per_mwh": _DEC,
    },
    "PeakShavingDelivered": {
        "site_id": "VARCHAR",
        "interval_start": _TS,
        "avoided_peak_kw": _DEC,
        "demand_charge_eur_per_kw_month": _DEC,
    },
}


# A window this large (a rebuild) holds energy in nearly every priced slot: ranking
# every slot's prices is cheaper than first collecting the window's slots (which makes
# DuckDB keep a copy of all its energy pieces). Either way gives the same lines.
_RANK_ALL_SLOTS_FROM = 100_000


def _slots_of_pieces(after: int, through: int) -> str:
    if through - after >= _RANK_ALL_SLOTS_FROM:
        return ""
    return "WHERE ps.slot IN (SELECT interval_start FROM pieces)"


class RevenueProjection:
    name = "revenue"
    depends_on: tuple[str, ...] = ("energy",)
    reads = READS
    tables = ("revenue_markets", "revenue_price_slots", "revenue_peak_facts", "revenue_lines")

    def __init__(self, settlement_kind: str = "day_ahead") -> None:
        self.settlement_kind = settlement_kind

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"""
            CREATE TABLE IF NOT EXISTS revenue_markets (
                market_id VARCHAR, kind VARCHAR, position BIGINT);
            CREATE TABLE IF NOT EXISTS revenue_price_slots (
                market_id VARCHAR, slot TIMESTAMP, interval_start TIMESTAMP,
                version BIGINT, price_eur_per_mwh {_DEC}, position BIGINT);
            CREATE TABLE IF NOT EXISTS revenue_peak_facts (
                site_id VARCHAR, month DATE, position BIGINT, interval_start TIMESTAMP,
                avoided_peak_kw {_DEC}, demand_charge_eur_per_kw_month {_DEC});
            CREATE TABLE IF NOT EXISTS revenue_lines (
                stream VARCHAR, site_id VARCHAR, vehicle_id VARCHAR, market_id VARCHAR,
                interval_start TIMESTAMP, quantity {_DEC}, quantity_unit VARCHAR,
                price {_DEC}, price_unit VARCHAR, revenue_eur {_DEC},
                energy_position BIGINT, price_position BIGINT);
            CREATE OR REPLACE VIEW revenue_daily AS
            SELECT CAST(interval_start AS DATE) AS day, site_id, stream,
                   sum(revenue_eur) AS revenue_eur, count(*) AS lines
            FROM revenue_lines GROUP BY ALL;
        """)

    def apply(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        self._arbitrage(con, after, through)
        self._regulation(con, after, through)
        self._peak_shaving(con, after, through)

    # ------------------------------------------------------------------ arbitrage

    def _arbitrage(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if window_has(con, ["MarketRegistered"], after, through):
            markets = event_rows(["MarketRegistered"])
            run(
                con,
                f"INSERT INTO revenue_markets SELECT p.market_id, p.kind, position "
                f"FROM ({markets})",
                after,
                through,
            )
        repriced = window_has(con, ["PricePublished", "PriceRevised"], after, through)
        if repriced:
            self._price_slots(con, after, through)
            # energy already priced (or waiting for a price) in these slots
            con.execute("""
                DELETE FROM revenue_lines WHERE stream = 'arbitrage'
                  AND interval_start IN (SELECT slot FROM _new_slots)
            """)
        # new energy, plus (only if prices came) the energy of the slots they price
        pieces = (
            "SELECT * FROM energy_vehicle_metered WHERE position > $after AND position <= $through"
        )
        if repriced:
            pieces += (
                " UNION ALL SELECT * FROM energy_vehicle_metered"
                " WHERE interval_start IN (SELECT slot FROM _new_slots)"
                " AND NOT (position > $after AND position <= $through)"
            )
        run(
            con,
            f"""
            INSERT INTO revenue_lines
            WITH pieces AS ({pieces}),
            best AS (
                SELECT ps.* FROM revenue_price_slots ps
                JOIN (SELECT market_id FROM revenue_markets WHERE kind = ?
                      QUALIFY row_number() OVER (PARTITION BY market_id ORDER BY position DESC) = 1
                     ) m USING (market_id)
                {_slots_of_pieces(after, through)}
                QUALIFY row_number() OVER (PARTITION BY ps.slot
                                           ORDER BY ps.market_id, ps.version DESC,
                                                    ps.position DESC) = 1
            )
            SELECT 'arbitrage', e.site_id, e.vehicle_id, b.market_id, e.interval_start,
                   e.discharged_kwh - e.charged_kwh, 'kWh', b.price_eur_per_mwh, 'EUR/MWh',
                   CAST({_exact("e.discharged_kwh - e.charged_kwh")} * b.price_eur_per_mwh
                        * {_PER_MILLE} AS {_DEC}),
                   e.position, b.position
            FROM pieces e LEFT JOIN best b ON b.slot = e.interval_start
            """.replace("?", "'" + self.settlement_kind.replace("'", "''") + "'"),
            after,
            through,
        )
        if repriced:
            con.execute("DROP TABLE _new_slots")

    def _price_slots(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        prices = event_rows(["PricePublished", "PriceRevised"], list(_PRICE))
        # A price covers the 15-minute slots whose start lies in its interval.
        run(
            con,
            f"""
            CREATE OR REPLACE TEMP TABLE _new_slots AS
            SELECT market_id,
                   unnest(generate_series(
                       time_bucket({_BUCKET}, s - INTERVAL 1 MICROSECOND) + {_BUCKET},
                       s + to_minutes(minutes) - INTERVAL 1 MICROSECOND,
                       {_BUCKET})) AS slot,
                   s AS interval_start, version, price, position
            FROM (SELECT p.market_id AS market_id, make_timestamp(epoch_us(p.interval_start)) AS s,
                         p.interval_minutes AS minutes, p.version AS version,
                         coalesce(p.new_price_eur_per_mwh, p.price_eur_per_mwh) AS price, position
                  FROM ({prices}))
            """,
            after,
            through,
        )
        con.execute("INSERT INTO revenue_price_slots SELECT * FROM _new_slots")

    # ------------------------------------------------------------------ grid services

    def _regulation(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        kinds = ["RegulationCapacityReserved", "RegulationEnergyDelivered"]
        if not window_has(con, kinds, after, through):
            return
        capacity = event_rows(["RegulationCapacityReserved"])
        energy = event_rows(["RegulationEnergyDelivered"])
        run(
            con,
            f"""
            INSERT INTO revenue_lines
            SELECT 'regulation_capacity', p.site_id, NULL, NULL,
                   make_timestamp(epoch_us(p.interval_start)),
                   CAST((p.up_kw + p.down_kw) / 1000 * p.interval_minutes / 60 AS {_DEC}), 'MW*h',
                   p.price_eur_per_mw_per_h, 'EUR/(MW*h)',
                   CAST((p.up_kw + p.down_kw) * p.price_eur_per_mw_per_h * p.interval_minutes
                        / 60000 AS {_DEC}),
                   position, position
            FROM ({capacity})
            UNION ALL
            SELECT 'regulation_energy', p.site_id, p.vehicle_id, NULL,
                   make_timestamp(epoch_us(p.interval_start)), p.energy_kwh, 'kWh',
                   p.price_eur_per_mwh, 'EUR/MWh',
                   CAST({_exact("p.energy_kwh")} * p.price_eur_per_mwh * {_PER_MILLE} AS {_DEC}),
                   position, position
            FROM ({energy})
            """,
            after,
            through,
        )

    def _peak_shaving(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if not window_has(con, ["PeakShavingDelivered"], after, through):
            return
        peaks = event_rows(["PeakShavingDelivered"])
        run(
            con,
            f"""
            INSERT INTO revenue_peak_facts
            SELECT p.site_id,
                   CAST(date_trunc('month', make_timestamp(epoch_us(p.interval_start))) AS DATE),
                   position, make_timestamp(epoch_us(p.interval_start)), p.avoided_peak_kw,
                   p.demand_charge_eur_per_kw_month
            FROM ({peaks})
            """,
            after,
            through,
        )
        run(
            con,
            """
            CREATE OR REPLACE TEMP TABLE _months AS
            SELECT DISTINCT site_id, month FROM revenue_peak_facts
            WHERE position > $after AND position <= $through
            """,
            after,
            through,
        )
        con.execute("""
            DELETE FROM revenue_lines r USING _months m
            WHERE r.stream = 'peak_shaving' AND r.site_id = m.site_id
              AND CAST(date_trunc('month', r.interval_start) AS DATE) = m.month
        """)
        con.execute(f"""
            INSERT INTO revenue_lines
            SELECT 'peak_shaving', f.site_id, NULL, NULL, f.interval_start, f.avoided_peak_kw,
                   'kW', f.demand_charge_eur_per_kw_month, 'EUR/(kW*month)',
                   CAST(f.avoided_peak_kw * f.demand_charge_eur_per_kw_month AS {_DEC}),
                   f.position, f.position
            FROM revenue_peak_facts f JOIN _months m USING (site_id, month)
            QUALIFY row_number() OVER (
                PARTITION BY f.site_id, f.month
                ORDER BY f.avoided_peak_kw * f.demand_charge_eur_per_kw_month DESC, f.position
            ) = 1
        """)
        con.execute("DROP TABLE _months")
