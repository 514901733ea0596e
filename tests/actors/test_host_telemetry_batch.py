"""Readings as one columnar batch: the same events, states and answers as commands.

The host judges a `ReportTelemetryBatch` with the vehicle's columnar twin and
leaves the rows the twin does not judge to `decide`. Whatever the path, the log must
hold the same bytes and the vehicles the same states as when each reading is sent
as its own `ReportTelemetry`.
"""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from actors.host import EntityHost
from actors.vehicle import (
    VEHICLE,
    ReportTelemetry,
    ReportTelemetryBatch,
    RequestSetpoint,
    VehicleState,
    decide,
    evolve,
)
from tests.actors.test_host_setpoints import fleet as setpoint_fleet
from tests.actors.test_host_setpoints import paired_hosts
from tests.actors.test_vehicle_properties import _command, registrations
from tests.events.conftest import T0

LATER = T0 + timedelta(minutes=5)


def reading(i: int, vehicle_id: str, *, at: datetime = LATER, **values: Any) -> ReportTelemetry:
    fields: dict[str, Any] = {"soc": 0.6, "battery_temp_c": 25.0, "soh": 0.95} | values
    return ReportTelemetry(
        command_id=f"tel-{i}",
        issued_at=at,
        vehicle_id=vehicle_id,
        measured_at=fields.pop("measured_at", at),
        **fields,
    )


def fleet(host: EntityHost) -> None:
    """The setpoint tests' three vehicles; then ev0 discharges under dispatch-x's lease,
    ev1 stays idle (no lease), and ev2 reports a reading an hour later."""
    setpoint_fleet(host)
    later = [
        RequestSetpoint(
            command_id="s0",
            issued_at=T0,
            vehicle_id="ev0",
            controller_id="dispatch-x",
            power_kw=-11.0,
            valid_until=T0 + timedelta(minutes=30),
        ),
        reading(103, "ev2", at=T0 + timedelta(hours=1), soc=0.7),
    ]
    assert all(r.status == "recorded" for r in host.handle(later))


@pytest.fixture
def hosts(tmp_path):
    with paired_hosts(tmp_path, fleet) as pair:
        yield pair


def logged(host: EntityHost) -> list[tuple[str, int, str, str]]:
    table = host.log.read_all(columns=["stream_id", "stream_version", "type", "payload"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))


def test_a_batch_of_readings_is_recorded_exactly_as_the_readings_one_by_one(hosts):
    by_one, by_batch = hosts
    readings = [
        reading(1, "ev1", soc=0.55, battery_temp_c=-0.0, soh=1),  # the twin judges it
        reading(2, "ev0", soc=0.21, battery_temp_c=70.0),  # discharging: `decide` curtails
        reading(3, "ev2", soc=0.9),  # older than ev2's last reading: unchanged
        reading(4, "nobody"),  # never registered: rejected
        reading(5, "ev3", soc=0.00001, battery_temp_c=31.5),  # unknown too
    ]
    one = by_one.handle(readings)
    batch = ReportTelemetryBatch.of(readings)
    assert batch is not None
    decided: list[str] = []

    def spy(command: Any, state: VehicleState) -> list:
        decided.append(command.command_id)
        return decide(command, state)

    by_batch.decider = dataclasses.replace(VEHICLE, decide=spy)
    batched = by_batch.handle(batch)

    # the twin judged ev1's and ev2's readings; decide saw only the rest
    assert decided == ["tel-2", "tel-4", "tel-5"]
    assert [(r.command_id, r.status, r.event_types, r.reason) for r in batched] == [
        (r.command_id, r.status, r.event_types, r.reason) for r in one
    ]
    statuses = ["recorded", "recorded", "unchanged", "rejected", "rejected"]
    assert [r.status for r in batched] == statuses
    assert batched[1].event_types == ("VehicleTelemetryReported", "VehicleSetpointCurtailed")
    assert logged(by_batch) == logged(by_one)  # the same payload bytes, in the same order
    for vid in ("ev0", "ev1", "ev2"):
        assert by_batch.state(vid) == by_one.state(vid)


def test_a_repeated_batch_gets_the_first_answers_and_writes_nothing(hosts):
    _, host = hosts
    batch = ReportTelemetryBatch.of([reading(1, "ev0"), reading(2, "ev1"), reading(3, "ev2")])
    assert batch is not None
    first = host.handle(batch)
    rows = host.log.read_all().num_rows
    again = host.handle(batch)

    assert [(r.status, r.positions) for r in again] == [(r.status, r.positions) for r in first]
    assert [r.duplicate for r in again] == [True, True, False]  # ev2's was unchanged
    assert host.log.read_all().num_rows == rows


def test_two_readings_of_one_vehicle_in_a_batch_are_decided_in_order(hosts):
    by_one, by_batch = hosts
    readings = [
        reading(1, "ev1", soc=0.5),
        reading(2, "ev1", at=LATER + timedelta(seconds=1), soc=0.49),
        reading(3, "ev1", soc=0.48),  # no newer than the first: unchanged
    ]
    one = by_one.handle(readings)
    batch = ReportTelemetryBatch.of(readings)
    assert batch is not None
    assert [r.status for r in by_batch.handle(batch)] == [r.status for r in one]
    assert by_batch.state("ev1") == by_one.state("ev1")
    assert by_batch.state("ev1").reading.soc == 0.49


