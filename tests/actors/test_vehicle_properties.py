"""Properties of the vehicle decider over random command sequences.

1. Idempotent: for any reachable state and any command, deciding it, evolving the
   events and deciding it again adds nothing.
2. Safe: no sequence ever yields an accepted discharge whose worst-case SoC at
   valid_until is below the reserve, max(SoC floor, next trip). The worst case is
   computed here, independently of the decider: the last reading minus every
   discharge accepted since it, as if each ran at full power until it ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.decider import CommandRejected
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
    decide,
    evolve,
)
from events.base import Event
from events.vehicle import (
    VehicleControlGranted,
    VehicleControlReleased,
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

VID = "prop-1"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CONTROLLERS = ("dispatch-a", "dispatch-b")
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _hours(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() / 3600.0)


@st.composite
def registrations(draw: st.DrawFn) -> RegisterVehicle:
    derate = draw(st.floats(20, 60))
    return RegisterVehicle(
        command_id="register",
        issued_at=T0,
        vehicle_id=VID,
        site_id="site",
        battery_capacity_kwh=draw(st.floats(10, 120)),
        max_charge_kw=draw(st.sampled_from([3.7, 11.0, 22.0, 0.0])),
        max_discharge_kw=draw(st.sampled_from([7.4, 11.0, 50.0, 0.0])),
        soc_floor=draw(st.floats(0, 0.6)),
        derate_above_c=derate,
        refuse_discharge_above_c=derate + draw(st.floats(1, 30)),
        min_soh_for_discharge=draw(st.floats(0.5, 0.9)),
        discharge_throughput_budget_kwh=draw(st.sampled_from([None, None, 0.0, 30.0])),
        charge_efficiency=draw(st.floats(0.7, 1.0)),
        discharge_efficiency=draw(st.floats(0.7, 1.0)),
    )


def _command(draw: st.DrawFn, now: datetime, n: int, capacity_kwh: float) -> Any:
    """One random command at `now` (bounded: fields valid, times near `now`)."""
    base = {"command_id": f"c{n}", "issued_at": now, "vehicle_id": VID}
    minutes = st.integers(1, 240).map(lambda m: now + timedelta(minutes=m))
    # Weighted: setpoints and telemetry often, what ends control rarely.
    kind = draw(st.integers(0, 18))
    controllers = st.sampled_from(CONTROLLERS[:1] * 3 + CONTROLLERS)
    if kind <= 3:
        return ReportTelemetry(
            **base,
            measured_at=now - timedelta(minutes=draw(st.integers(0, 20))),
            soc=draw(st.floats(0, 1)),
            battery_temp_c=draw(st.floats(-10, 40) | st.floats(-10, 90)),
            soh=draw(st.floats(0.9, 1) | st.floats(0.5, 1)),
        )
    if kind <= 11:
        return RequestSetpoint(
            **base,
            controller_id=draw(controllers),
            power_kw=draw(st.sampled_from([0.0, -1000.0, 1000.0]) | st.floats(-60, 60)),
            valid_until=draw(minutes),
        )
    if kind == 12:
        lease_minutes = draw(st.integers(1, 24 * 60))
        return GrantControl(
            **base,
            controller_id=draw(controllers),
            lease_until=now + timedelta(minutes=lease_minutes),
        )
    if kind == 16:
        return ReleaseControl(**base, controller_id=draw(st.sampled_from(CONTROLLERS)))
    if kind == 13:
        return PlanTrip(
            **base,
            departure_at=draw(minutes),
            energy_needed_kwh=draw(st.floats(0, 1)) * capacity_kwh,
        )
    if kind == 17:
        return draw(st.sampled_from([CancelTrip(**base), Unplug(**base)]))
    if kind == 14:
        return PlugIn(
            **base,
            charger_id=draw(st.sampled_from(["cp-1", "cp-2"])),
            charger_max_charge_kw=draw(st.sampled_from([0.0, 7.4, 22.0])),
            charger_max_discharge_kw=draw(st.sampled_from([0.0, 7.4, 22.0])),
        )
    if kind == 15:
        start = now - timedelta(minutes=draw(st.integers(1, 30)))
        return RecordEnergy(
            **base,
            interval_start=start,
            interval_end=start + timedelta(minutes=draw(st.integers(1, 30))),
            charged_kwh=draw(st.floats(0, 5)),
            discharged_kwh=draw(st.floats(0, 5)),
        )
    return EnforceSafeState(**base, reason="watchdog")


@dataclass
class WorstCase:
    """An independent model of the lowest SoC the accepted setpoints allow."""

    capacity_kwh: float
    floor_kwh: float
    discharge_efficiency: float
    soc: float | None = None
    measured_at: datetime = T0
    trip_kwh: float = 0.0
    trip_departure: datetime = T0
    # Discharges since the reading: (start, end, power_kw); the active one has end None.
    periods: list[tuple[datetime, datetime | None, float, datetime]] = field(default_factory=list)
    active_controller: str | None = None

    def _end_active(self, at: datetime) -> None:
        if self.periods and self.periods[-1][1] is None:
            start, _, power_kw, valid_until = self.periods[-1]
            self.periods[-1] = (start, at, power_kw, valid_until)
        self.active_controller = None

    def _start(self, at: datetime, power_kw: float, valid_until: datetime, who: str) -> None:
        self.periods.append((at, None, power_kw, valid_until))
        self.active_controller = who

    def drained_kwh(self, until: datetime) -> float:
        total = 0.0
        for start, end, power_kw, valid_until in self.periods:
            if power_kw >= 0:
                continue
            stop = min(end or until, valid_until, until)
            hours = _hours(max(start, self.measured_at), stop)
            total += -power_kw * hours / self.discharge_efficiency
        return total

    def check(self, event: VehicleSetpointAccepted) -> None:
        if event.power_kw >= 0:
            return
        assert self.soc is not None, "discharge accepted without any reading"
        reserve_kwh = max(self.floor_kwh, self.trip_kwh)
        planned_kwh = (
            self.soc * self.capacity_kwh
            - self.drained_kwh(event.at)
            + event.power_kw * _hours(event.at, event.valid_until) / self.discharge_efficiency
        )
        assert planned_kwh >= reserve_kwh - 1e-9, (planned_kwh, reserve_kwh, event)

    def apply(self, event: Event) -> None:
        match event:
            case VehicleTelemetryReported():
                self.soc, self.measured_at = event.soc, event.measured_at
            case VehicleSetpointAccepted():
                self.check(event)
                self._end_active(event.at)
                self._start(event.at, event.power_kw, event.valid_until, event.controller_id)
            case VehicleSetpointCurtailed():
                valid_until = self.periods[-1][3]
                self._end_active(event.at)
                self._start(event.at, event.power_kw, valid_until, event.controller_id)
            case VehicleSetpointRejected() if event.controller_id == self.active_controller:
                self._end_active(event.at)
            case VehicleControlGranted() if event.controller_id != self.active_controller:
                self._end_active(event.at)
            case (
                VehicleControlReleased()
                | VehicleSafeStateEntered()
                | VehiclePluggedIn()
                | VehicleUnplugged()
            ):
                self._end_active(event.at)
                if isinstance(event, VehiclePluggedIn) and self.trip_departure <= event.at:
                    self.trip_kwh = 0.0
            case VehicleTripPlanned():
                self.trip_kwh, self.trip_departure = event.energy_needed_kwh, event.departure_at
            case VehicleTripCancelled():
                self.trip_kwh = 0.0
            case _:
                pass


def _base() -> dict[str, Any]:
    return {"command_id": "setup", "issued_at": T0, "vehicle_id": VID}


def _run(data: st.DataObject, check: bool) -> None:
    register = data.draw(registrations())
    (registered,) = decide(register, VEHICLE.initial_state(VID))
    assert isinstance(registered, VehicleRegistered)
    state: VehicleState = evolve(VEHICLE.initial_state(VID), registered)
    model = WorstCase(
        capacity_kwh=register.battery_capacity_kwh,
        floor_kwh=register.soc_floor * register.battery_capacity_kwh,
        discharge_efficiency=register.discharge_efficiency,
    )
    now = T0
    # Most runs start ready to discharge, so the rules that matter are reached.
    setup: list[Any] = []
    if data.draw(st.integers(0, 9)) > 0:
        setup = [
            PlugIn(
                **_base(), charger_id="cp-1", charger_max_charge_kw=22, charger_max_discharge_kw=22
            ),
            ReportTelemetry(
                **_base(), measured_at=T0, soc=data.draw(st.floats(0, 1)), battery_temp_c=25, soh=1
            ),
            GrantControl(
                **_base(), controller_id=CONTROLLERS[0], lease_until=T0 + timedelta(hours=24)
            ),
        ]
    for cmd in setup:
        for event in decide(cmd, state):
            state = evolve(state, event)
            if check:
                model.apply(event)
    for n in range(data.draw(st.integers(1, 30))):
        now += timedelta(minutes=data.draw(st.sampled_from([0, 0, 1, 5, 30, 120])))
        cmd = _command(data.draw, now, n, register.battery_capacity_kwh)
        try:
            events = decide(cmd, state)
        except CommandRejected:
            continue
        for event in events:
            state = evolve(state, event)
            if check:
                model.apply(event)
            else:
                _same_as_validated(event, state)
        assert decide(cmd, state) == [], f"{type(cmd).__name__} decided twice adds events"


def _same_as_validated(event: Event, state: VehicleState) -> None:
    """Events and states built without validation (the hot path) equal validated ones,
    down to the JSON that is stored and hashed."""
    again = type(event).model_validate(event.model_dump())
    assert again == event and again.model_dump_json() == event.model_dump_json()
    rebuilt = VehicleState.model_validate(state.model_dump())
    assert rebuilt == state and rebuilt.model_dump_json() == state.model_dump_json()


@SETTINGS
@given(st.data())
def test_deciding_a_command_again_after_its_events_adds_nothing(data: st.DataObject) -> None:
    _run(data, check=False)


@SETTINGS
@given(st.data())
def test_no_accepted_discharge_plans_below_the_reserve(data: st.DataObject) -> None:
    _run(data, check=True)
