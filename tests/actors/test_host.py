"""The generic host, without Ray: decide → append → evolve, idempotent, restartable."""

from __future__ import annotations

import json

import pytest

from actors.host import EntityHost, Shard
from events.log import EventLog
from tests.actors.counter import COUNTER, Add, OpenCounter
from tests.events.conftest import T0


def cmd(cls, command_id, **fields):
    return cls(command_id=command_id, issued_at=T0, **fields)


@pytest.fixture
def log(tmp_path):
    with EventLog(str(tmp_path / "log"), partitions=2) as log:
        yield log


def test_commands_become_events_and_state(log):
    host = EntityHost(COUNTER, log)
    results = host.handle(
        [
            cmd(OpenCounter, "c1", counter_id="a"),
            cmd(Add, "c2", counter_id="a", amount=5),
            cmd(Add, "c3", counter_id="a", amount=2),
        ]
    )
    assert [r.status for r in results] == ["recorded"] * 3
    assert results[2].event_types == ("Added",)
    assert host.state("a").total == 7
    assert [e.stream_version for e in log.read_stream("counter-a")] == [1, 2, 3]


def test_a_repeated_command_gets_the_first_answer_and_no_new_event(log):
    host = EntityHost(COUNTER, log)
    host.handle([cmd(OpenCounter, "c1", counter_id="a")])
    [first] = host.handle([cmd(Add, "c2", counter_id="a", amount=5)])
    [again] = host.handle([cmd(Add, "c2", counter_id="a", amount=5)])

    assert again.duplicate and again.positions == first.positions
    assert again.event_types == ("Added",)
    assert host.state("a").total == 5
    assert log.read_all().num_rows == 2


def test_invalid_and_unknown_are_rejected_with_a_reason_and_change_nothing(log):
    host = EntityHost(COUNTER, log)
    host.handle([cmd(OpenCounter, "c1", counter_id="a")])
    results = host.handle(
        [
            cmd(Add, "c2", counter_id="zzz", amount=1),
            cmd(Add, "c3", counter_id="a", amount=-5),
        ]
    )
    assert [r.status for r in results] == ["rejected", "rejected"]
    assert "unknown counter 'zzz'" in results[0].reason
    assert "below zero" in results[1].reason
    assert log.read_all().num_rows == 1


def test_a_command_that_asks_for_what_already_is_changes_nothing(log):
    host = EntityHost(COUNTER, log)
    host.handle([cmd(OpenCounter, "c1", counter_id="a")])
    [again] = host.handle([cmd(OpenCounter, "c2", counter_id="a")])
    assert again.status == "unchanged"
    assert log.read_all().num_rows == 1


def test_a_restarted_host_replays_the_log_and_continues(log, tmp_path):
    host = EntityHost(COUNTER, log)
    host.handle([cmd(OpenCounter, "c1", counter_id="a"), cmd(Add, "c2", counter_id="a", amount=3)])

    restarted = EntityHost(COUNTER, log)
    assert restarted.state("a").total == 3
    [again] = restarted.handle([cmd(Add, "c2", counter_id="a", amount=3)])
    assert again.duplicate
    [more] = restarted.handle([cmd(Add, "c3", counter_id="a", amount=4)])
    assert more.status == "recorded" and restarted.state("a").total == 7


def test_a_snapshot_restores_the_same_state(log, tmp_path):
    snaps = str(tmp_path / "snapshots")
    host = EntityHost(COUNTER, log, snapshot_dir=snaps)
    host.handle([cmd(OpenCounter, "c1", counter_id="a"), cmd(Add, "c2", counter_id="a", amount=3)])
    host.snapshot()
    host.handle([cmd(Add, "c3", counter_id="a", amount=4)])

    restored = EntityHost(COUNTER, log, snapshot_dir=snaps)
    assert restored.state("a").total == 7
    assert restored.position == host.position


