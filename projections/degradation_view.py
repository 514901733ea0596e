"""Battery wear per vehicle, from the events, through the fleet ageing model in one call.

Tables:

``telemetry``  one row per ``VehicleTelemetryReported`` (SoC, temperature, SoH, source;
    version-1 readings, which did not record it, have source ``unrecorded``).
``degradation_vehicles``  the latest ``VehicleRegistered`` of each vehicle.
``degradation_reported_soh``  the SoH of each vehicle's latest telemetry reading.
``degradation_daily``  per vehicle and UTC day: telemetry readings (SoC min / max / sum,
    temperature sum / max, readings above 35 and 45 degC) and metered energy (grid-side
    kWh charged and discharged, hours with energy), merged as events arrive.
``degradation``  per vehicle, recomputed from the two tables above for each vehicle
    an apply has events of (for every vehicle on the first apply, when one is new, and
    after an upgrade of the table):
    the stress figures and :func:`projections.degradation.assess_fleet` for the fleet.
``degradation_soh_trajectory``  SoH at 1..``horizon_years`` years of age if the vehicle
    keeps its observed yearly throughput and stress
    (:func:`projections.degradation.soh_trajectory`).

How each stress figure is derived (all from events, none from the clock):

- battery throughput (kWh): metered charged x charge efficiency + metered discharged /
  discharge efficiency (the efficiencies registered for the vehicle), so the battery
  side, as the model wants; equivalent full cycles = throughput / (2 x capacity).
- depth of discharge: the mean over days with at least two readings of that day's
  SoC swing (max - min).
- C-rate: metered grid-side kWh / hours with metered energy / capacity.
- mean SoC and temperature: means of the telemetry readings (25 degC, SoC 0.5 without).
- age (days): from the registration's ``at`` to the latest telemetry or metered energy.
- the battery's history when it joined (``battery_age_days``, ``battery_throughput_kwh``
  of the registration; 0 for a registration without them): the model is evaluated at
  history + time and throughput in the fleet, and ``degradation_cost_eur`` is the fade
  between history alone and that point (``calendar_cost_eur`` + ``cycle_cost_eur``),
  the stress in the fleet taken as the stress of the pack's whole life.

The model takes the mean temperature (not the distribution): a vehicle with hot and cold
spells ages somewhat faster than this says. Prices and warranty terms are parameters
(:class:`DegradationParams`); the defaults are assumptions, stated there.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa

from projections.degradation import (
    NAUMANN_LFP,
    SCHMALSTIEG_2014,
    AgeingModel,
    FleetUsage,
    assess_fleet,
    equivalent_full_cycles,
    soh_trajectory,
)
from projections.energy import run
from projections.store import event_rows, window_has

__all__ = ["DegradationParams", "DegradationProjection"]

_KWH = "DECIMAL(18,6)"
_SUM = "DECIMAL(38,6)"
_TS = "TIMESTAMPTZ"

# What this projection reads of each event type's payload (parsed once per round).
READS: dict[str, dict[str, str]] = {
    "VehicleRegistered": {
        "vehicle_id": "VARCHAR",
        "at": _TS,
        "model": "VARCHAR",
        "site_id": "VARCHAR",
        "battery_capacity_kwh": "DOUBLE",
        "discharge_throughput_budget_kwh": "DOUBLE",
        "charge_efficiency": "DOUBLE",
        "discharge_efficiency": "DOUBLE",
        "battery_age_days": "DOUBLE",
        "battery_throughput_kwh": "DOUBLE",
    },
    "VehicleTelemetryReported": {
        "vehicle_id": "VARCHAR",
        "measured_at": _TS,
        "soc": "DECIMAL(9,6)",
        "battery_temp_c": "DECIMAL(9,3)",
        "soh": "DECIMAL(9,6)",
        "source": "VARCHAR",
    },
    "VehicleEnergyRecorded": {
        "vehicle_id": "VARCHAR",
        "interval_start": _TS,
        "interval_end": _TS,
        "charged_kwh": _KWH,
        "discharged_kwh": _KWH,
    },
}


@dataclass(frozen=True)
class DegradationParams:
    """Inputs the events do not carry. Defaults are assumptions, not quotes.

    ``warranty_efc``: equivalent full cycles a warranty covers when the vehicle has no
    registered ``discharge_throughput_budget_kwh`` (then twice the budget is used: the
    budget counts discharge only, the model counts both directions).
    """

    model: str = "schmalstieg_2014"  # or "naumann_lfp"
    battery_price_eur_per_kwh: float = 150.0
    warranty_years: float = 8.0
    warranty_efc: float = 1000.0
    eol_fade: float = 0.20
    degradation_scale: float = 1.0
    horizon_years: int = 10

    def ageing_model(self) -> AgeingModel:
        models: dict[str, AgeingModel] = {
            "schmalstieg_2014": SCHMALSTIEG_2014,
            "naumann_lfp": NAUMANN_LFP,
        }
        try:
            return models[self.model]
        except KeyError:
            raise ValueError(
                f"unknown ageing model {self.model!r}; use one of {sorted(models)}"
            ) from None


def _tel_rows() -> str:
    """The window's telemetry readings as rows of the ``telemetry`` table."""
    return f"""
        SELECT position, p.vehicle_id AS vehicle_id,
               make_timestamp(epoch_us(p.measured_at)) AS measured_at, p.soc AS soc,
               p.battery_temp_c AS battery_temp_c, p.soh AS soh,
               coalesce(p.source, 'unrecorded') AS source  -- schema v1 had none
        FROM ({event_rows(["VehicleTelemetryReported"])})
    """


