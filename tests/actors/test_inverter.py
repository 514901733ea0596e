"""The inverter decider: given events, when a command, then events (no Ray, no network)."""

from __future__ import annotations

import itertools
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.decider import CommandRejected, UnknownEntity
from actors.inverter import (
    INVERTER,
    InverterState,
    RecordInverterFault,
    RecordInverterMeasurement,
    RecordSetpointConfirmed,
    RecordSetpointMismatch,
    RegisterInverter,
    RequestInverterSetpoint,
)
from events.base import Event
from events.inverter import (
    InverterFaulted,
    InverterMeasured,
    InverterRegistered,
    InverterSafeStateEntered,
    InverterSafeStateLeft,
    InverterSetpointAccepted,
    InverterSetpointConfirmed,
    InverterSetpointDerated,
    InverterSetpointRefused,
)

T0 = datetime(2026, 11, 29, 17, 0, tzinfo=UTC)
_ids = itertools.count()


def envelope(at: datetime = T0) -> dict[str, Any]:
    return {"inverter_id": "inv-1", "command_id": f"cmd-{next(_ids)}", "issued_at": at}


def registered(**overrides: Any) -> InverterRegistered:
    fields = {
        "inverter_id": "inv-1",
        "site_id": "site-a",
        "rated_power_kw": 10.0,
        "derate_above_c": 65.0,
        "safe_state_above_c": 85.0,
    }
    fields.update(overrides)
    return InverterRegistered(**fields)


def measured(temperature_c: float, seconds: int = 0) -> InverterMeasured:
    return InverterMeasured(
        inverter_id="inv-1",
        measured_at=T0 + timedelta(seconds=seconds),
        active_power_kw=0.0,
        dc_voltage_v=400.0,
        temperature_c=temperature_c,
        status=4,
        fault_code=0,
    )


def measure(temperature_c: float, seconds: int) -> RecordInverterMeasurement:
    return RecordInverterMeasurement(
        **envelope(T0 + timedelta(seconds=seconds)),
        measured_at=T0 + timedelta(seconds=seconds),
        active_power_kw=0.0,
        dc_voltage_v=400.0,
        temperature_c=temperature_c,
        status=4,
        fault_code=0,
    )


def given_events(*events: Event) -> InverterState:
    return INVERTER.fold("inv-1", events)


def when(state: InverterState, command: Any) -> list[Event]:
    return INVERTER.decide(command, state)


def test_registering_an_inverter() -> None:
    command = RegisterInverter(**envelope(), site_id="site-a", rated_power_kw=10.0)
    assert command.stream_id == "inverter-inv-1" == INVERTER.stream_id("inv-1")
    assert when(given_events(), command) == [registered()]
    assert when(given_events(registered()), command) == []  # same again: nothing new
    with pytest.raises(CommandRejected, match="already registered"):
        when(
            given_events(registered()),
            RegisterInverter(**envelope(), site_id="site-a", rated_power_kw=22.0),
        )


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="derate_above_c must be below"):
        RegisterInverter(**envelope(), site_id="s", rated_power_kw=5, derate_above_c=90)


def test_an_unregistered_inverter_is_an_unknown_entity() -> None:
    with pytest.raises(UnknownEntity, match="not registered"):
        when(given_events(), RequestInverterSetpoint(**envelope(), power_kw=5.0))


def test_a_setpoint_within_the_rating_is_accepted_as_asked() -> None:
    events = when(given_events(registered()), RequestInverterSetpoint(**envelope(), power_kw=-7.0))
    assert events == [
        InverterSetpointAccepted(
            inverter_id="inv-1",
            requested_power_kw=-7.0,
            power_kw=-7.0,
            temperature_c=None,
            reason="",
        )
    ]


def test_a_setpoint_above_the_rating_is_clamped_and_explained() -> None:
    [event] = when(given_events(registered()), RequestInverterSetpoint(**envelope(), power_kw=-14))
    assert isinstance(event, InverterSetpointAccepted)
    assert event.power_kw == -10.0  # still discharging, at the rating
    assert "clamped to the rating of 10.0 kW" in event.reason


def test_a_hot_inverter_is_derated_linearly() -> None:
    state = given_events(registered(), measured(75.0))  # halfway from 65 to 85 °C
    [event] = when(state, RequestInverterSetpoint(**envelope(), power_kw=8.0))
    assert isinstance(event, InverterSetpointAccepted)
    assert event.power_kw == 5.0
    assert "derated to 5.0 kW at 75.0 °C" in event.reason