def test_two_hosts_for_one_stream_cannot_interleave(log):
    one = EntityHost(COUNTER, log)
    one.handle([cmd(OpenCounter, "c1", counter_id="a")])
    two = EntityHost(COUNTER, log)  # a second controller with the same view
    one.handle([cmd(Add, "c2", counter_id="a", amount=1)])

    [late] = two.handle([cmd(Add, "c3", counter_id="a", amount=1)])
    assert late.status == "rejected" and "another writer got there first" in late.reason
    assert two.state("a").total == 1  # it reloaded the stream
    [retry] = two.handle([cmd(Add, "c4", counter_id="a", amount=1)])
    assert retry.status == "recorded" and two.state("a").total == 2


def test_a_host_refuses_commands_for_another_shard(log):
    hosts = [EntityHost(COUNTER, log, shard=Shard(i, 2)) for i in range(2)]
    command = cmd(OpenCounter, "c1", counter_id="a")
    answers = [h.handle([command])[0] for h in hosts]
    assert sorted(a.status for a in answers) == ["recorded", "rejected"]
    assert "belongs to shard" in next(a.reason for a in answers if a.status == "rejected")


def test_a_host_snapshots_by_itself_every_n_events(log, tmp_path):
    snaps = tmp_path / "snapshots"
    host = EntityHost(COUNTER, log, snapshot_dir=str(snaps), snapshot_every=3)
    host.handle([cmd(OpenCounter, "c1", counter_id="a"), cmd(Add, "c2", counter_id="a", amount=1)])
    assert not snaps.exists()
    host.handle([cmd(Add, "c3", counter_id="a", amount=1)])
    host.wait_for_snapshot()  # written in the background
    assert (snaps / "counter-0-of-1.json").exists()
    host.handle([cmd(Add, "c4", counter_id="a", amount=1)])

    restored = EntityHost(COUNTER, log, snapshot_dir=str(snaps))
    assert restored.state("a").total == 3  # the snapshot plus the one event after it


def test_a_background_snapshot_holds_the_states_of_the_batch_that_took_it(log, tmp_path):
    snaps = tmp_path / "snapshots"
    host = EntityHost(COUNTER, log, snapshot_dir=str(snaps), snapshot_every=3)
    host.handle([cmd(OpenCounter, "c1", counter_id="a"), cmd(Add, "c2", counter_id="a", amount=1)])
    set_idle = host._idle.set
    host._idle.set = lambda: None  # as if the next batch were still being handled
    host.handle([cmd(Add, "c3", counter_id="a", amount=1)])  # crosses snapshot_every
    taken_at = host.position
    host.handle([cmd(Add, "c4", counter_id="a", amount=5)])  # while the writer waits
    assert not snaps.exists()  # nothing serialized while a batch is in flight
    host._idle.set = set_idle
    host._idle.set()
    host.wait_for_snapshot()

    header, row = (snaps / "counter-0-of-1.json").read_text().splitlines()
    assert json.loads(header)["position"] == taken_at
    assert json.loads(row)["v"] == 3 and json.loads(row)["state"]["total"] == 2
    restored = EntityHost(COUNTER, log, snapshot_dir=str(snaps))
    assert restored.state("a") == host.state("a") and restored.state("a").total == 7


def test_a_repeat_in_a_batch_with_new_work_on_its_stream_answers_both(log):
    EntityHost(COUNTER, log).handle(
        [cmd(OpenCounter, "c1", counter_id="a"), cmd(Add, "c2", counter_id="a", amount=1)]
    )
    restarted = EntityHost(COUNTER, log)  # knows c2 only as an event, not as a command id
    repeat, new = restarted.handle(
        [cmd(Add, "c2", counter_id="a", amount=1), cmd(Add, "c3", counter_id="a", amount=5)]
    )
    assert repeat.duplicate and repeat.event_types == ("Added",)
    assert new.status == "recorded" and not new.duplicate
    assert restarted.state("a").total == 6
    assert [e.command_id for e in log.read_stream("counter-a")] == ["c1", "c2", "c3"]


