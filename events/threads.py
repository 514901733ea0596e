"""Background threads that yield the CPU to the request path."""

from __future__ import annotations

import contextlib
import os
import threading

# Nice value for background work that runs mostly outside the GIL (sealing segments:
# Parquet and DuckDB release it): above the request threads' 0, so on a busy machine
# the scheduler runs appends and commands first and the background job in what is
# left. Not for Python-heavy threads: one holding the GIL while descheduled would
# stall its process's request threads.
BACKGROUND_NICE = 10


def lower_this_threads_priority(nice: int = BACKGROUND_NICE) -> None:
    """Give the calling thread a lower CPU priority (Linux: a thread's own nice value).

    Never a higher one: a thread already at `nice` or above stays where it is.
    Lowering one's priority needs no privilege; where the platform has no per-thread
    priority this does nothing.
    """
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, thread, nice)
