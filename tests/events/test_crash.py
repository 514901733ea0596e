"""A real crash test: a writer process is killed with SIGKILL at random moments, many times.

After each kill the log must reopen with every acknowledged event present exactly
once, whole commands only, no torn record, and an intact hash chain.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

from events.log import EventLog
from events.verify import verify_log

KILLS = 12


def _run_writer_until_killed(root: str, run: int, rng: random.Random) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.events.crash_writer", root, str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines, "writer never became ready"
    time.sleep(rng.uniform(0.05, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    return [line for line in lines if line.startswith("ack ")]


def test_sigkill_at_random_moments_loses_no_acknowledged_event(tmp_path):
    root = str(tmp_path / "log")
    rng = random.Random(20261129)
    acknowledged: dict[str, tuple[int, int]] = {}
    for run in range(KILLS):
        for line in _run_writer_until_killed(root, run, rng):
            _, command_id, first, count = line.split()
            acknowledged[command_id] = (int(first), int(count))

        with EventLog(root) as log:
            table = log.read_all()
        commands = table.column("command_id").to_pylist()
        positions = table.column("position").to_pylist()
        assert len(set(table.column("event_id").to_pylist())) == table.num_rows, "duplicate event"
        assert positions == sorted(set(positions)), "positions must be unique and ordered"
        by_command: dict[str, list[int]] = {}
        for command_id, position in zip(commands, positions, strict=True):
            by_command.setdefault(command_id, []).append(position)
        for command_id, (first, count) in acknowledged.items():
            assert by_command.get(command_id) == list(range(first, first + count)), command_id
        for command_id, found in by_command.items():  # unacknowledged commands are whole too
            assert found == list(range(found[0], found[0] + len(found))), command_id
            assert len(found) == 1 + int(command_id.rsplit("-", 1)[1]) % 3, command_id
        report = verify_log(root)
        assert report.ok, str(report.problem)

    assert len(acknowledged) > 100, "the writer must have made progress between kills"
