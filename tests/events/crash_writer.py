"""A writer process for the crash test: appends forever and reports each acknowledgement.

Usage: python -m tests.events.crash_writer LOG_DIR RUN_NUMBER
Prints `ack <command_id> <first_position> <count>` after each append is acknowledged.
The parent kills it with SIGKILL at a random moment.
"""

from __future__ import annotations

import sys
import threading

from events.log import ConcurrencyError, EventLog
from tests.events.conftest import T0, Pinged

_print_lock = threading.Lock()


def main() -> None:
    root, run = sys.argv[1], int(sys.argv[2])
    log = EventLog(root, partitions=3, seal_events=200)

    def writer(w: int) -> None:
        stream = f"vehicle-{w}"
        i = 0
        while True:
            events = [Pinged(n=i)] * (1 + i % 3)  # multi-event commands must stay whole
            command_id = f"run{run}-w{w}-{i}"
            try:
                done = log.append(stream, events, log.version(stream), command_id, T0)
            except ConcurrencyError:
                continue
            with _print_lock:
                sys.stdout.write(f"ack {command_id} {done.first_position} {done.count}\n")
                sys.stdout.flush()
            i += 1

    for w in range(4):
        threading.Thread(target=writer, args=(w,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
