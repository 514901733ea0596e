"""The storage contract: events, commands, the recorded envelope and upcasting.

An event is a fact in the past tense. Its class is registered by name when it is
defined; that name and `schema_version` are stored with every recorded event, and
reading an older version runs the registered upcasters, in order, before the
payload is validated. Changing an event is therefore a migration (a new version
and an upcaster), never an edit of what the log holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class UnknownEventType(LookupError):
    """The log holds an event type this code does not define."""


class Event(BaseModel):
    """Base of every domain event: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: ClassVar[int] = 1
    _registry: ClassVar[dict[str, type[Event]]] = {}
    _upcasters: ClassVar[dict[tuple[str, int], Upcaster]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        if name in Event._registry and Event._registry[name].__module__ != cls.__module__:
            raise TypeError(f"event type {name!r} is defined twice")
        Event._registry[name] = cls

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__


def event_class(type_name: str) -> type[Event]:
    cls = Event._registry.get(type_name)
    if cls is None:
        import events.catalog  # noqa: F401  (registers every event module's types)

        cls = Event._registry.get(type_name)
    if cls is None:
        raise UnknownEventType(f"unknown event type {type_name!r}")
    return cls


def register_upcaster(type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register `fn(payload) -> payload` that lifts `type_name` from `from_version` to the next."""

    def register(fn: Upcaster) -> Upcaster:
        key = (type_name, from_version)
        if key in Event._upcasters:
            raise TypeError(f"upcaster for {type_name} v{from_version} is registered twice")
        Event._upcasters[key] = fn
        return fn

    return register


def upcast(type_name: str, schema_version: int, payload: Payload) -> Payload:
    """Lift a stored payload to the current version of its event class."""
    target = event_class(type_name).schema_version
    version = schema_version
    while version < target:
        try:
            step = Event._upcasters[(type_name, version)]
        except KeyError:
            raise UnknownEventType(
                f"no upcaster for {type_name} from schema version {version} to {target}"
            ) from None
        payload = step(payload)
        version += 1
    if version > target:
        raise UnknownEventType(
            f"{type_name} schema version {schema_version} is newer than this code ({target})"
        )
    return payload


def load_event(type_name: str, schema_version: int, payload_json: str) -> Event:
    cls = event_class(type_name)
    if schema_version == cls.schema_version:  # the common case: validate the JSON directly
        return cls.model_validate_json(payload_json)
    return cls.model_validate(upcast(type_name, schema_version, json.loads(payload_json)))


def _no_control_characters(value: str) -> str:
    if any(ord(ch) < 32 for ch in value):
        raise ValueError("must not contain control characters")
    return value


class Command(BaseModel):
    """Base of every command: imperative, frozen, carries its own id and time.

    Deciders have no clock and no id generator, so `command_id` (the idempotency
    key) and `issued_at` (the time the command speaks of) are fields.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: str = Field(min_length=1, max_length=200)
    issued_at: AwareDatetime
    correlation_id: str = Field(default="", max_length=200)
    # W3C trace context of whoever sent it (see actors.tracing); empty: not traced.
    traceparent: str = Field(default="", max_length=55, pattern=r"^([0-9a-f-]{55})?$")

    _check_ids = field_validator("command_id", "correlation_id")(_no_control_characters)

    @property
    def stream_id(self) -> str:  # pragma: no cover - every concrete command overrides it
        raise NotImplementedError


#: The fields every command carries for the system, not for the decision it asks;
#: deciders copying a command's own fields into an event exclude these.
ENVELOPE_FIELDS = frozenset({"command_id", "issued_at", "correlation_id", "traceparent"})


class RecordedEvent(BaseModel):
    """An event as the log holds it: the envelope around one fact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    position: int
    partition: int = 0
    stream_id: str
    stream_hash: int = 0
    stream_version: int
    event_id: str
    type: str
    schema_version: int
    occurred_at: datetime
    command_id: str
    correlation_id: str
    payload: str
    metadata: str = "{}"
    prev_hash: bytes = b""
    hash: bytes = b""

    def event(self) -> Event:
        return load_event(self.type, self.schema_version, self.payload)


def utc(dt: datetime) -> datetime:
    """The same instant in UTC; naive datetimes are refused rather than guessed."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime: give a timezone")
    return dt.astimezone(UTC)
