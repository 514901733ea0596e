"""What every entity kind provides to the generic host, and what the host answers.

A decider is pure: `decide(command, state) -> list[Event]` and
`evolve(state, event) -> state`, with `initial_state(entity_id)` for an entity the
log has never seen. It imports no ray, clock or network; time and ids arrive as
command fields. A command the decider cannot accept at all (an invalid field, an
unknown entity) raises `CommandRejected`: nothing is appended. A command it can
judge, but refuses on business grounds (a setpoint below the SoC floor), returns a
refusal *event*, because an operator must see it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from events.base import Command, Event

S = TypeVar("S")


class CommandRejected(ValueError):
    """A command that changes nothing, with the reason an operator can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownEntity(CommandRejected):
    """The command names an entity that was never registered."""


@dataclass(frozen=True, slots=True)
class ColumnDecision(Generic[S]):
    """What a decider's columnar twin made of a batch of commands, one entry per row.

    `payloads[i]` is the JSON of the one event (of `event_type`) that `decide` gives
    for row i, and `states[i]` the state `evolve` makes of it; a `None` payload means
    the row changes nothing ("unchanged"). Rows listed in `scalar` are not judged
    here: the host runs them through `decide` as commands.
    """

    event_type: type[Event]
    payloads: list[str | None]
    states: list[S | None]
    scalar: list[int]


@dataclass(frozen=True)
class Decider(Generic[S]):
    """One entity kind: its stream prefix, its commands and its three pure functions.

    `columnar` maps a columnar batch type (a `CommandBatch`) to a twin of `decide`
    and `evolve` for its common case: `twin(batch, states) -> ColumnDecision`, with
    the current state of each row's entity (`None` if the host has none). It must
    give exactly what deciding the batch's commands one by one gives; tests compare
    the two.
    """

    kind: str
    command_types: tuple[type[Command], ...]
    state_type: type[BaseModel]
    initial_state: Callable[[str], S]
    evolve: Callable[[S, Event], S]
    decide: Callable[[Any, S], list[Event]]
    columnar: Mapping[type, Callable[[Any, Sequence[Any]], ColumnDecision[S]]] = field(
        default_factory=dict
    )

    def stream_id(self, entity_id: str) -> str:
        return f"{self.kind}-{entity_id}"

    def fold(self, entity_id: str, events: Sequence[Event]) -> S:
        state = self.initial_state(entity_id)
        for event in events:
            state = self.evolve(state, event)
        return state


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """The answer to one command; a repeated `command_id` gets the first answer again.

    status: `recorded` (events appended at `positions`), `unchanged` (the state
    already said what the command asks; nothing appended) or `rejected` (invalid;
    nothing appended; `reason` says why). A plain dataclass, not a pydantic model:
    hosts create and ship one per command, so it must be cheap.
    """

    command_id: str
    stream_id: str
    status: Literal["recorded", "unchanged", "rejected"]
    positions: tuple[int, ...] = ()
    event_types: tuple[str, ...] = ()
    reason: str = ""
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status != "rejected"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Positional rebuild: 3x cheaper than the default for a frozen, slotted class,
        # and hosts send a thousand of these per batch.
        return (
            _command_result,
            (
                self.command_id,
                self.stream_id,
                self.status,
                self.positions,
                self.event_types,
                self.reason,
                self.duplicate,
            ),
        )


def _command_result(
    command_id: str,
    stream_id: str,
    status: Literal["recorded", "unchanged", "rejected"],
    positions: tuple[int, ...],
    event_types: tuple[str, ...],
    reason: str,
    duplicate: bool,
) -> CommandResult:
    return CommandResult(
        command_id=command_id,
        stream_id=stream_id,
        status=status,
        positions=positions,
        event_types=event_types,
        reason=reason,
        duplicate=duplicate,
    )
