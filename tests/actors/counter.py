"""A tiny decider for host tests: a counter that refuses to go negative."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from actors.decider import CommandRejected, Decider, UnknownEntity
from events.base import Command, Event


class OpenCounter(Command):
    counter_id: str

    @property
    def stream_id(self) -> str:
        return f"counter-{self.counter_id}"


class Add(Command):
    counter_id: str
    amount: int = Field(ge=-1000, le=1000)

    @property
    def stream_id(self) -> str:
        return f"counter-{self.counter_id}"


class CounterOpened(Event):
    counter_id: str


class Added(Event):
    amount: int
    total: int


class CounterState(BaseModel):
    model_config = ConfigDict(frozen=True)
    counter_id: str
    opened: bool = False
    total: int = 0


def initial_state(counter_id: str) -> CounterState:
    return CounterState(counter_id=counter_id)


def evolve(state: CounterState, event: Event) -> CounterState:
    if isinstance(event, CounterOpened):
        return state.model_copy(update={"opened": True})
    if isinstance(event, Added):
        return state.model_copy(update={"total": event.total})
    return state


def decide(command: Command, state: CounterState) -> list[Event]:
    if isinstance(command, OpenCounter):
        return [] if state.opened else [CounterOpened(counter_id=command.counter_id)]
    if not state.opened:
        raise UnknownEntity(f"unknown counter {state.counter_id!r}")
    assert isinstance(command, Add)
    if state.total + command.amount < 0:
        raise CommandRejected(f"amount: {command.amount} would take the total below zero")
    return [Added(amount=command.amount, total=state.total + command.amount)]


COUNTER = Decider(
    kind="counter",
    command_types=(OpenCounter, Add),
    state_type=CounterState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)
