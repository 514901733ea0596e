"""The host on a real local Ray: commands through the client, and a host killed mid-stream."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import ray

from cluster.client import FleetClient, FleetError
from cluster.runtime import Runtime, RuntimeConfig, gather
from tests.actors.counter import COUNTER, Add, OpenCounter
from tests.events.conftest import T0

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fleet(ray_session, tmp_path_factory):
    data = str(tmp_path_factory.mktemp("runtime"))
    config = RuntimeConfig(name="rt", data_dir=data, shards={"counter": 2})
    runtime = Runtime(config, deciders=[COUNTER]).start()
    client = FleetClient(runtime, owns_ray=False)
    yield client
    client.close()


def add(command_id: str, counter: str, amount: int) -> Add:
    return Add(command_id=command_id, issued_at=T0, counter_id=counter, amount=amount)


def test_commands_travel_through_ray_and_come_back_as_results(fleet):
    opened = fleet.send_many(
        [OpenCounter(command_id=f"open-{c}", issued_at=T0, counter_id=c) for c in "abcd"]
    )
    assert [r.status for r in opened] == ["recorded"] * 4
    results = fleet.send_many([add(f"x-{i}", "abcd"[i % 4], 1) for i in range(40)])
    assert all(r.status == "recorded" for r in results)
    assert fleet.state("counter", "c").total == 10
    assert [e.type for e in fleet.events("counter-c")][:2] == ["CounterOpened", "Added"]
    assert fleet.send(add("x-0", "a", 1)).duplicate


def test_packed_batches_give_the_same_answers_in_the_callers_order(fleet):
    fleet.send_many(
        [OpenCounter(command_id=f"open-p{c}", issued_at=T0, counter_id=f"p{c}") for c in "ab"]
    )
    commands = [add(f"pack-{i}", f"p{'ab'[i % 2]}", i) for i in range(10)]
    refs, order = fleet.runtime.route(commands, pack=True)  # as one pickle a shard
    results = gather(refs, order, len(commands))
    assert [r.command_id for r in results] == [c.command_id for c in commands]
    assert all(r.status == "recorded" for r in results)
    assert fleet.state("counter", "pa").total == sum(range(0, 10, 2))


def test_a_rejected_command_names_its_reason_and_unknown_kinds_are_our_error(fleet):
    result = fleet.send(add("bad-1", "nobody", 1))
    assert result.status == "rejected" and "unknown counter 'nobody'" in result.reason
    with pytest.raises(FleetError, match="unknown entity kind"):
        fleet.state("spaceship", "x")


def test_a_host_killed_mid_stream_restarts_and_loses_or_doubles_nothing(fleet):
    fleet.send_many(
        [OpenCounter(command_id=f"open-k{i}", issued_at=T0, counter_id=f"k{i}") for i in range(8)]
    )
    batches = [[add(f"kill-{b}-{i}", f"k{i % 8}", 1) for i in range(48)] for b in range(200)]
    victim = fleet.runtime.hosts("counter")[0]
    pid_before = ray.get(victim.pid.remote())
    outcomes: list = []

    def sender() -> None:
        for batch in batches:
            outcomes.extend(fleet.send_many(batch))

    thread = threading.Thread(target=sender)
    thread.start()
    deadline = time.monotonic() + 30
    while len(outcomes) < 3 * 48 and time.monotonic() < deadline:  # the stream is flowing
        time.sleep(0.005)
    ray.kill(victim, no_restart=False)
    answered_at_kill = len(outcomes)
    thread.join(timeout=120)
    assert not thread.is_alive()

    assert 0 < answered_at_kill < 9600, "the kill must land mid-stream"
    deadline = time.monotonic() + 30  # the kill is asynchronous; the restart follows it
    while ray.get(victim.pid.remote()) == pid_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(victim.pid.remote()) != pid_before, "the host must have been restarted"
    assert len(outcomes) == 9600 and all(r.status == "recorded" for r in outcomes)
    recorded = Counter()
    for i in range(8):
        events = fleet.events(f"counter-k{i}")
        recorded.update(e.command_id for e in events if e.type == "Added")
        assert [e.stream_version for e in events] == list(range(1, len(events) + 1))
        assert fleet.state("counter", f"k{i}").total == 1200
    assert len(recorded) == 9600 and set(recorded.values()) == {1}


def test_a_subscriber_gets_new_events_in_order_as_they_become_durable(fleet):
    import asyncio

    start = fleet.watermark() + 1

    async def first_three() -> list:
        got = []
        async for event in fleet.subscribe(start, types=["Added"], poll_s=0.2):
            got.append(event)
            if len(got) == 3:
                return got
        return got

    async def story() -> list:
        reader = asyncio.ensure_future(first_three())
        await asyncio.sleep(0.3)  # the subscriber is waiting before anything happens
        await fleet.send_many_async(
            [OpenCounter(command_id="open-sub", issued_at=T0, counter_id="sub")]
            + [add(f"sub-{i}", "sub", 1) for i in range(3)]
        )
        return await asyncio.wait_for(reader, timeout=20)

    events = asyncio.run(story())
    assert [e.command_id for e in events] == ["sub-0", "sub-1", "sub-2"]
    assert [e.event().total for e in events] == [1, 2, 3]
    assert events[0].position < events[1].position < events[2].position


def test_a_follower_waits_and_reads_in_one_call_only_what_it_asks_for(fleet):
    log = fleet.runtime.log
    after = fleet.watermark()

    # nothing new within the wait: the position stays, no events
    idle_upper, idle = ray.get(log.follow.remote(after, 0.05, None, ["position"]))
    assert idle_upper == after and idle.num_rows == 0 and idle.column_names == ["position"]

    fleet.send_many(
        [OpenCounter(command_id="open-follow", issued_at=T0, counter_id="follow")]
        + [add(f"follow-{i}", "follow", 1) for i in range(4)]
    )
    # at most 3 positions a round, of the one type asked for
    upper, table = ray.get(log.follow.remote(after, 5.0, 3, ["position", "type"], ["Added"]))
    assert upper == after + 3
    assert table.column("type").to_pylist() == ["Added", "Added"]
    assert table.column("position").to_pylist() == [after + 2, after + 3]

    # events of other types do not end a wait for "Added": it goes on until one comes
    mark = fleet.watermark()
    waiting = log.follow.remote(mark, 30.0, None, ["position", "type"], ["Added"])
    fleet.send_many([OpenCounter(command_id="open-other", issued_at=T0, counter_id="other")])
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert not ready
    fleet.send_many([add("other-1", "other", 1)])
    upper, table = ray.get(waiting, timeout=30)
    assert upper == mark + 2 and table.column("position").to_pylist() == [mark + 2]
