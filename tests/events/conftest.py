from __future__ import annotations

from datetime import UTC, datetime

from events.base import Event

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


class Pinged(Event):
    """A minimal event for log tests (the log does not care what the facts mean)."""

    n: int