def test_a_measurement_above_the_derate_threshold_derates_the_running_setpoint() -> None:
    state = given_events(
        registered(),
        InverterSetpointAccepted(
            inverter_id="inv-1", requested_power_kw=-9, power_kw=-9, temperature_c=None, reason=""
        ),
    )
    events = when(state, measure(80.0, seconds=1))
    assert isinstance(events[0], InverterMeasured)
    assert isinstance(events[1], InverterSetpointDerated)
    assert events[1].power_kw == -2.5


def test_over_temperature_enters_the_safe_state_and_refuses_setpoints() -> None:
    state = given_events(registered())
    events = when(state, measure(90.0, seconds=1))
    assert isinstance(events[1], InverterSafeStateEntered)
    state = given_events(registered(), *events)
    assert state.safe_state and state.setpoint_kw == 0.0

    request = RequestInverterSetpoint(**envelope(), power_kw=3.0)
    [refused] = when(state, request)
    assert isinstance(refused, InverterSetpointRefused)
    assert "safe state" in refused.reason
    state = INVERTER.evolve(state, refused)
    assert when(state, request) == []  # the same refusal is not news

    still_warm = when(state, measure(70.0, seconds=2))
    assert [type(e) for e in still_warm] == [InverterMeasured]  # hysteresis: stays safe
    cooled = when(state, measure(60.0, seconds=3))
    assert isinstance(cooled[1], InverterSafeStateLeft)


def test_a_repeated_or_late_sample_changes_nothing() -> None:
    state = given_events(registered(), measured(30.0, seconds=10))
    assert when(state, measure(30.0, seconds=10)) == []
    assert when(state, measure(31.0, seconds=5)) == []


def test_faults_and_readbacks_are_recorded() -> None:
    state = given_events(registered())
    fault = RecordInverterFault(
        **envelope(), fault_kind="modbus_exception", detail="0x03", exception_code=3, retry_count=0
    )
    [faulted] = when(state, fault)
    assert isinstance(faulted, InverterFaulted) and faulted.exception_code == 3
    assert INVERTER.evolve(state, faulted).fault_count == 1

    [confirmed] = when(state, RecordSetpointConfirmed(**envelope(), power_kw=-7.5))
    assert isinstance(confirmed, InverterSetpointConfirmed)
    assert (
        when(
            INVERTER.evolve(state, confirmed), RecordSetpointConfirmed(**envelope(), power_kw=-7.5)
        )
        == []
    )


def test_the_decider_imports_no_runtime_or_protocol() -> None:
    module = sys.modules[INVERTER.decide.__module__]
    imported = {name.split(".")[0] for name in vars(module) if not name.startswith("__")}
    for forbidden in ("ray", "pymodbus", "aiomqtt", "duckdb", "time", "socket"):
        assert forbidden not in imported
    source = Path(module.__file__ or "").read_text(encoding="utf-8")
    for forbidden in ("import ray", "pymodbus", "aiomqtt", "datetime.now", "time.time"):
        assert forbidden not in source


# --- property: deciding twice on the evolved state adds nothing ------------------

temperatures = st.floats(min_value=-20, max_value=120, allow_nan=False)
powers = st.floats(min_value=-40, max_value=40, allow_nan=False)


@st.composite
def commands(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["setpoint", "measure", "fault", "confirm", "mismatch"]))
    seconds = draw(st.integers(min_value=0, max_value=100))
    at = T0 + timedelta(seconds=seconds)
    if kind == "setpoint":
        return RequestInverterSetpoint(**envelope(at), power_kw=draw(powers))
    if kind == "measure":
        return measure(draw(temperatures), seconds)
    if kind == "fault":
        return RecordInverterFault(
            **envelope(at),
            fault_kind=draw(st.sampled_from(["modbus_exception", "timeout", "connection_lost"])),
            detail="x",
            retry_count=draw(st.integers(min_value=0, max_value=5)),
        )
    if kind == "confirm":
        return RecordSetpointConfirmed(**envelope(at), power_kw=draw(powers))
    return RecordSetpointMismatch(
        **envelope(at), expected_power_kw=draw(powers), read_back_power_kw=draw(powers)
    )


@settings(max_examples=300, deadline=None)
@given(history=st.lists(commands(), max_size=8), command=commands())
def test_deciding_twice_on_the_evolved_state_adds_nothing(history: list[Any], command: Any) -> None:
    state = given_events(registered())
    for earlier in history:
        for event in INVERTER.decide(earlier, state):
            state = INVERTER.evolve(state, event)
    for event in INVERTER.decide(command, state):
        state = INVERTER.evolve(state, event)
    assert INVERTER.decide(command, state) == []
    assert abs(state.setpoint_kw) <= state.rated_power_kw
