"""The telemetry channel's rejection record: one stream per site, counting what was refused.

A malformed or unknown-vehicle MQTT message changes no vehicle; it is recorded here
so an operator can see what arrived and why it was turned away.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from actors.decider import Decider
from events.base import Command, Event
from events.telemetry import TelemetryMessageRejected


class RecordTelemetryRejection(Command):
    """A telemetry message that changed nothing, kept so an operator can see why."""

    site_id: str = Field(min_length=1, max_length=64)
    topic: str = Field(max_length=300)
    vehicle_id: str = Field(default="", max_length=64)
    reason: str = Field(max_length=500)
    payload_excerpt: str = Field(default="", max_length=300)

    @property
    def stream_id(self) -> str:
        return f"telemetry-rejections-{self.site_id}"


class TelemetryRejectionsState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    site_id: str
    rejected_total: int = 0


def initial_state(site_id: str) -> TelemetryRejectionsState:
    return TelemetryRejectionsState(site_id=site_id)


def evolve(state: TelemetryRejectionsState, event: Event) -> TelemetryRejectionsState:
    if isinstance(event, TelemetryMessageRejected):
        return state.model_copy(update={"rejected_total": state.rejected_total + 1})
    return state


def decide(command: RecordTelemetryRejection, state: TelemetryRejectionsState) -> list[Event]:
    return [
        TelemetryMessageRejected(
            site_id=command.site_id,
            topic=command.topic,
            vehicle_id=command.vehicle_id,
            reason=command.reason,
            payload_excerpt=command.payload_excerpt,
            rejected_at=command.issued_at,
        )
    ]


TELEMETRY_REJECTIONS: Decider[TelemetryRejectionsState] = Decider(
    kind="telemetry-rejections",
    command_types=(RecordTelemetryRejection,),
    state_type=TelemetryRejectionsState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)

__all__ = [
    "TELEMETRY_REJECTIONS",
    "RecordTelemetryRejection",
    "TelemetryRejectionsState",
]