class DegradationProjection:
    name = "degradation"
    depends_on: tuple[str, ...] = ()
    reads = READS
    tables = (
        "telemetry",
        "degradation_vehicles",
        "degradation_reported_soh",
        "degradation_daily",
        "degradation",
        "degradation_soh_trajectory",
    )

    def __init__(self, params: DegradationParams | None = None) -> None:
        self.params = params or DegradationParams()

    def create(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"""
            CREATE TABLE IF NOT EXISTS telemetry (
                position BIGINT, vehicle_id VARCHAR, measured_at TIMESTAMP,
                soc DECIMAL(9,6), battery_temp_c DECIMAL(9,3), soh DECIMAL(9,6), source VARCHAR);
            CREATE TABLE IF NOT EXISTS degradation_vehicles (
                vehicle_id VARCHAR PRIMARY KEY, position BIGINT, site_id VARCHAR,
                model VARCHAR, registered_at TIMESTAMP, capacity_kwh DOUBLE,
                budget_kwh DOUBLE, charge_efficiency DOUBLE, discharge_efficiency DOUBLE,
                age_at_registration_days DOUBLE, throughput_at_registration_kwh DOUBLE);
            CREATE TABLE IF NOT EXISTS degradation_reported_soh (
                vehicle_id VARCHAR PRIMARY KEY, position BIGINT, soh DECIMAL(9,6));
            CREATE TABLE IF NOT EXISTS degradation_daily (
                vehicle_id VARCHAR, day DATE, readings BIGINT, soc_min DECIMAL(9,6),
                soc_max DECIMAL(9,6), soc_sum {_SUM}, temp_sum {_SUM}, temp_max DECIMAL(9,3),
                above_35c BIGINT, above_45c BIGINT, charged_kwh {_SUM},
                discharged_kwh {_SUM}, metered_hours {_SUM}, last_at TIMESTAMP,
                PRIMARY KEY (vehicle_id, day));
            CREATE TABLE IF NOT EXISTS degradation (
                vehicle_id VARCHAR, site_id VARCHAR, capacity_kwh DOUBLE,
                age_days DOUBLE, age_at_registration_days DOUBLE, charged_kwh DOUBLE,
                discharged_kwh DOUBLE, throughput_kwh DOUBLE,
                throughput_at_registration_kwh DOUBLE, equivalent_full_cycles DOUBLE,
                depth_of_discharge DOUBLE,
                c_rate DOUBLE, mean_soc DOUBLE, mean_temp_c DOUBLE, max_temp_c DOUBLE,
                share_above_35c DOUBLE, share_above_45c DOUBLE, reported_soh DOUBLE,
                calendar_fade DOUBLE, cycle_fade DOUBLE, capacity_fade DOUBLE, soh DOUBLE,
                degradation_cost_eur DOUBLE, calendar_cost_eur DOUBLE, cycle_cost_eur DOUBLE,
                throughput_cost_eur_per_kwh DOUBLE,
                thermal_throughput_factor DOUBLE, warranty_throughput_used DOUBLE,
                warranty_time_used DOUBLE, model VARCHAR);
            CREATE TABLE IF NOT EXISTS degradation_soh_trajectory (
                vehicle_id VARCHAR, age_years INTEGER, soh DOUBLE);
        """)
        # A database from before the battery's history: its registrations had none (a
        # new pack, 0), and its assessment is emptied, so the next round rewrites it
        # whole (see `apply`).
        added = False
        for table, column in (
            ("degradation_vehicles", "age_at_registration_days"),
            ("degradation_vehicles", "throughput_at_registration_kwh"),
            ("degradation", "age_at_registration_days"),
            ("degradation", "throughput_at_registration_kwh"),
            ("degradation", "calendar_cost_eur"),
            ("degradation", "cycle_cost_eur"),
        ):
            [(present,)] = con.execute(
                "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database()"
                " AND schema_name = 'main' AND table_name = ? AND column_name = ?",
                [table, column],
            ).fetchall()
            if not present:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {column} DOUBLE DEFAULT 0")
                added = added or table == "degradation"
        if added:
            con.execute("DELETE FROM degradation")
            con.execute("DELETE FROM degradation_soh_trajectory")

    def apply(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        # the assessment depends only on what these events feed: none new, nothing changes
        if not window_has(con, list(READS), after, through):
            return
        self._ingest(con, after, through)
        # A vehicle's assessment depends on its own registration, readings and energy
        # only: a live round re-assesses the vehicles it has events of, so its cost no
        # longer grows with the fleet (at 2,000 vehicles and ~300 events a round: ~19
        # ms against ~24, most of it the query's fixed cost). Everyone when the
        # assessment is not one row per vehicle (the first round, a new vehicle, a
        # database whose assessment was emptied).
        [(complete,)] = con.execute(
            "SELECT (SELECT count(*) FROM degradation)"
            " = (SELECT count(*) FROM degradation_vehicles)"
        ).fetchall()
        if after > 0 and complete:
            touched = event_rows(list(READS), ["vehicle_id"])
            run(
                con,
                "CREATE OR REPLACE TEMP TABLE _degradation_scope AS "
                f"SELECT DISTINCT p.vehicle_id AS vehicle_id FROM ({touched})",
                after,
                through,
            )
            self._assess(con, "vehicle_id IN (SELECT vehicle_id FROM _degradation_scope)")
            con.execute("DROP TABLE _degradation_scope")
        else:
            self._assess(con, "true")

    def _ingest(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        if window_has(con, ["VehicleRegistered"], after, through):
            self._registrations(con, after, through)
        if window_has(con, ["VehicleTelemetryReported"], after, through):
            self._telemetry(con, after, through)
        # the window's readings, as just written to `telemetry` (no copy of them)
        self._daily(
            con,
            after,
            through,
            "(SELECT * FROM telemetry WHERE position > $after AND position <= $through)",
        )

    def _registrations(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        reg = event_rows(["VehicleRegistered"])
        run(
            con,
            f"""
            INSERT OR REPLACE INTO degradation_vehicles
            SELECT p.vehicle_id, position, p.site_id, p.model, make_timestamp(epoch_us(p.at)),
                   p.battery_capacity_kwh, p.discharge_throughput_budget_kwh,
                   p.charge_efficiency, p.discharge_efficiency,
                   -- registrations before schema version 2 had no history: a new pack
                   coalesce(p.battery_age_days, 0), coalesce(p.battery_throughput_kwh, 0)
            FROM ({reg})
            QUALIFY row_number() OVER (PARTITION BY p.vehicle_id ORDER BY position DESC) = 1
            """,
            after,
            through,
        )

    def _telemetry(self, con: duckdb.DuckDBPyConnection, after: int, through: int) -> None:
        run(con, f"INSERT INTO telemetry {_tel_rows()}", after, through)
        # the latest reading's SoH per vehicle: the window's latest is newer than any kept
        run(
            con,
            """
            INSERT OR REPLACE INTO degradation_reported_soh
            SELECT vehicle_id, position, soh FROM telemetry
            WHERE position > $after AND position <= $through
            QUALIFY row_number() OVER (PARTITION BY vehicle_id ORDER BY position DESC) = 1
            """,
            after,
            through,
        )

    def _daily(
        self, con: duckdb.DuckDBPyConnection, after: int, through: int, readings: str
    ) -> None:
        """Merge the window's readings (a table or subquery) and metered energy per day."""
        energy = event_rows(["VehicleEnergyRecorded"])
        run(
            con,
            f"""
            INSERT INTO degradation_daily
            SELECT vehicle_id, day, sum(readings), min(soc_min), max(soc_max), sum(soc_sum),
                   sum(temp_sum), max(temp_max), sum(above_35c), sum(above_45c),
                   sum(charged_kwh), sum(discharged_kwh), sum(metered_hours), max(last_at)
            FROM (
                SELECT vehicle_id, CAST(measured_at AS DATE) AS day, 1 AS readings,
                       soc AS soc_min, soc AS soc_max, soc AS soc_sum,
                       battery_temp_c AS temp_sum, battery_temp_c AS temp_max,
                       CAST(battery_temp_c > 35 AS INTEGER) AS above_35c,
                       CAST(battery_temp_c > 45 AS INTEGER) AS above_45c,
                       0 AS charged_kwh, 0 AS discharged_kwh, 0 AS metered_hours,
                       measured_at AS last_at
                FROM {readings}
                UNION ALL
                SELECT p.vehicle_id, CAST(make_timestamp(epoch_us(p.interval_start)) AS DATE), 0,
                       NULL, NULL, 0, 0, NULL, 0, 0, p.charged_kwh, p.discharged_kwh,
                       CASE WHEN p.charged_kwh + p.discharged_kwh > 0 THEN
                           CAST(epoch(p.interval_end - p.interval_start) / 3600 AS {_KWH})
                       ELSE 0 END,
                       make_timestamp(epoch_us(p.interval_end))
                FROM ({energy})
            )
            GROUP BY vehicle_id, day
            ON CONFLICT (vehicle_id, day) DO UPDATE SET
                readings = readings + excluded.readings,
                soc_min = least(soc_min, excluded.soc_min),
                soc_max = greatest(soc_max, excluded.soc_max),
                soc_sum = soc_sum + excluded.soc_sum,
                temp_sum = temp_sum + excluded.temp_sum,
                temp_max = greatest(temp_max, excluded.temp_max),
                above_35c = above_35c + excluded.above_35c,
                above_45c = above_45c + excluded.above_45c,
                charged_kwh = charged_kwh + excluded.charged_kwh,
                discharged_kwh = discharged_kwh + excluded.discharged_kwh,
                metered_hours = metered_hours + excluded.metered_hours,
                last_at = greatest(last_at, excluded.last_at)
            """,
            after,
            through,
        )

    def _assess(self, con: duckdb.DuckDBPyConnection, vehicles: str) -> None:
        """(Re)write the assessment and SoH trajectory of the vehicles that satisfy the
        SQL condition ``vehicles`` (on ``vehicle_id``)."""
        t = con.sql(f"""
            SELECT v.vehicle_id, v.site_id, v.capacity_kwh, v.budget_kwh,
                   v.charge_efficiency, v.discharge_efficiency,
                   v.age_at_registration_days, v.throughput_at_registration_kwh,
                   CAST(coalesce(epoch(max(d.last_at) - v.registered_at) / 86400, 0) AS DOUBLE)
                       AS age_days,
                   CAST(coalesce(sum(d.charged_kwh), 0) AS DOUBLE) AS charged_kwh,
                   CAST(coalesce(sum(d.discharged_kwh), 0) AS DOUBLE) AS discharged_kwh,
                   CAST(coalesce(sum(d.metered_hours), 0) AS DOUBLE) AS metered_hours,
                   CAST(coalesce(avg(d.soc_max - d.soc_min) FILTER (WHERE d.readings >= 2), 0)
                        AS DOUBLE) AS dod,
                   CAST(coalesce(sum(d.soc_sum) / nullif(sum(d.readings), 0), 0.5) AS DOUBLE)
                       AS mean_soc,
                   CAST(coalesce(sum(d.temp_sum) / nullif(sum(d.readings), 0), 25) AS DOUBLE)
                       AS mean_temp_c,
                   CAST(max(d.temp_max) AS DOUBLE) AS max_temp_c,
                   CAST(coalesce(sum(d.above_35c) / nullif(sum(d.readings), 0), 0) AS DOUBLE)
                       AS share_above_35c,
                   CAST(coalesce(sum(d.above_45c) / nullif(sum(d.readings), 0), 0) AS DOUBLE)
                       AS share_above_45c,
                   any_value(r.soh) AS reported_soh
            FROM (SELECT * FROM degradation_vehicles WHERE {vehicles}) v
            LEFT JOIN (SELECT * FROM degradation_daily WHERE {vehicles}) d USING (vehicle_id)
            LEFT JOIN (SELECT vehicle_id, CAST(soh AS DOUBLE) AS soh
                       FROM degradation_reported_soh) r
                USING (vehicle_id)
            GROUP BY v.vehicle_id, v.site_id, v.capacity_kwh, v.budget_kwh,
                     v.charge_efficiency, v.discharge_efficiency, v.registered_at,
                     v.age_at_registration_days, v.throughput_at_registration_kwh
            ORDER BY v.vehicle_id
        """).to_arrow_table()
        con.execute(f"DELETE FROM degradation WHERE {vehicles}")
        con.execute(f"DELETE FROM degradation_soh_trajectory WHERE {vehicles}")
        if t.num_rows == 0:
            return
        c = {
            name: np.asarray(t.column(name).to_numpy(zero_copy_only=False))
            for name in (
                "capacity_kwh",
                "charge_efficiency",
                "discharge_efficiency",
                "age_at_registration_days",
                "throughput_at_registration_kwh",
                "age_days",
                "charged_kwh",
                "discharged_kwh",
                "metered_hours",
                "dod",
                "mean_soc",
                "mean_temp_c",
            )
        }
        c = {k: v.astype(np.float64) for k, v in c.items()}
        p = self.params
        model = p.ageing_model()
        capacity = c["capacity_kwh"]
        throughput = (
            c["charged_kwh"] * c["charge_efficiency"]
            + c["discharged_kwh"] / c["discharge_efficiency"]
        )
        grid_kwh = c["charged_kwh"] + c["discharged_kwh"]
        hours = c["metered_hours"]
        c_rate = np.divide(grid_kwh, hours * capacity, out=np.zeros_like(grid_kwh), where=hours > 0)
        budget = np.asarray(t.column("budget_kwh").to_pylist(), dtype=object)
        warranty = np.array(
            [
                2.0 * b if b is not None else 2.0 * cap * p.warranty_efc
                for b, cap in zip(budget, capacity, strict=True)
            ],
            dtype=np.float64,
        )
        # the model runs on the pack's life: its history at registration + the fleet's use
        usage = FleetUsage.of(
            capacity_kwh=capacity,
            throughput_kwh=c["throughput_at_registration_kwh"] + throughput,
            dod=c["dod"],
            c_rate=c_rate,
            temperature_c=c["mean_temp_c"],
            elapsed_days=c["age_at_registration_days"] + c["age_days"],
            mean_soc=c["mean_soc"],
            replacement_cost_eur=capacity * p.battery_price_eur_per_kwh,
            warranty_throughput_kwh=warranty,
            warranty_years=p.warranty_years,
            prior_throughput_kwh=c["throughput_at_registration_kwh"],
            prior_elapsed_days=c["age_at_registration_days"],
        )
        r = assess_fleet(
            usage,
            model,
            battery_price_eur_per_kwh=p.battery_price_eur_per_kwh,
            eol_fade=p.eol_fade,
            degradation_scale=p.degradation_scale,
        )
        n = t.num_rows
        out = pa.table(
            {
                "vehicle_id": t.column("vehicle_id"),
                "site_id": t.column("site_id"),
                "capacity_kwh": capacity,
                "age_days": c["age_days"],
                "age_at_registration_days": c["age_at_registration_days"],
                "charged_kwh": c["charged_kwh"],
                "discharged_kwh": c["discharged_kwh"],
                "throughput_kwh": throughput,
                "throughput_at_registration_kwh": c["throughput_at_registration_kwh"],
                "equivalent_full_cycles": equivalent_full_cycles(throughput, capacity),
                "depth_of_discharge": c["dod"],
                "c_rate": c_rate,
                "mean_soc": c["mean_soc"],
                "mean_temp_c": c["mean_temp_c"],
                "max_temp_c": t.column("max_temp_c"),
                "share_above_35c": t.column("share_above_35c"),
                "share_above_45c": t.column("share_above_45c"),
                "reported_soh": t.column("reported_soh"),
                "calendar_fade": r.calendar_fade,
                "cycle_fade": r.cycle_fade,
                "capacity_fade": r.capacity_fade,
                "soh": r.soh,
                "degradation_cost_eur": r.degradation_cost_eur,
                "calendar_cost_eur": r.calendar_cost_eur,
                "cycle_cost_eur": r.cycle_cost_eur,
                "throughput_cost_eur_per_kwh": np.broadcast_to(r.throughput_cost_eur_per_kwh, n),
                "thermal_throughput_factor": r.thermal_throughput_factor,
                "warranty_throughput_used": r.warranty_throughput_used,
                "warranty_time_used": r.warranty_time_used,
                "model": pa.array([model.name] * n),
            }
        )
        con.register("_degradation_out", out)
        con.execute("INSERT INTO degradation BY NAME SELECT * FROM _degradation_out")
        con.unregister("_degradation_out")
        years = np.arange(1, p.horizon_years + 1, dtype=np.float64)
        per_year = throughput / np.maximum(c["age_days"], 1.0) * 365.25
        soh = soh_trajectory(
            years,
            per_year,
            capacity,
            c["dod"],
            c_rate,
            c["mean_temp_c"],
            c["mean_soc"],
            model=model,
            degradation_scale=p.degradation_scale,
        )
        traj = pa.table(
            {
                "vehicle_id": pa.array(np.repeat(t.column("vehicle_id").to_pylist(), years.size)),
                "age_years": pa.array(np.tile(years.astype(np.int32), n)),
                "soh": soh.reshape(-1),
            }
        )
        con.register("_soh_out", traj)
        con.execute("INSERT INTO degradation_soh_trajectory SELECT * FROM _soh_out")
        con.unregister("_soh_out")
