"""The vehicle decider as stories: given these events, when this command, then these events.

The story vehicle has a 50 kWh battery and, unless a story says otherwise, lossless
conversion, so the numbers can be checked by eye. It is 17:00 (minute 0).
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from actors.decider import CommandRejected, UnknownEntity
from actors.presets import preset, presets
from actors.vehicle import (
    VEHICLE,
    CancelTrip,
    EnforceSafeState,
    GrantControl,
    PlanTrip,
    PlugIn,
    RecordEnergy,
    RegisterVehicle,
    ReleaseControl,
    ReportTelemetry,
    RequestSetpoint,
    Unplug,
    VehicleState,
    available_charge_kwh,
    available_discharge_kwh,
    decide,
    reserve_kwh,
    soc_bounds,
)
from events.base import Event, event_class, load_event
from events.vehicle import (
    VEHICLE_EVENTS,
    VehicleControlGranted,
    VehicleControlRefused,
    VehicleControlReleased,
    VehicleEnergyRecorded,
    VehiclePluggedIn,
    VehicleRegistered,
    VehicleSafeStateEntered,
    VehicleSetpointAccepted,
    VehicleSetpointCurtailed,
    VehicleSetpointRejected,
    VehicleTelemetryReported,
    VehicleTripCancelled,
    VehicleTripPlanned,
    VehicleUnplugged,
)

VID = "van-7"
T0 = datetime(2025, 1, 6, 17, 0, tzinfo=UTC)
_ids = itertools.count()


def t(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def command(cls: type[Any], minute: float = 0, **fields: Any) -> Any:
    return cls(command_id=f"cmd-{next(_ids)}", issued_at=t(minute), vehicle_id=VID, **fields)


def given(*events: Event) -> VehicleState:
    return VEHICLE.fold(VID, events)


def when(state: VehicleState, cmd: Any) -> list[Event]:
    return decide(cmd, state)


# --- the facts stories start from ------------------------------------------


def registered(**overrides: Any) -> VehicleRegistered:
    fields: dict[str, Any] = {
        "vehicle_id": VID,
        "at": T0,
        "model": None,
        "site_id": "depot-north",
        "battery_capacity_kwh": 50.0,
        "max_charge_kw": 11.0,
        "max_discharge_kw": 11.0,
        "soc_floor": 0.20,
        "derate_above_c": 45.0,
        "refuse_discharge_above_c": 65.0,
        "min_soh_for_discharge": 0.70,
        "discharge_throughput_budget_kwh": None,
        "charge_efficiency": 1.0,
        "discharge_efficiency": 1.0,
    }
    return VehicleRegistered(**{**fields, **overrides})


def plugged(minute: float = 0, charge_kw: float = 22.0, discharge_kw: float = 22.0) -> Event:
    return VehiclePluggedIn(
        vehicle_id=VID,
        at=t(minute),
        charger_id="cp-1",
        charger_max_charge_kw=charge_kw,
        charger_max_discharge_kw=discharge_kw,
    )


def reading(soc: float, temp_c: float = 25.0, soh: float = 0.95, minute: float = 0) -> Event:
    return VehicleTelemetryReported(
        vehicle_id=VID,
        at=t(minute),
        measured_at=t(minute),
        soc=soc,
        battery_temp_c=temp_c,
        soh=soh,
        source="operator",
    )


def granted(controller: str = "dispatch-a", until: float = 240, minute: float = 0) -> Event:
    return VehicleControlGranted(
        vehicle_id=VID, at=t(minute), controller_id=controller, lease_until=t(until)
    )


def trip(energy_kwh: float, departure: float = 14 * 60, minute: float = 0) -> Event:
    return VehicleTripPlanned(
        vehicle_id=VID, at=t(minute), departure_at=t(departure), energy_needed_kwh=energy_kwh
    )


def setpoint_accepted(
    power_kw: float,
    until: float = 60,
    minute: float = 0,
    controller: str = "dispatch-a",
    requested_kw: float | None = None,
    limited_by: tuple[str, ...] = (),
) -> VehicleSetpointAccepted:
    return VehicleSetpointAccepted(
        vehicle_id=VID,
        at=t(minute),
        controller_id=controller,
        requested_power_kw=power_kw if requested_kw is None else requested_kw,
        power_kw=power_kw,
        valid_until=t(until),
        limited_by=limited_by,  # type: ignore[arg-type]
    )


def setpoint(
    power_kw: float, until: float = 60, minute: float = 0, controller: str = "dispatch-a"
) -> RequestSetpoint:
    return command(
        RequestSetpoint, minute, controller_id=controller, power_kw=power_kw, valid_until=t(until)
    )


def ready(soc: float = 0.8, **spec: Any) -> list[Event]:
    """Registered, plugged in, a fresh reading, and dispatch-a holds control to 21:00."""
    return [registered(**spec), plugged(), reading(soc), granted()]


def only(events: list[Event]) -> Any:
    assert len(events) == 1, events
    return events[0]


# --- registering ------------------------------------------------------------


def test_a_preset_fills_the_battery_and_power_from_the_shipped_specs() -> None:
    cmd = command(RegisterVehicle, model="Tesla Model 3", site_id="depot-north")

    event = only(when(given(), cmd))

    assert isinstance(event, VehicleRegistered)
    assert event.model == "Tesla Model 3"
    assert event.battery_capacity_kwh == 57.5
    assert (event.max_charge_kw, event.max_discharge_kw) == (11.0, 11.0)
    assert event.charge_efficiency == event.discharge_efficiency == 0.90
    assert event.soc_floor == 0.20


def test_explicit_fields_override_the_preset() -> None:
    cmd = command(
        RegisterVehicle,
        model="Peugeot 208",
        site_id="depot-north",
        max_charge_kw=3.7,
        soc_floor=0.35,
        discharge_throughput_budget_kwh=8000,
    )

    event = only(when(given(), cmd))

    assert event.battery_capacity_kwh == 46.3
    assert (event.max_charge_kw, event.max_discharge_kw) == (3.7, 7.4)
    assert event.soc_floor == 0.35
    assert event.discharge_throughput_budget_kwh == 8000


def test_every_shipped_preset_registers() -> None:
    assert len(presets()) == 8
    for name in presets():
        cmd = command(RegisterVehicle, model=name, site_id="s")
        assert only(when(given(), cmd)).battery_capacity_kwh == preset(name).battery_capacity_kwh


def test_an_unknown_model_is_a_validation_error_listing_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="known models: Hyundai Kona"):
        command(RegisterVehicle, model="Nissan Leaf", site_id="depot-north")


def test_without_a_preset_the_battery_must_be_given() -> None:
    with pytest.raises(ValidationError, match="battery_capacity_kwh"):
        command(RegisterVehicle, site_id="depot-north", max_charge_kw=11, max_discharge_kw=11)


def test_registering_again_with_the_same_data_changes_nothing() -> None:
    cmd = command(RegisterVehicle, model="Kia Niro", site_id="depot-north")
    state = given(*when(given(), cmd))

    assert (
        when(state, command(RegisterVehicle, minute=5, model="Kia Niro", site_id="depot-north"))
        == []
    )


def test_registering_again_with_different_data_is_rejected_naming_the_field() -> None:
    state = given(registered())
    cmd = command(
        RegisterVehicle,
        site_id="depot-north",
        battery_capacity_kwh=60,
        max_charge_kw=11,
        max_discharge_kw=11,
        charge_efficiency=1.0,
        discharge_efficiency=1.0,
    )

    with pytest.raises(CommandRejected, match=r"battery_capacity_kwh 50.0 != 60.0"):
        when(state, cmd)


def test_a_used_battery_registers_with_its_history() -> None:
    cmd = command(
        RegisterVehicle,
        model="Kia Niro",
        site_id="depot-north",
        battery_age_days=730,
        battery_throughput_kwh=12_000,
    )

    event = only(when(given(), cmd))

    assert (event.battery_age_days, event.battery_throughput_kwh) == (730.0, 12_000.0)
    # stored resolved: the payload names both, so a replay never relies on a default
    assert {"battery_age_days", "battery_throughput_kwh"} <= set(
        json.loads(event.model_dump_json())
    )
    state = given(event)
    assert state.spec is not None and state.spec.battery_age_days == 730.0
    # registering again with another history is a change of settings, not a repeat
    again = command(
        RegisterVehicle, minute=5, model="Kia Niro", site_id="depot-north", battery_age_days=731
    )
    with pytest.raises(CommandRejected, match=r"battery_age_days 730.0 != 731.0"):
        when(state, again)


def test_without_a_history_the_battery_is_new() -> None:
    event = only(when(given(), command(RegisterVehicle, model="Kia Niro", site_id="s")))
    assert (event.battery_age_days, event.battery_throughput_kwh) == (0.0, 0.0)


@pytest.mark.parametrize("field", ["battery_age_days", "battery_throughput_kwh"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_non_finite_history_is_refused_naming_the_field(
    field: str, value: float
) -> None:
    with pytest.raises(ValidationError, match=field):
        command(RegisterVehicle, model="Kia Niro", site_id="s", **{field: value})


# A VehicleRegistered as schema version 1 wrote it (before the battery's history).
V1_REGISTERED = (
    '{"vehicle_id":"van-7","at":"2025-01-06T17:00:00Z","model":"Kia Niro",'
    '"site_id":"depot-north","battery_capacity_kwh":64.8,"max_charge_kw":11.0,'
    '"max_discharge_kw":11.0,"soc_floor":0.2,"derate_above_c":45.0,'
    '"refuse_discharge_above_c":65.0,"min_soh_for_discharge":0.7,'
    '"discharge_throughput_budget_kwh":null,"charge_efficiency":0.9,'
    '"discharge_efficiency":0.9}'
)


def test_a_version_1_registration_reads_as_a_new_battery() -> None:
    event = load_event("VehicleRegistered", 1, V1_REGISTERED)

    assert isinstance(event, VehicleRegistered)
    assert (event.battery_age_days, event.battery_throughput_kwh) == (0.0, 0.0)
    state = given(event)
    assert state.spec is not None and state.spec.battery_capacity_kwh == 64.8
    # the same vehicle registered again today, without a history, is a repeat
    cmd = command(RegisterVehicle, model="Kia Niro", site_id="depot-north")
    assert when(state, cmd) == []


def test_a_snapshot_from_before_the_history_loads_as_a_new_battery() -> None:
    state = given(registered())
    stored = state.model_dump()
    for name in ("battery_age_days", "battery_throughput_kwh"):
        del stored["spec"][name]
    assert VehicleState.model_validate(stored) == state


def test_thermal_thresholds_must_be_in_order() -> None:
    cmd = command(
        RegisterVehicle,
        model="Kia Niro",
        site_id="s",
        derate_above_c=50,
        refuse_discharge_above_c=50,
    )
    with pytest.raises(CommandRejected, match=r"refuse_discharge_above_c 50.0 must be above"):
        when(given(), cmd)


@pytest.mark.parametrize(
    "cmd",
    [
        command(PlugIn, charger_id="cp-1", charger_max_charge_kw=11, charger_max_discharge_kw=11),
        command(Unplug),
        command(ReportTelemetry, measured_at=T0, soc=0.5, battery_temp_c=20, soh=1),
        command(PlanTrip, departure_at=t(60), energy_needed_kwh=10),
        command(CancelTrip),
        command(GrantControl, controller_id="dispatch-a", lease_until=t(60)),
        command(ReleaseControl, controller_id="dispatch-a"),
        command(
            RecordEnergy, interval_start=T0, interval_end=t(15), charged_kwh=1, discharged_kwh=0
        ),
        setpoint(0),
        command(EnforceSafeState, reason="e-stop"),
    ],
    ids=lambda cmd: type(cmd).__name__,
)
def test_any_command_for_an_unregistered_vehicle_is_an_unknown_entity(cmd: Any) -> None:
    with pytest.raises(UnknownEntity, match="'van-7' is not registered"):
        when(given(), cmd)


def test_a_command_for_another_vehicle_is_rejected() -> None:
    cmd = RegisterVehicle(
        command_id="x", issued_at=T0, vehicle_id="van-8", model="Kia Niro", site_id="s"
    )
    with pytest.raises(CommandRejected, match="does not match"):
        decide(cmd, VEHICLE.initial_state(VID))


def test_field_validation_happens_at_construction() -> None:
    with pytest.raises(ValidationError):
        command(ReportTelemetry, measured_at=T0, soc=1.2, battery_temp_c=20, soh=1)
    with pytest.raises(ValidationError):
        command(RequestSetpoint, controller_id="a", power_kw=float("nan"), valid_until=t(5))
    with pytest.raises(ValidationError):
        RequestSetpoint(
            command_id="x",
            issued_at=T0,
            vehicle_id="van 7/../x",
            controller_id="a",
            power_kw=1,
            valid_until=t(5),
        )


def test_commands_name_the_vehicle_stream() -> None:
    assert setpoint(0).stream_id == "vehicle-van-7" == VEHICLE.stream_id(VID)


# --- plugging in ------------------------------------------------------------


def test_plugging_in_and_out() -> None:
    state = given(registered())
    plug = command(PlugIn, charger_id="cp-1", charger_max_charge_kw=22, charger_max_discharge_kw=10)

    plugged_in = when(state, plug)
    assert plugged_in == [
        VehiclePluggedIn(
            vehicle_id=VID,
            at=T0,
            charger_id="cp-1",
            charger_max_charge_kw=22,
            charger_max_discharge_kw=10,
        )
    ]
    state = given(registered(), *plugged_in)
    assert when(state, plug) == []

    unplugged = when(state, command(Unplug, minute=30))
    assert unplugged == [VehicleUnplugged(vehicle_id=VID, at=t(30), charger_id="cp-1")]
    assert when(given(registered(), *plugged_in, *unplugged), command(Unplug, minute=31)) == []


def test_plugging_in_again_after_the_departure_ends_the_trip() -> None:
    state = given(registered(), trip(40, departure=60), plugged(minute=120))

    assert state.trip is None
    assert reserve_kwh(state) == 10.0  # the floor again


def test_replugging_before_the_departure_keeps_the_trip() -> None:
    state = given(registered(), trip(40, departure=60), plugged(minute=30))

    assert reserve_kwh(state) == 40.0


# --- telemetry --------------------------------------------------------------


def test_a_newer_reading_is_recorded_a_repeated_or_older_one_is_not() -> None:
    state = given(registered(), reading(0.5, minute=10))

    newer = command(ReportTelemetry, 11, measured_at=t(11), soc=0.49, battery_temp_c=20, soh=0.9)
    same = command(ReportTelemetry, 12, measured_at=t(10), soc=0.5, battery_temp_c=25, soh=0.95)
    older = command(ReportTelemetry, 12, measured_at=t(5), soc=0.9, battery_temp_c=20, soh=0.9)

    assert [type(e) for e in when(state, newer)] == [VehicleTelemetryReported]
    assert when(state, same) == []
    assert when(state, older) == []


def test_telemetry_times_are_stored_in_utc() -> None:
    cet = timezone(timedelta(hours=1))
    cmd = command(
        ReportTelemetry, measured_at=T0.astimezone(cet), soc=0.5, battery_temp_c=20, soh=1
    )

    event = only(when(given(registered()), cmd))

    assert event.measured_at.tzinfo == UTC
    assert event.measured_at == T0


# --- trips ------------------------------------------------------------------


def test_planning_and_cancelling_a_trip() -> None:
    state = given(registered())
    plan = command(PlanTrip, departure_at=t(14 * 60), energy_needed_kwh=30)

    planned = when(state, plan)
    assert planned == [trip(30)]
    state = given(registered(), *planned)
    assert when(state, plan) == []
    assert reserve_kwh(state) == 30.0

    cancelled = when(state, command(CancelTrip, 5))
    assert cancelled == [VehicleTripCancelled(vehicle_id=VID, at=t(5))]
    assert when(given(registered(), *planned, *cancelled), command(CancelTrip, 6)) == []


def test_a_trip_in_the_past_or_larger_than_the_battery_is_rejected() -> None:
    state = given(registered())
    with pytest.raises(CommandRejected, match=r"departure_at .* must be after issued_at"):
        when(state, command(PlanTrip, 10, departure_at=t(10), energy_needed_kwh=5))
    with pytest.raises(CommandRejected, match=r"energy_needed_kwh 60.0 exceeds"):
        when(state, command(PlanTrip, departure_at=t(60), energy_needed_kwh=60))


# --- control lease ----------------------------------------------------------


def test_a_controller_takes_control_and_renewing_with_the_same_lease_changes_nothing() -> None:
    grant = command(GrantControl, controller_id="dispatch-a", lease_until=t(240))

    events = when(given(registered()), grant)

    assert events == [granted()]
    assert when(given(registered(), *events), grant) == []


def test_a_second_controller_is_refused_while_the_lease_is_live() -> None:
    state = given(registered(), granted(until=240))
    grab = command(GrantControl, 10, controller_id="dispatch-b", lease_until=t(300))

    refused = only(when(state, grab))

    assert refused == VehicleControlRefused(
        vehicle_id=VID,
        at=t(10),
        controller_id="dispatch-b",
        holder_id="dispatch-a",
        reason=(
            "controller 'dispatch-a' holds the control lease until 2025-01-06T21:00:00+00:00; "
            "one controller at a time"
        ),
    )
    assert when(given(registered(), granted(until=240), refused), grab) == []


def test_an_expired_lease_may_be_taken_over_and_its_setpoint_ends() -> None:
    state = given(*ready(), setpoint_accepted(-5, until=60))
    take_over = command(GrantControl, 240, controller_id="dispatch-b", lease_until=t(300))

    events = when(state, take_over)

    assert events == [granted("dispatch-b", until=300, minute=240)]
    after = given(*ready(), setpoint_accepted(-5, until=60), *events)
    assert after.setpoint is None
    assert after.lease is not None and after.lease.controller_id == "dispatch-b"


def test_a_lease_must_end_after_it_is_granted() -> None:
    with pytest.raises(CommandRejected, match=r"lease_until .* must be after issued_at"):
        when(
            given(registered()),
            command(GrantControl, 10, controller_id="dispatch-a", lease_until=t(10)),
        )


def test_only_the_holder_releases_control() -> None:
    state = given(*ready(), setpoint_accepted(-5))

    with pytest.raises(CommandRejected, match="'dispatch-a' holds the lease"):
        when(state, command(ReleaseControl, 5, controller_id="dispatch-b"))

    released = when(state, command(ReleaseControl, 5, controller_id="dispatch-a"))
    assert released == [VehicleControlReleased(vehicle_id=VID, at=t(5), controller_id="dispatch-a")]
    after = given(*ready(), setpoint_accepted(-5), *released)
    assert after.lease is None and after.setpoint is None
    assert when(after, command(ReleaseControl, 6, controller_id="dispatch-a")) == []


# --- metered energy ---------------------------------------------------------


def test_metered_energy_accumulates_once_per_interval() -> None:
    state = given(registered())
    first = command(
        RecordEnergy, 15, interval_start=T0, interval_end=t(15), charged_kwh=2.5, discharged_kwh=0
    )
    second = command(
        RecordEnergy,
        30,
        interval_start=t(15),
        interval_end=t(30),
        charged_kwh=0,
        discharged_kwh=1.5,
    )

    events = when(state, first)
    assert events == [
        VehicleEnergyRecorded(
            vehicle_id=VID,
            at=t(15),
            interval_start=T0,
            interval_end=t(15),
            charged_kwh=2.5,
            discharged_kwh=0,
        )
    ]
    state = given(registered(), *events)
    assert when(state, first) == []  # redelivered: counted once
    state = given(registered(), *events, *when(state, second))

    assert (state.charged_kwh_total, state.discharged_kwh_total) == (2.5, 1.5)


def test_an_overlapping_or_empty_interval_is_rejected() -> None:
    state = given(
        registered(),
        VehicleEnergyRecorded(
            vehicle_id=VID,
            at=t(15),
            interval_start=T0,
            interval_end=t(15),
            charged_kwh=1,
            discharged_kwh=0,
        ),
    )
    overlapping = command(
        RecordEnergy, 20, interval_start=t(10), interval_end=t(20), charged_kwh=1, discharged_kwh=0
    )
    empty = command(
        RecordEnergy, 20, interval_start=t(20), interval_end=t(20), charged_kwh=0, discharged_kwh=0
    )

    with pytest.raises(CommandRejected, match="overlaps energy already metered"):
        when(state, overlapping)
    with pytest.raises(CommandRejected, match=r"interval_end .* must be after interval_start"):
        when(state, empty)


# --- setpoints: the safety rules -------------------------------------------


def test_a_setpoint_within_every_limit_is_accepted_as_asked() -> None:
    assert when(given(*ready()), setpoint(-7)) == [setpoint_accepted(-7)]
    assert when(given(*ready(soc=0.5)), setpoint(7)) == [setpoint_accepted(7)]


def test_power_is_limited_by_the_vehicle_and_the_charger() -> None:
    state = given(registered(), plugged(charge_kw=7.4, discharge_kw=22), reading(0.5), granted())

    assert when(state, setpoint(-20)) == [
        setpoint_accepted(-11, requested_kw=-20, limited_by=("vehicle_power",))
    ]
    assert when(state, setpoint(20)) == [
        setpoint_accepted(7.4, requested_kw=20, limited_by=("charger_power",))
    ]


def test_discharge_stops_at_the_soc_floor() -> None:
    # 15 kWh in the battery, a 10 kWh floor: 5 kWh for the next hour, 5 kW at most.
    event = only(when(given(*ready(soc=0.3)), setpoint(-11)))

    assert event.limited_by == ("soc_reserve",)
    assert event.power_kw == pytest.approx(-5.0)
    assert abs(event.power_kw) < 5.0  # never a hair beyond the floor


def test_discharge_keeps_the_energy_the_next_trip_needs() -> None:
    # The trip needs 20 kWh, more than the 10 kWh floor; 25 kWh are in the battery.
    state = given(*ready(soc=0.5), trip(20))

    event = only(when(state, setpoint(-11, until=30)))

    assert event.power_kw == pytest.approx(-10.0)  # 5 kWh in half an hour
    assert event.limited_by == ("soc_reserve",)


def test_nothing_above_the_reserve_is_a_refusal_naming_the_reserve() -> None:
    state = given(*ready(soc=0.5), trip(25))

    event = only(when(state, setpoint(-3)))

    assert isinstance(event, VehicleSetpointRejected)
    assert event.reason.startswith("soc reserve:")
    assert "needs 25.0 kWh" in event.reason


def test_discharge_losses_count_against_the_reserve() -> None:
    # 5 kWh above the floor; at 80 % efficiency the grid sees at most 4 kWh in an hour.
    state = given(*ready(soc=0.3, discharge_efficiency=0.8))

    assert only(when(state, setpoint(-11))).power_kw == pytest.approx(-4.0)


def test_charging_stops_at_a_full_battery() -> None:
    # 47.5 kWh in a 50 kWh battery at 90 % efficiency: 2.5 kWh of room is 2.78 kW for an hour.
    state = given(*ready(soc=0.95, charge_efficiency=0.9))

    event = only(when(state, setpoint(11)))

    assert event.power_kw == pytest.approx(2.5 / 0.9)
    assert event.limited_by == ("soc_full",)
    full = only(when(given(*ready(soc=1.0)), setpoint(11)))
    assert isinstance(full, VehicleSetpointRejected)
    assert full.reason.startswith("battery full")


def test_a_warm_battery_discharges_at_derated_power() -> None:
    # 55 °C is halfway from 45 °C (full power) to 65 °C (none): 5.5 of 11 kW.
    state = given(registered(), plugged(), reading(0.5, temp_c=55), granted())

    assert when(state, setpoint(-11)) == [
        setpoint_accepted(-5.5, requested_kw=-11, limited_by=("thermal_derating",))
    ]
    assert only(when(state, setpoint(11))).power_kw == 11  # charging is not derated


def test_a_hot_battery_does_not_discharge() -> None:
    state = given(registered(), plugged(), reading(0.8, temp_c=65), granted())

    event = only(when(state, setpoint(-1)))

    assert event.reason == "battery_temp_c 65.0 is at or above refuse_discharge_above_c 65.0"


def test_a_degraded_battery_does_not_discharge() -> None:
    state = given(registered(), plugged(), reading(0.8, soh=0.65), granted())

    event = only(when(state, setpoint(-1)))

    assert event.reason.startswith("soh 0.650 is below min_soh_for_discharge 0.700")
    assert only(when(state, setpoint(5))).power_kw == 5  # it may still charge


def _metered(discharged_kwh: float) -> Event:
    return VehicleEnergyRecorded(
        vehicle_id=VID,
        at=T0,
        interval_start=t(-60),
        interval_end=T0,
        charged_kwh=0,
        discharged_kwh=discharged_kwh,
    )


def test_the_warranty_budget_ends_discharge() -> None:
    state = given(*ready(discharge_throughput_budget_kwh=1000), _metered(1000))

    event = only(when(state, setpoint(-5)))

    assert event.reason.startswith("battery throughput exceeded")


def test_the_rest_of_the_warranty_budget_limits_discharge() -> None:
    state = given(*ready(discharge_throughput_budget_kwh=1000), _metered(998))

    event = only(when(state, setpoint(-5, until=60)))

    assert event.power_kw == pytest.approx(-2.0)
    assert event.limited_by == ("throughput_budget",)


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ([registered(), reading(0.8), granted()], "not plugged in"),
        ([registered(), plugged(), granted()], "soc unknown: no telemetry reported yet"),
        (
            [registered(), plugged(discharge_kw=0), reading(0.8), granted()],
            "charger 'cp-1' cannot discharge",
        ),
        (
            [registered(max_discharge_kw=0), plugged(), reading(0.8), granted()],
            "vehicle cannot discharge",
        ),
    ],
    ids=["unplugged", "no-telemetry", "charge-only-charger", "charge-only-vehicle"],
)
def test_discharge_needs_a_plug_a_reading_and_bidirectional_hardware(
    facts: list[Event], reason: str
) -> None:
    event = only(when(given(*facts), setpoint(-5)))

    assert isinstance(event, VehicleSetpointRejected)
    assert event.reason.startswith(reason)


def test_power_zero_from_the_holder_is_always_accepted() -> None:
    unplugged_and_hot = given(registered(), reading(0.1, temp_c=90, soh=0.1), granted())

    assert when(unplugged_and_hot, setpoint(0, until=600)) == [setpoint_accepted(0, until=600)]


def test_a_setpoint_from_a_controller_without_the_lease_names_the_holder() -> None:
    event = only(when(given(*ready()), setpoint(0, controller="dispatch-b")))

    assert event.reason == (
        "controller 'dispatch-b' does not hold the control lease: "
        "'dispatch-a' holds it until 2025-01-06T21:00:00+00:00"
    )


def test_an_expired_lease_sets_nothing() -> None:
    event = only(when(given(*ready()), setpoint(-1, minute=240, until=250)))

    assert event.reason == (
        "controller 'dispatch-a' does not hold the control lease: "
        "the lease of 'dispatch-a' expired at 2025-01-06T21:00:00+00:00"
    )


def test_no_controller_no_setpoint() -> None:
    event = only(when(given(registered(), plugged(), reading(0.5)), setpoint(0)))

    assert event.reason.endswith("no controller holds it")


def test_a_setpoint_may_not_outlive_the_lease() -> None:
    event = only(when(given(*ready()), setpoint(-1, until=300)))

    assert event.reason.startswith("valid_until 2025-01-06T22:00:00+00:00 is after the control")


def test_valid_until_must_be_after_issued_at() -> None:
    with pytest.raises(CommandRejected, match=r"valid_until .* must be after issued_at"):
        when(given(*ready()), setpoint(-1, minute=60, until=60))


def test_the_same_setpoint_again_changes_nothing() -> None:
    state = given(*ready(), setpoint_accepted(-7))

    assert when(state, setpoint(-7)) == []
    assert when(state, setpoint(-7, minute=10)) == []  # still the active one
    assert [type(e) for e in when(state, setpoint(-6))] == [VehicleSetpointAccepted]


def test_the_same_refused_setpoint_again_changes_nothing_until_something_changes() -> None:
    state = given(*ready())
    refused = when(state, setpoint(-1, controller="dispatch-b"))
    state = given(*ready(), *refused)

    assert when(state, setpoint(-1, controller="dispatch-b")) == []
    later = given(*ready(), *refused, reading(0.79, minute=1))
    assert len(when(later, setpoint(-1, minute=2, controller="dispatch-b"))) == 1


def test_a_refused_request_from_the_holder_ends_its_active_setpoint() -> None:
    state = given(*ready(), setpoint_accepted(-7))

    refused = only(when(state, setpoint(-7, minute=10, until=300)))

    assert given(*ready(), setpoint_accepted(-7), refused).setpoint is None


def test_discharge_since_the_last_reading_counts_against_the_reserve() -> None:
    # At 17:00 the battery holds 15 kWh. Half an hour at 6 kW takes 3 kWh, and no
    # reading has come since: only 2 kWh above the floor may remain for the next plan.
    state = given(*ready(soc=0.3), setpoint_accepted(-6, until=60))

    event = only(when(state, setpoint(-11, minute=30, until=60)))

    assert event.power_kw == pytest.approx(-4.0)  # 2 kWh in the remaining half hour
    assert available_discharge_kwh(state, t(30)) == pytest.approx(2.0)
    assert soc_bounds(state, t(30)) == pytest.approx((0.24, 0.30))


# --- curtailment: new facts during a discharge -----------------------------


def test_a_battery_that_overheats_mid_discharge_is_curtailed_to_zero() -> None:
    state = given(*ready(), setpoint_accepted(-7, until=60))
    hot = command(ReportTelemetry, 10, measured_at=t(10), soc=0.78, battery_temp_c=70, soh=0.95)

    events = when(state, hot)

    assert [type(e) for e in events] == [VehicleTelemetryReported, VehicleSetpointCurtailed]
    assert events[1] == VehicleSetpointCurtailed(
        vehicle_id=VID,
        at=t(10),
        controller_id="dispatch-a",
        previous_power_kw=-7,
        power_kw=0,
        reason="battery_temp_c 70.0 is at or above refuse_discharge_above_c 65.0",
    )
    assert when(given(*ready(), setpoint_accepted(-7, until=60), *events), hot) == []


def test_a_new_trip_curtails_a_discharge_that_would_eat_into_it() -> None:
    # 40 kWh in the battery, discharging 10 kW for an hour; then a 35 kWh trip is planned.
    state = given(*ready(soc=0.8), setpoint_accepted(-10, until=60))

    events = when(state, command(PlanTrip, departure_at=t(600), energy_needed_kwh=35))

    curtailed = events[1]
    assert isinstance(curtailed, VehicleSetpointCurtailed)
    assert curtailed.power_kw == pytest.approx(-5.0)
    assert curtailed.reason == "discharge limits changed: limited by soc_reserve"


def test_a_reading_that_fits_the_plan_curtails_nothing() -> None:
    state = given(*ready(soc=0.8), setpoint_accepted(-6, until=60))
    on_plan = command(ReportTelemetry, 30, measured_at=t(30), soc=0.74, battery_temp_c=25, soh=0.95)

    assert [type(e) for e in when(state, on_plan)] == [VehicleTelemetryReported]


# --- safe state -------------------------------------------------------------


def test_anyone_can_put_the_vehicle_in_a_safe_state_once() -> None:
    state = given(*ready(), setpoint_accepted(-7))
    stop = command(EnforceSafeState, 5, reason="watchdog: no heartbeat from dispatch-a for 5 s")

    events = when(state, stop)

    assert events == [
        VehicleSafeStateEntered(
            vehicle_id=VID, at=t(5), reason="watchdog: no heartbeat from dispatch-a for 5 s"
        )
    ]
    after = given(*ready(), setpoint_accepted(-7), *events)
    assert after.setpoint is None and after.lease is None
    assert when(after, command(EnforceSafeState, 6, reason="e-stop")) == []


def test_leaving_the_safe_state_takes_a_new_grant() -> None:
    after = given(*ready(), VehicleSafeStateEntered(vehicle_id=VID, at=t(5), reason="islanding"))

    assert only(when(after, setpoint(-5, minute=6))).reason.endswith("no controller holds it")
    regranted = given(
        *ready(),
        VehicleSafeStateEntered(vehicle_id=VID, at=t(5), reason="islanding"),
        granted(minute=10),
    )
    assert regranted.safe_state_reason is None
    assert only(when(regranted, setpoint(-5, minute=11))).power_kw == -5


# --- state and events as storage --------------------------------------------


def test_the_state_snapshot_round_trips_through_json() -> None:
    state = given(*ready(), trip(20), setpoint_accepted(-5, limited_by=("soc_reserve",)))

    assert VehicleState.model_validate_json(state.model_dump_json()) == state


def test_telemetry_is_recorded_as_validation_would_record_it() -> None:
    # decide builds this event without validating it again; the times still go to UTC
    plus_two = timezone(timedelta(hours=2))
    state = given(*ready())
    [reported] = when(
        state,
        ReportTelemetry(
            command_id="tel-tz",
            issued_at=t(5).astimezone(plus_two),
            vehicle_id=VID,
            measured_at=t(4).astimezone(plus_two),
            soc=1,
            battery_temp_c=25,
            soh=0.9,
            source="mqtt",
        ),
    )
    validated = VehicleTelemetryReported(
        vehicle_id=VID,
        at=t(5),
        measured_at=t(4),
        soc=1.0,
        battery_temp_c=25.0,
        soh=0.9,
        source="mqtt",
    )
    assert reported == validated
    assert reported.model_dump_json() == validated.model_dump_json()
    assert reported.at.tzinfo == UTC and reported.model_fields_set == validated.model_fields_set


def test_evolved_states_copy_like_pydantic_models() -> None:
    state = given(*ready(), trip(20))
    later = VEHICLE.evolve(state, reading(0.5, minute=30))
    assert later.reading is not None and later.reading.soc == 0.5
    assert state.reading != later.reading  # the state it came from is untouched
    assert later.model_copy(update={"safe_state_reason": "x"}).safe_state_reason == "x"
    with pytest.raises(ValidationError):
        later.reading.soc = 0.1  # type: ignore[misc]  # still frozen


def test_vehicle_events_are_registered_frozen_and_strict() -> None:
    for cls in VEHICLE_EVENTS:
        assert event_class(cls.__name__) is cls
        assert cls.schema_version == (
            2 if cls in (VehicleTelemetryReported, VehicleRegistered) else 1
        )
        assert cls.model_config.get("frozen") and cls.model_config.get("extra") == "forbid"
    event = setpoint_accepted(-5, limited_by=("soc_reserve",))
    assert load_event(type(event).type_name(), 1, event.model_dump_json()) == event
    with pytest.raises(ValidationError):
        event.model_copy().__class__(**{**event.model_dump(), "surprise": 1})


def test_helpers_without_telemetry_offer_nothing() -> None:
    state = given(registered())

    assert available_discharge_kwh(state, T0) == 0.0
    assert available_charge_kwh(state, T0) == 0.0


def test_commands_survive_pickling_as_they_were() -> None:
    # Vehicle commands pickle as plain values (they cross Ray a thousand at a time);
    # what arrives must be the same command, down to which fields were given.
    import pickle

    import ray.cloudpickle

    plus_two = timezone(timedelta(hours=2))
    commands = [
        command(ReportTelemetry, 3, measured_at=t(2), soc=0.5, battery_temp_c=20, soh=0.9),
        command(
            ReportTelemetry,
            3,
            measured_at=t(2).astimezone(plus_two),
            soc=0.5,
            battery_temp_c=20,
            soh=0.9,
            source="mqtt",
        ),
        command(RequestSetpoint, 1, controller_id="d", power_kw=-5, valid_until=t(30)),
        command(EnforceSafeState, reason="e-stop"),
        RegisterVehicle(
            command_id="r",
            issued_at=datetime(2025, 1, 6, 17, 0, fold=1, tzinfo=UTC),
            vehicle_id=VID,
            model="Volkswagen ID.4",
            site_id="depot",
        ),
    ]
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):
        for sent in commands:
            arrived = pickle.loads(dumps(sent))
            assert type(arrived) is type(sent) and arrived == sent
            assert arrived.model_fields_set == sent.model_fields_set
            assert arrived.model_dump_json() == sent.model_dump_json()
            assert arrived.model_dump_json(exclude_unset=True) == sent.model_dump_json(
                exclude_unset=True
            )
            assert [type(v) for v in arrived.__dict__.values()] == [
                type(v) for v in sent.__dict__.values()
            ]
            assert arrived.issued_at.tzinfo == sent.issued_at.tzinfo
