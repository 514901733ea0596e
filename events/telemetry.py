"""Facts about the telemetry channel itself (stream `telemetry-rejections-<site_id>`)."""

from __future__ import annotations

from datetime import datetime

from events.base import Event


class TelemetryMessageRejected(Event):
    """A telemetry message changed nothing; `reason` says why (kept for the operator)."""

    site_id: str
    topic: str
    vehicle_id: str
    reason: str
    payload_excerpt: str
    rejected_at: datetime