def test_a_batch_crosses_a_pickle_as_columns_and_comes_back_equal():
    readings = [reading(1, "ev0"), reading(2, "ev1", at=LATER + timedelta(microseconds=7))]
    batch = ReportTelemetryBatch.of(readings)
    assert batch is not None
    back = pickle.loads(pickle.dumps(batch))
    assert back == batch and back.commands() == readings
    assert batch.take([1]).commands() == [readings[1]]
    assert batch.stream_ids() == ["vehicle-ev0", "vehicle-ev1"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"soc": (0.5, 1.5)}, "soc.1"),
        ({"vehicle_ids": ("ev0", "bad id")}, "vehicle_ids.1"),
        ({"soh": (0.9,)}, "2 command_ids but 1 soh"),
        ({"command_ids": ("a", "b\n")}, "command_ids.1"),
        ({"measured_at": (LATER, datetime(2025, 1, 1))}, "measured_at.1"),
    ],
)
def test_an_invalid_batch_is_refused_naming_the_field(change, field):
    fields = {
        "command_ids": ("a", "b"),
        "issued_at": (LATER, LATER),
        "vehicle_ids": ("ev0", "ev1"),
        "measured_at": (LATER, LATER),
        "soc": (0.5, 0.6),
        "battery_temp_c": (20.0, 21.0),
        "soh": (0.9, 0.9),
    }
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        ReportTelemetryBatch(**(fields | change))


def test_readings_that_do_not_share_a_batch_are_not_packed():
    traced = reading(2, "ev1").model_copy(update={"traceparent": "0" * 55})
    other_source = reading(3, "ev1", source="mqtt")
    assert ReportTelemetryBatch.of([reading(1, "ev0"), traced]) is None
    assert ReportTelemetryBatch.of([reading(1, "ev0"), other_source]) is None
    assert ReportTelemetryBatch.of([]) is None


# ----------------------------------------------------------- the twin and decide


@st.composite
def vehicle_states(draw: st.DrawFn) -> VehicleState | None:
    """A reachable state of `prop-1` (random commands after a random registration),
    the state of a vehicle never registered, or none at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return None
    state = VEHICLE.initial_state("prop-1")
    if kind == 1:
        return state
    registration = draw(registrations())
    state = evolve(state, decide(registration, state)[0])
    now = registration.issued_at
    assert state.spec is not None
    for n in range(draw(st.integers(0, 12))):
        now += timedelta(minutes=draw(st.integers(0, 30)))
        try:
            events = decide(_command(draw, now, n, state.spec.battery_capacity_kwh), state)
        except Exception:
            continue
        for happened in events:
            state = evolve(state, happened)
    return state


TIMES = st.datetimes(
    min_value=datetime(2025, 3, 1), max_value=datetime(2025, 3, 3), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(2025, 3, 1),
    max_value=datetime(2025, 3, 3),
    timezones=st.sampled_from([timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=vehicle_states(),
    issued_at=TIMES,
    measured_at=TIMES,
    soc=st.floats(0, 1) | st.sampled_from([0.0, 1.0, 1e-7, 0.00001, 0.1 + 0.2]),
    temp_c=st.floats(-40, 100) | st.sampled_from([-0.0, 25.0, 1e-5]),
    soh=st.floats(0, 1),
)
def test_the_twin_gives_what_decide_and_evolve_give_for_every_row_it_judges(
    state, issued_at, measured_at, soc, temp_c, soh
):
    command = ReportTelemetry(
        command_id="c",
        issued_at=issued_at,
        vehicle_id="prop-1",
        measured_at=measured_at,
        soc=soc,
        battery_temp_c=temp_c,
        soh=soh,
        source="mqtt",
    )
    batch = ReportTelemetryBatch.of([command])
    assert batch is not None
    decision = VEHICLE.columnar[ReportTelemetryBatch](batch, [state])
    if decision.scalar == [0]:
        event("left to decide")  # allowed for any row, required for the ones below
        return
    assert state is not None and state.spec is not None
    assert state.setpoint is None or state.setpoint.power_kw >= 0
    events = decide(command, state)
    [payload], [after] = decision.payloads, decision.states
    if payload is None:
        event("unchanged")
        assert events == [] and after is None
    else:
        event("judged")
        [reported] = events
        assert reported.model_dump_json() == payload
        assert evolve(state, reported) == after


def test_a_batch_built_without_validation_is_written_by_pydantic_not_by_the_twin(hosts):
    """`model_construct` skips the checks that make a row's JSON plain text: such rows
    go through `decide`, whose event pydantic escapes."""
    _, host = hosts
    batch = ReportTelemetryBatch.model_construct(
        command_ids=("odd-1",),
        issued_at=(LATER,),
        vehicle_ids=('ev1"',),
        measured_at=(LATER,),
        soc=(0.5,),
        battery_temp_c=(20.0,),
        soh=(0.9,),
        source="mqtt",
        correlation_id="",
    )
    idle = host.state("ev1")  # a vehicle whose reading the twin would judge
    decision = VEHICLE.columnar[ReportTelemetryBatch](batch, [idle])
    assert decision.scalar == [0] and decision.payloads == [None]
    odd_source = batch.model_copy(update={"vehicle_ids": ("ev1",), "source": 'x"'})
    decision = VEHICLE.columnar[ReportTelemetryBatch](odd_source, [idle])
    assert decision.scalar == [0] and decision.payloads == [None]
    plain = batch.model_copy(update={"vehicle_ids": ("ev1",)})
    decision = VEHICLE.columnar[ReportTelemetryBatch](plain, [idle])
    assert decision.scalar == [] and decision.payloads[0] is not None
