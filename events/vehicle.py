"""The facts a vehicle's stream holds (`vehicle-<vehicle_id>`).

Every vehicle event carries `vehicle_id` and `at`: the domain time of the command
that caused it (its `issued_at`, in UTC). The envelope's `occurred_at` is when the
host recorded it; `at` is what `evolve` may reason with, so a replay never depends
on the clock of the machine that wrote the log.

Names carry the `Vehicle` prefix because event types are registered by class name
across the whole system, and chargers and inverters have telemetry, setpoints and
safe states of their own.

Each event spells out its own fields (there is no shared base with fields): an
event type is a storage contract, and a base class would let one edit change many.
Sign convention: power_kw > 0 charges the vehicle, power_kw < 0 discharges it (V2G).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, Field

from events.base import Event, register_upcaster, utc

UtcDatetime = Annotated[AwareDatetime, AfterValidator(utc)]
Kilowatts = Annotated[float, Field(allow_inf_nan=False)]
KilowattHours = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Celsius = Annotated[float, Field(ge=-60, le=150, allow_inf_nan=False)]
Efficiency = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Days = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Reason = Annotated[str, Field(min_length=1, max_length=500)]

# Why an accepted setpoint is below what was asked, in a fixed order (projections
# group by these codes; the numbers behind them are in the registered spec and the
# latest telemetry).
LimitReason = Literal[
    "vehicle_power",  # the vehicle's max_charge_kw / max_discharge_kw
    "charger_power",  # the connected charger's limits
    "thermal_derating",  # battery_temp_c above derate_above_c
    "soc_reserve",  # discharging further would end below max(soc floor, trip energy)
    "throughput_budget",  # discharging further would exceed the warranty budget
    "soc_full",  # charging further would end above 100 %
]
LIMIT_REASONS: tuple[LimitReason, ...] = (
    "vehicle_power",
    "charger_power",
    "thermal_derating",
    "soc_reserve",
    "throughput_budget",
    "soc_full",
)


class VehicleRegistered(Event):
    """A vehicle joined the fleet with its battery, power limits and safety settings.

    Values are stored resolved (a preset's numbers, not its name alone), so a replay
    never depends on the presets file of the day.

    Schema version 2 added the battery's history when it joined: `battery_age_days`
    (since the pack was new) and `battery_throughput_kwh` (battery-side energy charged
    plus discharged since new), so wear in the fleet is priced as the marginal wear of
    a used pack rather than the steep first weeks of a new one. Version-1 events are
    read as a new battery (0 and 0, see the upcaster below), which is what readers
    assumed of them.
    """

    schema_version: ClassVar[int] = 2

    vehicle_id: str
    at: UtcDatetime
    model: str | None
    site_id: str
    battery_capacity_kwh: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    max_charge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    max_discharge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    soc_floor: Fraction
    derate_above_c: Celsius
    refuse_discharge_above_c: Celsius
    min_soh_for_discharge: Fraction
    discharge_throughput_budget_kwh: KilowattHours | None
    charge_efficiency: Efficiency
    discharge_efficiency: Efficiency
    battery_age_days: Days = 0.0
    battery_throughput_kwh: KilowattHours = 0.0


@register_upcaster("VehicleRegistered", from_version=1)
def _registered_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    # Version 1 had no battery history: every reader took the pack as new at registration.
    return {**payload, "battery_age_days": 0.0, "battery_throughput_kwh": 0.0}


class VehiclePluggedIn(Event):
    """The vehicle was connected to a charger; any earlier setpoint ends (power 0)."""

    vehicle_id: str
    at: UtcDatetime
    charger_id: str
    charger_max_charge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    charger_max_discharge_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class VehicleUnplugged(Event):
    """The vehicle was disconnected; its setpoint ends."""

    vehicle_id: str
    at: UtcDatetime
    charger_id: str


TelemetrySource = Literal["mqtt", "ocpp", "operator", "simulator", "unrecorded"]


class VehicleTelemetryReported(Event):
    """A newer battery reading than any before it.

    Schema version 2 added `source`, the channel the reading came through, so an
    auditor can tell a value the car reported from one an operator typed in.
    Version-1 events are read as `source="unrecorded"` (see the upcaster below).
    """

    schema_version: ClassVar[int] = 2

    vehicle_id: str
    at: UtcDatetime
    measured_at: UtcDatetime
    soc: Fraction
    battery_temp_c: Celsius
    soh: Fraction
    source: TelemetrySource


@register_upcaster("VehicleTelemetryReported", from_version=1)
def _telemetry_v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
    # Version 1 did not say where a reading came from; we do not guess.
    return {**payload, "source": "unrecorded"}


class VehicleTripPlanned(Event):
    """The next trip: it needs `energy_needed_kwh` in the battery at `departure_at`."""

    vehicle_id: str
    at: UtcDatetime
    departure_at: UtcDatetime
    energy_needed_kwh: KilowattHours


class VehicleTripCancelled(Event):
    vehicle_id: str
    at: UtcDatetime


class VehicleControlGranted(Event):
    """`controller_id` alone may set this vehicle's power until `lease_until`.

    A grant to a new controller ends the previous controller's setpoint; a grant to
    the holder renews its lease.
    """

    vehicle_id: str
    at: UtcDatetime
    controller_id: str
    lease_until: UtcDatetime


class VehicleControlRefused(Event):
    """A grant was refused because another controller holds a live lease."""

    vehicle_id: str
    at: UtcDatetime
    controller_id: str
    holder_id: str
    reason: Reason


class VehicleControlReleased(Event):
    """The holder gave up control; its setpoint ends."""

    vehicle_id: str
    at: UtcDatetime
    controller_id: str


class VehicleEnergyRecorded(Event):
    """Energy metered at the charger over an interval (grid side, both magnitudes)."""

    vehicle_id: str
    at: UtcDatetime
    interval_start: UtcDatetime
    interval_end: UtcDatetime
    charged_kwh: KilowattHours
    discharged_kwh: KilowattHours


class VehicleSetpointAccepted(Event):
    """The controller's setpoint, within every limit, holds from `at` to `valid_until`.

    `power_kw` may be smaller in magnitude than `requested_power_kw`; `limited_by`
    then names the limit that set it (each of them when several are equal).
    """

    vehicle_id: str
    at: UtcDatetime
    controller_id: str
    requested_power_kw: Kilowatts
    power_kw: Kilowatts
    valid_until: UtcDatetime
    limited_by: tuple[LimitReason, ...] = ()


class VehicleSetpointRejected(Event):
    """A setpoint was refused; `reason` says which field and why.

    A refusal to the controller whose setpoint is active also ends that setpoint
    (the vehicle idles): the controller asked for something else, and the safe
    fallback is power 0, not its previous wish.
    """

    vehicle_id: str
    at: UtcDatetime
    controller_id: str
    requested_power_kw: Kilowatts
    valid_until: UtcDatetime
    reason: Reason


class VehicleSetpointCurtailed(Event):
    """A new fact (telemetry, a trip, metered energy) made the active discharge unsafe.

    From `at` the active setpoint runs at `power_kw` (0 when discharge is no longer
    allowed at all) until its `valid_until`.
    """

    vehicle_id: str
    at: UtcDatetime
    controller_id: str
    previous_power_kw: Kilowatts
    power_kw: Kilowatts
    reason: Reason


class VehicleSafeStateEntered(Event):
    """Power 0 and no controller (watchdog, e-stop, loss of grid).

    Leaving the safe state takes a new `GrantControl`, a deliberate act, so a
    controller that lost its heartbeat or an islanded site cannot resume export by
    simply sending the next setpoint.
    """

    vehicle_id: str
    at: UtcDatetime
    reason: Reason


VEHICLE_EVENTS: tuple[type[Event], ...] = (
    VehicleRegistered,
    VehiclePluggedIn,
    VehicleUnplugged,
    VehicleTelemetryReported,
    VehicleTripPlanned,
    VehicleTripCancelled,
    VehicleControlGranted,
    VehicleControlRefused,
    VehicleControlReleased,
    VehicleEnergyRecorded,
    VehicleSetpointAccepted,
    VehicleSetpointRejected,
    VehicleSetpointCurtailed,
    VehicleSafeStateEntered,
)

__all__ = [
    "LIMIT_REASONS",
    "VEHICLE_EVENTS",
    "Celsius",
    "Days",
    "Efficiency",
    "Fraction",
    "KilowattHours",
    "Kilowatts",
    "LimitReason",
    "Reason",
    "UtcDatetime",
    "VehicleControlGranted",
    "VehicleControlRefused",
    "VehicleControlReleased",
    "VehicleEnergyRecorded",
    "VehiclePluggedIn",
    "VehicleRegistered",
    "VehicleSafeStateEntered",
    "VehicleSetpointAccepted",
    "VehicleSetpointCurtailed",
    "VehicleSetpointRejected",
    "VehicleTelemetryReported",
    "VehicleTripCancelled",
    "VehicleTripPlanned",
    "VehicleUnplugged",
]
