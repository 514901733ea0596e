"""The log's promises, told as stories: durable, idempotent, ordered, one writer per stream."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from events.log import ConcurrencyError, EventLog
from events.schema import PendingBatchBuilder
from tests.events.conftest import T0, Pinged


@pytest.fixture
def log(tmp_path):
    with EventLog(str(tmp_path / "log"), partitions=3, seal_events=50) as log:
        yield log


def test_an_append_is_numbered_and_readable_back(log):
    first = log.append("vehicle-1", [Pinged(n=1), Pinged(n=2)], 0, "cmd-1", T0)
    second = log.append("vehicle-2", [Pinged(n=3)], 0, "cmd-2", T0)

    assert first.positions == (1, 2)
    assert second.positions == (3,)
    assert [e.event() for e in log.read_stream("vehicle-1")] == [Pinged(n=1), Pinged(n=2)]
    assert [e.stream_version for e in log.read_stream("vehicle-1")] == [1, 2]
    assert log.version("vehicle-1") == 2


def test_a_repeated_command_returns_the_first_answer_and_writes_nothing(log):
    first = log.append("vehicle-1", [Pinged(n=1)], 0, "cmd-1", T0)
    again = log.append("vehicle-1", [Pinged(n=99)], 0, "cmd-1", T0)

    assert again.duplicate and again.positions == first.positions
    assert again.stream_id == "vehicle-1"
    assert log.read_all().num_rows == 1


def test_a_stale_writer_gets_a_concurrency_error_and_nothing_is_written(log):
    log.append("vehicle-1", [Pinged(n=1)], 0, "cmd-1", T0)

    with pytest.raises(ConcurrencyError, match="at version 1, but the append expected version 0"):
        log.append("vehicle-1", [Pinged(n=2)], 0, "cmd-2", T0)
    assert log.read_all().num_rows == 1


def test_one_batch_answers_each_command_on_its_own(log):
    log.append("vehicle-1", [Pinged(n=1)], 0, "cmd-1", T0)
    builder = PendingBatchBuilder()
    builder.add("vehicle-1", 1, "cmd-2/0", "Pinged", 1, T0, "cmd-2", "", '{"n":2}')  # stale
    builder.add("vehicle-2", 1, "cmd-3/0", "Pinged", 1, T0, "cmd-3", "", '{"n":3}')
    builder.add("vehicle-2", 2, "cmd-3/1", "Pinged", 1, T0, "cmd-3", "", '{"n":4}')
    builder.add("vehicle-9", 1, "cmd-1/0", "Pinged", 1, T0, "cmd-1", "", '{"n":5}')  # repeat

    stale, fresh, repeat = log.append_batch(builder.build())

    assert isinstance(stale, ConcurrencyError)
    assert fresh.positions == (2, 3)
    assert repeat.duplicate and repeat.positions == (1,)
    assert log.read_all().column("command_id").to_pylist() == ["cmd-1", "cmd-3", "cmd-3"]


def test_concurrent_appends_are_group_committed_without_loss(log):
    def writer(w: int) -> None:
        for i in range(40):
            log.append(f"vehicle-{w}", [Pinged(n=i)], i, f"w{w}-{i}", T0)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    table = log.read_all()
    assert table.num_rows == 240
    assert table.column("position").to_pylist() == list(range(1, 241))
    for w in range(6):
        assert [e.event().n for e in log.read_stream(f"vehicle-{w}")] == list(range(40))


def test_everything_survives_a_reopen_including_sealed_segments(tmp_path):
    root = str(tmp_path / "log")
    with EventLog(root, partitions=2, seal_events=10) as log:
        for i in range(60):
            log.append(f"vehicle-{i % 5}", [Pinged(n=i)], i // 5, f"cmd-{i}", T0)
        log.flush_seals()
        assert log.sealed_segment_paths(), "small seal size must have sealed segments"
        before = log.read_all()

    with EventLog(root) as reopened:
        assert reopened.read_all().equals(before)
        assert reopened.version("vehicle-3") == 12
        assert reopened.append("vehicle-3", [Pinged(n=0)], 11, "cmd-3", T0).duplicate
        nxt = reopened.append("vehicle-3", [Pinged(n=60)], 12, "cmd-60", T0)
        assert nxt.positions == (61,)


def test_reads_from_a_position_and_subscribers_wait_for_new_events(log):
    for i in range(5):
        log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
    assert log.read_all(from_position=4).column("position").to_pylist() == [4, 5]

    stop = threading.Event()
    received: list[int] = []

    def consume() -> None:
        for table in log.subscribe(from_position=6, poll_s=0.05, stop=stop):
            received.extend(table.column("position").to_pylist())
            if len(received) >= 3:
                stop.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(5, 8):
        log.append("vehicle-1", [Pinged(n=i)], i, f"cmd-{i}", T0)
    consumer.join(timeout=5)
    assert received == [6, 7, 8]


def test_shard_reads_keep_only_the_streams_a_host_owns(log):
    for i in range(20):
        log.append(f"vehicle-{i}", [Pinged(n=i)], 0, f"cmd-{i}", T0)
    shards = [log.read_all(shard=(k, 3)) for k in range(3)]
    assert sum(t.num_rows for t in shards) == 20
    owned = [set(t.column("stream_id").to_pylist()) for t in shards]
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2])


def test_a_follower_can_ask_for_only_the_types_it_follows(log):
    builder = PendingBatchBuilder()
    for i in range(60):  # past seal_events: sealed segments and the write-ahead tail
        kind = "Pinged" if i % 3 else "Plugged"
        builder.add(f"v-{i}", 1, f"c-{i}/0", kind, 1, T0, f"c-{i}", "", f'{{"n":{i}}}')
    log.append_batch(builder.build())
    log.flush_seals()

    plugged = log.read_all(from_position=10, types=["Plugged"], columns=["position", "type"])

    assert plugged.column("type").to_pylist() == ["Plugged"] * 17
    assert plugged.column("position").to_pylist() == list(range(10, 61, 3))


def test_a_projected_read_filters_on_columns_it_does_not_return(log):
    for i in range(30):  # rounds spread over the partitions, past seal_events
        builder = PendingBatchBuilder()
        for k in range(3):
            sid = f"v-{k}"
            builder.add(sid, i + 1, f"c-{i}-{k}/0", "Pinged", 1, T0, f"c-{i}-{k}", "", "{}")
        log.append_batch(builder.build())
    log.flush_seals()
    everything = log.read_all()

    one = log.read_all(from_position=20, to_position=70, stream_id="v-1", columns=["payload"])
    owned = log.read_all(from_position=5, shard=(1, 3), columns=["position"])

    assert one.column_names == ["payload"] and one.num_rows == 17
    expected = [
        p
        for p, s, h in zip(
            everything.column("position").to_pylist(),
            everything.column("stream_id").to_pylist(),
            everything.column("stream_hash").to_pylist(),
            strict=True,
        )
        if p >= 5 and h % 3 == 1
    ]
    assert owned.column("position").to_pylist() == expected
    assert everything.column("position").to_pylist() == list(range(1, 91))
    with pytest.raises(KeyError):
        log.read_all(columns=["position", "no_such_column"])


def test_a_batch_whose_command_spans_two_streams_is_refused(log):
    builder = PendingBatchBuilder()
    builder.add("vehicle-1", 1, "c/0", "Pinged", 1, T0, "c", "", '{"n":1}')
    builder.add("vehicle-2", 1, "c/1", "Pinged", 1, T0, "c", "", '{"n":1}')
    with pytest.raises(Exception, match="on one stream, with consecutive versions"):
        log.append_batch(builder.build())
    # and the log still takes good appends afterwards
    assert log.append("vehicle-1", [Pinged(n=1)], 0, "d", T0).positions == (1,)


def test_a_batch_of_fresh_single_event_commands_takes_the_fast_path_and_the_same_answers(log):
    log.append("vehicle-0", [Pinged(n=0)], 0, "first", T0)
    builder = PendingBatchBuilder()
    for i in range(1, 50):  # one new command per stream, each at the version it expects
        builder.add(f"vehicle-{i}", 1, f"c{i}/0", "Pinged", 1, T0, f"c{i}", "", f'{{"n":{i}}}')
    outcomes = log.append_batch(builder.build())
    assert [o.positions for o in outcomes] == [(p,) for p in range(2, 51)]
    assert not any(o.duplicate for o in outcomes)

    again = PendingBatchBuilder()  # the same commands again: every one a duplicate
    for i in range(1, 50):
        again.add(f"vehicle-{i}", 1, f"c{i}/0", "Pinged", 1, T0, f"c{i}", "", f'{{"n":{i}}}')
    repeats = log.append_batch(again.build())
    assert all(o.duplicate for o in repeats)
    assert [o.positions for o in repeats] == [o.positions for o in outcomes]
    assert log.read_all().num_rows == 50


def test_a_round_with_two_batches_of_the_same_streams_numbers_both_on_the_fast_path(
    log, monkeypatch
):
    # A sender that keeps two batches of the same vehicles in flight puts both in one
    # round: the second expects the versions the first leaves, and is judged as a
    # whole like the first (no row-by-row answers), in the order they came.
    from concurrent.futures import Future

    from events.log import BatchOutcome

    def round_of(versions: list[int], tag: str) -> pa.RecordBatch:
        builder = PendingBatchBuilder()
        for i, version in enumerate(versions):
            cmd = f"{tag}-{i}"
            builder.add(f"vehicle-{i}", version, f"{cmd}/0", "Pinged", 1, T0, cmd, "", "{}")
        return builder.build()

    def row_by_row(*args: object) -> None:
        raise AssertionError("a batch of fresh single-event commands went row by row")

    monkeypatch.setattr(BatchOutcome, "add", row_by_row)
    first, second = log._commit(
        [(round_of([1] * 20, "a"), Future()), (round_of([2] * 20, "b"), Future())]
    )
    assert [o.positions for o in first] == [(p,) for p in range(1, 21)]
    assert [o.positions for o in second] == [(p,) for p in range(21, 41)]
    assert log.version("vehicle-7") == 2
    monkeypatch.undo()

    # a second batch that expects the version its round started from is stale
    ok, stale = log._commit(
        [(round_of([3] * 20, "c"), Future()), (round_of([3] * 20, "d"), Future())]
    )
    assert not any(isinstance(o, ConcurrencyError) for o in ok)
    assert all(isinstance(o, ConcurrencyError) for o in stale)
    assert log.version("vehicle-7") == 3
    assert log.read_all().num_rows == 60


def test_mixed_rounds_across_partitions_keep_a_chain_the_verifier_accepts(tmp_path):
    # The writer joins bodies in one Arrow kernel and hashes each partition after one
    # reordering; the verifier recomputes every body in Python. They must agree,
    # through repeats, conflicts, multi-event commands, rounds of several batches,
    # sealing and a reopen.
    from events.verify import verify_log

    def batch(round_: int, b: int) -> pa.RecordBatch:
        builder = PendingBatchBuilder()
        for s in range(10):
            sid, cmd, version = f"vehicle-{b}-{s}", f"c-{round_}-{b}-{s}", 2 * round_
            payload = f'{{"n":{round_ * 100 + s}}}'
            if s % 3 == 0:  # one command, two events
                builder.add(sid, version + 1, f"{cmd}/0", "Pinged", 1, T0, cmd, "", payload)
                builder.add(sid, version + 2, f"{cmd}/1", "Pinged", 1, T0, cmd, "", payload)
            else:  # two commands, one event each
                builder.add(sid, version + 1, f"{cmd}/0", "Pinged", 1, T0, cmd, "", payload)
                builder.add(sid, version + 2, f"{cmd}b/0", "Pinged", 1, T0, f"{cmd}b", "é", "{}")
        builder.add("vehicle-0-1", 1, "c-0-0-1/0", "Pinged", 1, T0, "c-0-0-1", "", "{}")  # repeat
        builder.add("vehicle-0-2", 1, "x/0", "Pinged", 1, T0, f"stale-{round_}-{b}", "", "{}")
        return builder.build()

    root = str(tmp_path / "log")
    repeats = set()
    with EventLog(root, partitions=4, seal_events=40) as log:
        for round_ in range(6):
            futures = [log.submit_batch(batch(round_, b)) for b in range(3)]
            for outcome in [f.result() for f in futures]:
                assert outcome[-2].duplicate
                repeats.add(outcome[-2].positions)
                assert isinstance(outcome[-1], ConcurrencyError)
        assert repeats == {(3,)}  # after vehicle-0-0's two events
        total = log.read_all().num_rows
        assert total == 6 * 3 * 10 * 2
        log.flush_seals()
    report = verify_log(root)
    assert report.ok and report.events_checked == total, report
    with EventLog(root) as reopened:
        assert reopened.read_all().num_rows == total
        assert reopened.version("vehicle-2-9") == 12


def test_small_rounds_build_the_same_bodies_and_a_chain_the_verifier_accepts(tmp_path):
    # A round of a few events joins its bodies in Python rather than in the kernel:
    # byte for byte the same bodies, so the same hashes.
    from events.schema import pending_bodies
    from events.verify import verify_log

    builder = PendingBatchBuilder()
    for s in range(12):
        cmd = f"c-{s}"
        builder.add(f"vehicle-{s}", 1, f"{cmd}/0", "Pinged", 1, T0, cmd, "é" * s, f'{{"n":{s}}}')
    rows = builder.build()
    assert rows.num_rows > 8  # the kernel's path
    few = [pending_bodies(rows.slice(i, 1))[0].as_py() for i in range(rows.num_rows)]
    assert few == pending_bodies(rows).to_pylist()

    root = str(tmp_path / "log")
    with EventLog(root, partitions=4) as log:
        for s in range(12):  # one- and three-event rounds, across the partitions
            one = PendingBatchBuilder()
            for k in range(1 + 2 * (s % 2)):
                cmd = f"c-{s}"
                one.add(f"vehicle-{s}", k + 1, f"{cmd}/{k}", "Pinged", 1, T0, cmd, "", "{}")
            assert not isinstance(log.append_batch(one.build())[0], ConcurrencyError)
        total = log.read_all().num_rows
    report = verify_log(root)
    assert report.ok and report.events_checked == total == 24, report


def test_the_log_tells_which_reads_stay_in_the_write_ahead_tail(tmp_path):
    with EventLog(str(tmp_path / "log"), partitions=1, seal_events=10) as log:
        for i in range(1, 16):
            b = PendingBatchBuilder()
            b.add(f"vehicle-{i}", 1, f"c-{i}/0", "Pinged", 1, T0, f"c-{i}", "", "{}")
            log.append_batch(b.build())
        log.flush_seals()  # positions 1-10 are a sealed segment now
        assert not log.in_memory(1) and not log.in_memory(10)
        assert log.in_memory(11) and log.in_memory(16)
        assert log.read_all(11).column("position").to_pylist() == list(range(11, 16))


def test_a_pending_batch_crosses_to_the_log_compressed_and_unchanged(log):
    from events.schema import decode_pending, encode_pending

    builder = PendingBatchBuilder()
    for i in range(200):
        builder.add(f"vehicle-{i}", 1, f"c{i}/0", "Pinged", 1, T0, f"c{i}", "", f'{{"n":{i}}}')
    batch = builder.build()
    encoded = encode_pending(batch)

    assert len(encoded) < batch.nbytes  # compressed
    arrived = decode_pending(encoded)
    assert arrived.equals(batch) and arrived.schema == batch.schema
    assert [o.positions for o in log.append_batch(arrived)][:2] == [(1,), (2,)]


def test_segments_are_sealed_at_a_lower_cpu_priority_than_appends(tmp_path):
    import os
    import sys

    from events.threads import BACKGROUND_NICE

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    with EventLog(str(tmp_path / "log")) as log:

        def nice_of_this_thread() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        appender = nice_of_this_thread()
        sealer = log._sealer.submit(nice_of_this_thread).result()
    assert sealer == max(appender, BACKGROUND_NICE)
