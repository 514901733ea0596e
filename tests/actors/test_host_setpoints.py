"""A shard's setpoints as one columnar batch: the same commands, decisions and answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

import pytest
from pydantic import ValidationError

from actors.host import EntityHost
from actors.vehicle import (
    VEHICLE,
    GrantControl,
    PlugIn,
    RegisterVehicle,
    ReportTelemetry,
    RequestSetpoint,
    RequestSetpoints,
)
from events.log import EventLog
from tests.events.conftest import T0

VALID_UNTIL = T0 + timedelta(minutes=15)
SOCS = [0.9, 0.6, 0.21]  # the last one has almost nothing above its 20 % floor


def fleet(host: EntityHost) -> None:
    setup: list = []
    for i, soc in enumerate(SOCS):
        vid = f"ev{i}"
        setup += [
            RegisterVehicle(
                command_id=f"r{i}",
                issued_at=T0,
                vehicle_id=vid,
                model="Volkswagen ID.4",
                site_id="depot",
            ),
            PlugIn(
                command_id=f"p{i}",
                issued_at=T0,
                vehicle_id=vid,
                charger_id=f"cp{i}",
                charger_max_charge_kw=11,
                charger_max_discharge_kw=11,
            ),
            ReportTelemetry(
                command_id=f"t{i}",
                issued_at=T0,
                vehicle_id=vid,
                measured_at=T0,
                soc=soc,
                battery_temp_c=25,
                soh=0.95,
            ),
        ]
    setup += [
        GrantControl(
            command_id="g0",
            issued_at=T0,
            vehicle_id="ev0",
            controller_id="dispatch-x",
            lease_until=T0 + timedelta(hours=1),
        ),
        GrantControl(
            command_id="g2",
            issued_at=T0,
            vehicle_id="ev2",
            controller_id="dispatch-x",
            lease_until=T0 + timedelta(hours=1),
        ),
    ]  # ev1 gives no lease: its setpoint must be refused
    assert all(r.status == "recorded" for r in host.handle(setup))


def setpoints(seq: int, power_kw: list[float]) -> list[RequestSetpoint]:
    return [
        RequestSetpoint(
            command_id=f"dispatch-x:{seq}:ev{i}",
            issued_at=T0 + timedelta(seconds=seq),
            vehicle_id=f"ev{i}",
            controller_id="dispatch-x",
            power_kw=p,
            valid_until=VALID_UNTIL,
        )
        for i, p in enumerate(power_kw)
    ]


@contextmanager
def paired_hosts(tmp_path, build: Callable[[EntityHost], None]):
    """Two vehicle hosts, each on a log of its own, built alike: one is sent commands
    one by one, the other the same commands as a columnar batch."""
    with (
        EventLog(str(tmp_path / "one"), partitions=2) as one,
        EventLog(str(tmp_path / "batch"), partitions=2) as batched,
    ):
        by_one, by_batch = EntityHost(VEHICLE, one), EntityHost(VEHICLE, batched)
        build(by_one)
        build(by_batch)
        yield by_one, by_batch


@pytest.fixture
def hosts(tmp_path):
    with paired_hosts(tmp_path, fleet) as pair:
        yield pair


def test_a_batch_expands_into_the_validated_commands():
    commands = setpoints(1, [-11.0, 3.5, -2.0])
    batch = RequestSetpoints.of(commands)
    assert batch is not None and batch.command_id_prefix == "dispatch-x:1:"
    assert batch.commands() == commands
    validated = RequestSetpoints(**dict(batch))
    assert validated == batch and validated.commands() == commands


def test_a_shards_share_of_a_batch_is_the_batch_of_those_commands():
    commands = setpoints(2, [-11.0, 3.5, -2.0])
    batch = RequestSetpoints.of(commands)
    assert batch is not None and batch.command_type is RequestSetpoint
    assert batch.stream_ids() == [c.stream_id for c in commands]
    share = batch.take([2, 0])
    assert share.commands() == [commands[2], commands[0]]
    assert len(share) == 2 and len(batch) == 3  # the batch itself is unchanged


def test_the_vehicles_judge_a_batch_exactly_as_single_commands(hosts):
    by_one, by_batch = hosts
    commands = setpoints(1, [-11.0, -11.0, -11.0])
    one = by_one.handle(commands)
    batched = by_batch.handle(RequestSetpoints.of(commands))

    assert [(r.command_id, r.status, r.event_types) for r in batched] == [
        (r.command_id, r.status, r.event_types) for r in one
    ]
    assert batched[1].event_types == ("VehicleSetpointRejected",)  # no lease
    ev2 = by_batch.state("ev2").setpoint  # clamped to what lies above the reserve
    assert ev2 is not None and -11 < ev2.power_kw < 0 and "soc_reserve" in ev2.limited_by
    for i in range(len(SOCS)):
        assert by_batch.state(f"ev{i}") == by_one.state(f"ev{i}")
    payloads = [
        json.loads(p)
        for p in by_batch.log.read_all(columns=["payload"]).column("payload").to_pylist()[-3:]
    ]
    assert payloads == [
        json.loads(p)
        for p in by_one.log.read_all(columns=["payload"]).column("payload").to_pylist()[-3:]
    ]


def test_a_repeated_batch_gets_the_first_answers_and_writes_nothing(hosts):
    _, host = hosts
    batch = RequestSetpoints.of(setpoints(1, [-5.0, 2.0, -1.0]))
    first = host.handle(batch)
    rows = host.log.read_all().num_rows
    again = host.handle(batch)

    assert [r.positions for r in again] == [r.positions for r in first]
    assert all(r.duplicate for r in again if r.status == "recorded")
    assert host.log.read_all().num_rows == rows


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"power_kw": (-5.0, 2000.0)}, "power_kw.1"),
        ({"vehicle_ids": ("ev0", "bad id")}, "vehicle_ids.1"),
        ({"power_kw": (-5.0,)}, "power_kw values"),
        ({"command_id_prefix": "x\n"}, "command_id_prefix"),
    ],
)
def test_an_invalid_batch_is_refused_naming_the_field(change, field):
    fields = {
        "command_id_prefix": "dispatch-x:1:",
        "issued_at": T0,
        "controller_id": "dispatch-x",
        "valid_until": VALID_UNTIL,
        "vehicle_ids": ("ev0", "ev1"),
        "power_kw": (-5.0, 2.0),
    }
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        RequestSetpoints(**(fields | change))


def test_commands_that_do_not_share_a_batch_are_not_packed():
    commands = setpoints(1, [-5.0, 2.0])
    other_time = commands[1].model_copy(update={"valid_until": VALID_UNTIL + timedelta(1)})
    other_id = commands[1].model_copy(update={"command_id": "elsewhere"})
    assert RequestSetpoints.of([commands[0], other_time]) is None
    assert RequestSetpoints.of([commands[0], other_id]) is None
    assert RequestSetpoints.of([]) is None