def test_a_batch_of_results_crosses_a_process_boundary_as_a_plain_list(log):
    import pickle

    import ray.cloudpickle

    host = EntityHost(COUNTER, log)
    results = host.handle(
        [
            cmd(OpenCounter, "c1", counter_id="a"),
            cmd(Add, "c2", counter_id="a", amount=5),
            cmd(Add, "c3", counter_id="zzz", amount=1),
            cmd(OpenCounter, "c4", counter_id="a"),
        ]
    )
    assert [r.status for r in results] == ["recorded", "recorded", "rejected", "unchanged"]
    for dumps in (pickle.dumps, ray.cloudpickle.dumps):
        arrived = pickle.loads(dumps(results))
        assert type(arrived) is list and arrived == list(results)


def test_results_built_through_their_slots_equal_constructed_ones(log):
    # The host and the unpickler fill CommandResult's slots without its __init__:
    # each field must be set, to the value the constructor would give, and stay frozen.
    import dataclasses
    import pickle

    from actors.decider import CommandResult

    host = EntityHost(COUNTER, log)
    host.handle([cmd(OpenCounter, "c1", counter_id="a")])
    results = host.handle(
        [
            cmd(Add, "c2", counter_id="a", amount=5),
            cmd(OpenCounter, "c1", counter_id="a"),  # a repeat: its first answer
            cmd(Add, "c3", counter_id="zzz", amount=1),
        ]
    )
    expected = [
        CommandResult(
            command_id="c2",
            stream_id="counter-a",
            status="recorded",
            positions=results[0].positions,
            event_types=("Added",),
        ),
        CommandResult(
            command_id="c1",
            stream_id="counter-a",
            status="recorded",
            positions=results[1].positions,
            event_types=("CounterOpened",),
            duplicate=True,
        ),
        CommandResult(
            command_id="c3",
            stream_id="counter-zzz",
            status="rejected",
            reason=results[2].reason,
        ),
    ]
    assert results == expected and results[2].reason
    for arrived in (results, pickle.loads(pickle.dumps(results))):
        assert [dataclasses.astuple(r) for r in arrived] == [
            dataclasses.astuple(r) for r in expected
        ]
        assert [hash(r) for r in arrived] == [hash(r) for r in expected]
        with pytest.raises(dataclasses.FrozenInstanceError):
            arrived[0].status = "rejected"  # type: ignore[misc]


def test_vehicle_states_snapshot_and_replay_to_the_same_states(log, tmp_path):
    # Vehicle states are built without validation on the hot path; a snapshot of
    # them must load (validated) into the same states a full replay gives.
    from datetime import timedelta

    from actors.vehicle import VEHICLE, PlugIn, RegisterVehicle, ReportTelemetry

    snaps = str(tmp_path / "snapshots")
    host = EntityHost(VEHICLE, log, snapshot_dir=snaps)
    for v in range(3):
        host.handle(
            [
                cmd(
                    RegisterVehicle,
                    f"r{v}",
                    vehicle_id=f"v{v}",
                    model="Volkswagen ID.4",
                    site_id="depot",
                ),
                cmd(
                    PlugIn,
                    f"p{v}",
                    vehicle_id=f"v{v}",
                    charger_id=f"cp{v}",
                    charger_max_charge_kw=11,
                    charger_max_discharge_kw=11,
                ),
            ]
        )
    readings = [
        cmd(
            ReportTelemetry,
            f"t{v}-{k}",
            vehicle_id=f"v{v}",
            measured_at=T0 + timedelta(minutes=k),
            soc=0.5 + k / 100,
            battery_temp_c=25,
            soh=0.97,
        )
        for k in range(1, 4)
        for v in range(3)
    ]
    host.handle(readings[:3])
    host.snapshot()
    host.handle(readings[3:])

    from_snapshot = EntityHost(VEHICLE, log, snapshot_dir=snaps)
    replayed = EntityHost(VEHICLE, log)
    for v in range(3):
        state = host.state(f"v{v}")
        assert from_snapshot.state(f"v{v}") == state == replayed.state(f"v{v}")
        assert state.reading is not None and state.reading.soc == 0.53
