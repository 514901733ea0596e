"""The CSMS side of OCPP 2.0.1 and 2.1: charging stations in, commands out.

`OcppCsmsGateway` is a WebSocket server (the `websockets` library) that many
stations connect to, each as `ws[s]://host:port/<any/prefix>/<station_id>` with the
subprotocol `ocpp2.1` or `ocpp2.0.1`. Every message a station sends becomes one or
more commands for the `CommandSink`; the first command of a message has the id
`f"{station_id}:{call_unique_id}"`, further ones append `#1`, `#2`, ... (`#trip` for
the vehicle's trip plan), so a station that retries a message with the same unique
id produces the same ids and the host records it once.

Security (OCPP 2.0.1 part 2, A00): profile 1 is HTTP Basic authentication
(username = station id, a password per station, an allow-list of station ids);
profile 2 is the same over TLS, and a TLS-configured gateway refuses plaintext.
Refusals are answered at the handshake (400 no OCPP subprotocol, 401 missing or
wrong credentials, 403 station blocked, 404 unknown station) and recorded as
`RecordConnectionRejected` on the gateway's stream `ocpp-gateway-{gateway_id}`.
Malformed or schema-invalid OCPP messages are answered with a CallError and
recorded as `RecordMessageRejected` there; nothing else is submitted for them.

The gateway is a plain asyncio class; the runtime wraps it in a Ray actor and
hands it a sink that routes commands to the charger shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import logging
import math
import ssl
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from ocpp import v21, v201
from ocpp.charge_point import (
    camel_to_snake_case,
    remove_nones,
    serialize_as_dict,
    snake_to_camel_case,
)
from ocpp.exceptions import (
    NotImplementedError as OcppNotImplementedError,
)
from ocpp.exceptions import (
    OCPPError,
    PropertyConstraintViolationError,
)
from ocpp.messages import Call, CallError, CallResult, MessageType, get_validator, unpack
from ocpp.messages import validate_payload as library_validate_payload
from ocpp.routing import after, on
from ocpp.v21.enums import Action
from opentelemetry import trace
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHeader
from websockets.headers import build_www_authenticate_basic, parse_authorization_basic
from websockets.http11 import Request, Response

from actors.charger import (
    MarkOffline,
    MarkOnline,
    RecordAllowedEnergyTransfer,
    RecordAuthorization,
    RecordBoot,
    RecordChargingNeeds,
    RecordConnectionRejected,
    RecordHeartbeat,
    RecordMessageRejected,
    RecordMeterValues,
    RecordSetpointRejected,
    RecordSetpointSent,
    RecordStatus,
    RecordTransactionEvent,
)
from actors.decider import CommandResult
from actors.gateways.sink import CommandSink
from actors.tracing import continued, handed_on, traceparent_of
from events.base import Command
from events.charger import SetpointRejectionReason

LOGGER = logging.getLogger(__name__)

#: Subprotocols the gateway speaks, in order of preference.
SUBPROTOCOLS = ("ocpp2.1", "ocpp2.0.1")
_VERSION_OF = {"ocpp2.1": "2.1", "ocpp2.0.1": "2.0.1"}
#: Charging profiles the gateway sends have id PROFILE_ID_BASE + evse_id, so each new
#: setpoint replaces the previous one on that EVSE.
PROFILE_ID_BASE = 7100


# The trace the gateway is working under in this task: a station's message, or a
# setpoint decision being carried to a station. Commands submitted meanwhile carry it.
_TRACE: ContextVar[str] = ContextVar("v2g_ocpp_trace", default="")


@dataclass(frozen=True)
class StationCredentials:
    """One entry of the allow-list: the Basic-auth password and whether it may connect."""

    password: str
    enabled: bool = True


@dataclass(frozen=True)
class ChargingNeedsReport:
    """What a station said about an EV's needs, handed to the trip-planner hook."""

    station_id: str
    evse_id: int
    id_token: str
    departure_at: datetime | None
    energy_kwh: float | None
    command_id: str
    issued_at: datetime


@dataclass(frozen=True)
class SetpointOutcome:
    """The answer to `send_setpoint`: accepted, or refused with the recorded reason."""

    accepted: bool
    command_id: str
    reason: SetpointRejectionReason | None = None
    detail: str = ""


#: Maps a station's charging-needs report to a command for the vehicle (its PlanTrip),
#: or None when the vehicle behind the id token is unknown. Supplied by the runtime.
TripPlanner = Callable[[ChargingNeedsReport], Command | None]
#: Called with the station id when a station is marked offline (the runtime zeroes the
#: setpoint of the vehicle plugged into it).
OfflineHook = Callable[[str], Awaitable[None] | None]
Clock = Callable[[], datetime]


class MalformedAnswer(Exception):
    """A station answered a call with a payload its OCPP schema refuses."""


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _BadPayload(ValueError):
    """A schema-valid payload whose content we cannot turn into a command."""


@dataclass
class _Station:
    station_id: str
    cp: _CsmsChargePoint | None = None
    version: str = ""
    online: bool = False
    last_seen: float = 0.0  # loop time
    last_seen_at: datetime | None = None
    evse_transaction: dict[int, str] = field(default_factory=dict)
    transaction_evse: dict[str, int] = field(default_factory=dict)
    evse_id_token: dict[int, str] = field(default_factory=dict)
    desired: dict[int, tuple[float, datetime]] = field(default_factory=dict)
    connection: ServerConnection | None = None

    def note_transaction(self, event_type: str, tx: str, evse_id: int | None, token: str) -> None:
        """Remember which EVSE (and id token) a transaction runs on, for later messages."""
        if event_type == "Ended":
            evse = self.transaction_evse.pop(tx, None)
            if evse is not None:
                self.evse_transaction.pop(evse, None)
                self.evse_id_token.pop(evse, None)
            return
        if evse_id is not None:
            self.transaction_evse[tx] = evse_id
            self.evse_transaction[evse_id] = tx
            if token:
                self.evse_id_token[evse_id] = token


def _clean(text: object, limit: int) -> str:
    """Printable, bounded text for a rejection record (station input can be anything)."""
    return "".join(ch if ord(ch) >= 32 else "?" for ch in str(text))[:limit]


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


_POWER_UNITS = {"W": 1e-3, "kW": 1.0}
_ENERGY_UNITS = {"Wh": 1e-3, "kWh": 1.0}


def _reading(sampled: Mapping[str, Any], units: Mapping[str, float], default: str) -> float:
    unit = sampled.get("unit_of_measure") or {}
    name = unit.get("unit", default)
    if name not in units:
        raise _BadPayload(f"unsupported unit {name!r} for {sampled.get('measurand')}")
    return float(sampled["value"]) * 10.0 ** int(unit.get("multiplier", 0)) * units[name]


def _meter_fields(meter_value: Mapping[str, Any]) -> dict[str, Any]:
    """Power, energy registers and SoC of one OCPP MeterValue, in our units and sign."""
    power_import = power_export = None
    fields: dict[str, Any] = {"sampled_at": _parse_time(meter_value["timestamp"])}
    for sampled in meter_value["sampled_value"]:
        if sampled.get("phase"):
            continue  # per-phase values; the totals carry no phase
        measurand = sampled.get("measurand", "Energy.Active.Import.Register")
        if measurand == "Power.Active.Import":
            power_import = _reading(sampled, _POWER_UNITS, "W")
        elif measurand == "Power.Active.Export":
            power_export = _reading(sampled, _POWER_UNITS, "W")
        elif measurand == "Energy.Active.Import.Register":
            fields["energy_import_kwh"] = _reading(sampled, _ENERGY_UNITS, "Wh")
        elif measurand == "Energy.Active.Export.Register":
            fields["energy_export_kwh"] = _reading(sampled, _ENERGY_UNITS, "Wh")
        elif measurand == "SoC":
            fields["soc"] = float(sampled["value"]) / 100.0
    if power_import is not None or power_export is not None:
        fields["power_kw"] = (power_import or 0.0) - (power_export or 0.0)
    return fields


def _needs_energy_kwh(needs: Mapping[str, Any]) -> float | None:
    for key in ("ac_charging_parameters", "dc_charging_parameters"):
        amount = (needs.get(key) or {}).get("energy_amount")
        if amount is not None:
            return float(amount) / 1000.0
    target = (needs.get("v2x_charging_parameters") or {}).get("ev_target_energy_request")
    return None if target is None else float(target) / 1000.0


# --- schema validation ---------------------------------------------------------------
# The ocpp library checks every payload with jsonschema's Draft4Validator, whose $ref
# resolution and per-keyword dispatch cost ~60 % of a gateway's CPU at a thousand meter
# values a second. The OCPP 2.0.1 and 2.1 schemas use a small subset of draft 4, so
# each schema is compiled once into plain checks with the same meaning (draft 4 types,
# a $ref replacing its siblings, `format` unchecked as the library leaves it). A payload
# the checks accept is valid; one they refuse goes to the library's own validator, so a
# station hears the library's error code and cause, word for word. A schema with a
# keyword outside the subset keeps the library's validator.

_Check = Callable[[Any], bool]
_CHECKED_KEYWORDS = frozenset(
    {"$ref", "type", "enum", "maxLength", "minimum", "maximum", "items", "minItems"}
    | {"maxItems", "properties", "required", "additionalProperties"}
)
_IGNORED_KEYWORDS = frozenset(
    {"$schema", "$id", "comment", "$comment", "description", "javaType", "default"}
    | {"definitions", "format", "additionalItems"}  # additionalItems: only with a list `items`
)


class _Unsupported(Exception):
    """A schema keyword the compiler does not know: the library validates that schema."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKS: dict[str, _Check] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),  # draft 4: not 1.0
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _all_of(checks: list[_Check]) -> _Check:
    if len(checks) == 1:
        return checks[0]

    def check(value: Any) -> bool:
        for one in checks:  # noqa: SIM110 (a loop: no generator object per value)
            if not one(value):
                return False
        return True

    return check


def _compile_ref(
    ref: str, definitions: Mapping[str, Any], done: dict[str, _Check | None]
) -> _Check:
    name = ref.removeprefix("#/definitions/")
    if name == ref or "/" in name or "~" in name or name not in definitions:
        raise _Unsupported(f"$ref {ref!r}")
    if name not in done:
        done[name] = None  # being compiled: a reference back to it is looked up when used
        done[name] = _compile_schema(definitions[name], definitions, done)
    compiled = done[name]
    if compiled is None:
        return lambda value: done[name](value)  # type: ignore[misc]
    return compiled


def _compile_object(
    schema: Mapping[str, Any], definitions: Mapping[str, Any], done: dict[str, _Check | None]
) -> _Check:
    properties = {
        key: _compile_schema(sub, definitions, done)
        for key, sub in schema.get("properties", {}).items()
    }
    required = tuple(schema.get("required", ()))
    extra_allowed = schema.get("additionalProperties", True)
    if not isinstance(extra_allowed, bool):
        raise _Unsupported("additionalProperties with a schema")

    def check(value: Any) -> bool:
        if not isinstance(value, dict):
            return True
        for key in required:
            if key not in value:
                return False
        for key, item in value.items():
            sub = properties.get(key)
            if sub is None:
                if not extra_allowed:
                    return False
            elif not sub(item):
                return False
        return True

    return check


def _compile_schema(
    schema: Mapping[str, Any], definitions: Mapping[str, Any], done: dict[str, _Check | None]
) -> _Check:
    if "$ref" in schema:  # draft 4: a reference replaces its siblings
        return _compile_ref(schema["$ref"], definitions, done)
    unknown = set(schema) - _CHECKED_KEYWORDS - _IGNORED_KEYWORDS
    if unknown:
        raise _Unsupported(", ".join(sorted(unknown)))
    checks: list[_Check] = []
    if "type" in schema:
        kinds = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        if any(kind not in _TYPE_CHECKS for kind in kinds):
            raise _Unsupported(f"type {schema['type']!r}")
        type_checks = [_TYPE_CHECKS[kind] for kind in kinds]
        checks.append(
            type_checks[0] if len(type_checks) == 1 else lambda v: any(c(v) for c in type_checks)
        )
    if "enum" in schema:
        allowed = frozenset(schema["enum"])
        if not all(isinstance(item, str) for item in allowed):
            raise _Unsupported("enum of non-strings")
        checks.append(lambda v: isinstance(v, str) and v in allowed)
    if "maxLength" in schema:
        max_length = int(schema["maxLength"])
        checks.append(lambda v: not isinstance(v, str) or len(v) <= max_length)
    if "minimum" in schema:
        low = schema["minimum"]
        checks.append(lambda v: not _is_number(v) or v >= low)
    if "maximum" in schema:
        high = schema["maximum"]
        checks.append(lambda v: not _is_number(v) or v <= high)
    if "items" in schema:
        if not isinstance(schema["items"], dict):
            raise _Unsupported("items as a list")
        item_check = _compile_schema(schema["items"], definitions, done)
        checks.append(lambda v: not isinstance(v, list) or all(item_check(x) for x in v))
    if "minItems" in schema:
        min_items = int(schema["minItems"])
        checks.append(lambda v: not isinstance(v, list) or len(v) >= min_items)
    if "maxItems" in schema:
        max_items = int(schema["maxItems"])
        checks.append(lambda v: not isinstance(v, list) or len(v) <= max_items)
    if {"properties", "required", "additionalProperties"} & set(schema):
        checks.append(_compile_object(schema, definitions, done))
    return _all_of(checks) if checks else (lambda v: True)


_COMPILED: dict[tuple[int, str, str], _Check | None] = {}


def _compiled_check(message: Call | CallResult, version: str) -> _Check | None:
    """The compiled schema of a message kind (None: the library validates it)."""
    key = (message.message_type_id, message.action, version)
    if key not in _COMPILED:
        try:
            schema = get_validator(message.message_type_id, message.action, version).schema
            _COMPILED[key] = _compile_schema(schema, schema.get("definitions", {}), {})
        except _Unsupported as unsupported:
            LOGGER.info("%s %s: library validation (%s)", version, message.action, unsupported)
            _COMPILED[key] = None
        except (OSError, ValueError):  # no schema: the library raises its NotImplemented
            _COMPILED[key] = None
    return _COMPILED[key]


async def validate_payload(message: Call | CallResult, version: str) -> None:
    """Raise the library's `OCPPError` for a payload its OCPP schema refuses.

    Same verdicts as `ocpp.messages.validate_payload`, an order of magnitude cheaper
    for valid payloads (the library is asked only about the ones the checks refuse).
    """
    check = _compiled_check(message, version)
    if check is not None and check(message.payload):
        return
    await library_validate_payload(message, version)


# Station payloads arrive in camelCase, handlers take snake_case: the library's
# conversion runs two regular expressions per key per message; its answer per key is
# remembered (bounded: a customData object may carry any keys).
_SNAKE_KEYS: dict[str, str] = {}


def _snake_key(key: str) -> str:
    snake = _SNAKE_KEYS.get(key)
    if snake is None:
        snake = next(iter(camel_to_snake_case({key: None})))
        if len(_SNAKE_KEYS) < 10_000:
            _SNAKE_KEYS[key] = snake
    return snake


def snake_case(data: Any) -> Any:
    """`ocpp.charge_point.camel_to_snake_case`, with the key conversions remembered."""
    if isinstance(data, dict):
        return {_snake_key(key): snake_case(value) for key, value in data.items()}
    if isinstance(data, list):
        return [snake_case(value) for value in data]
    return data


class _CsmsChargePoint:
    """Handlers shared by OCPP 2.0.1 and 2.1: each payload becomes commands, answered at once.

    Mixed into `ocpp.v201.ChargePoint` / `ocpp.v21.ChargePoint`; `self._call_result`
    is the version's result module, so one handler answers both versions.
    """

    id: str
    route_map: dict[str, dict[str, Any]]
    _call: Any
    _call_result: Any
    _ocpp_version: str
    _response_queue: asyncio.Queue[Any]
    # provided by ocpp's ChargePoint, which the concrete classes below mix this into
    call: Callable[..., Awaitable[Any]]
    start: Callable[[], Awaitable[None]]
    _send: Callable[[str], Awaitable[None]]

    def __init__(self, station_id: str, connection: ServerConnection, **kwargs: Any) -> None:
        self._gateway: OcppCsmsGateway = kwargs.pop("gateway")
        super().__init__(station_id, connection, **kwargs)  # type: ignore[call-arg]

    # --- message routing: count and record what the library refuses ----------------

    async def route_message(self, raw_msg: str | bytes) -> None:
        await self._gateway._heard_from(self.id)
        try:
            msg = unpack(raw_msg)
        except OCPPError as error:
            await self._refuse(_unique_id_of(raw_msg), "", error)
            return
        if msg.message_type_id != MessageType.Call:
            self._response_queue.put_nowait(msg)
            return
        if "_on_action" not in self.route_map.get(msg.action, {}):
            # ocpp 2.1.0 answers nothing at all for an unhandled 2.1 action: answer it.
            cause = f"no handler for {msg.action} at this CSMS"
            await self._refuse(
                msg.unique_id, msg.action, OcppNotImplementedError(details={"cause": cause})
            )
            return
        try:
            await self._handle_call(msg)
        except OCPPError as error:  # schema validation of the request (or our answer)
            await self._refuse(msg.unique_id, msg.action, error)

    async def _handle_call(self, msg: Call) -> None:
        """The library's `ChargePoint._handle_call`, with the same answers, cheaper per message.

        Schema checks are compiled (`validate_payload`), key conversions remembered,
        and no `inspect.signature` per message: every handler here takes
        `call_unique_id`. A handler's exception becomes a CallError, as in the library.
        """
        handlers = self.route_map[msg.action]
        await validate_payload(msg, self._ocpp_version)
        payload = snake_case(msg.payload)
        try:
            response = handlers["_on_action"](**payload, call_unique_id=msg.unique_id)
            if inspect.isawaitable(response):
                response = await response
        except Exception as error:
            if isinstance(error, OCPPError):
                LOGGER.warning("%s %s %s: %s", self.id, msg.action, msg.unique_id, error)
            else:
                LOGGER.exception("%s %s %s failed", self.id, msg.action, msg.unique_id)
            await self._send(msg.create_call_error(error).to_json())
            return
        answer = snake_to_camel_case(remove_nones(serialize_as_dict(response)))
        result = msg.create_call_result(answer)
        await validate_payload(result, self._ocpp_version)
        await self._send(result.to_json())
        after_action = handlers.get("_after_action")
        if after_action is not None:
            outcome = after_action(**payload, call_unique_id=msg.unique_id)
            if inspect.iscoroutine(outcome):
                self._gateway._spawn(outcome)

    async def call_checked(self, payload: Any, unique_id: str) -> Any:
        """`call` (CallErrors raised), the request and the answer checked by the compiled
        schemas instead of the library's validator.

        The library validates a SetChargingProfile and its answer in ~0.45 ms against
        ~0.01 compiled; a fleet-wide setpoint change sends one to every station at once,
        in front of their MeterValues on the gateway's event loop.

        Raises:
            OCPPError: the station answered with a CallError.
            MalformedAnswer: the station's answer is not what its schema allows.
        """
        action = type(payload).__name__
        request = remove_nones(snake_to_camel_case(serialize_as_dict(payload)))
        await validate_payload(Call(unique_id, action, request), self._ocpp_version)
        try:
            answer = await self.call(
                payload, unique_id=unique_id, suppress=False, skip_schema_validation=True
            )
        except TypeError as error:  # fields the answer's dataclass does not have
            raise MalformedAnswer(f"{action} answer: {error}") from None
        result = remove_nones(snake_to_camel_case(serialize_as_dict(answer)))
        try:
            await validate_payload(CallResult(unique_id, result, action), self._ocpp_version)
        except OCPPError as error:
            cause = (error.details or {}).get("cause") or error.description
            raise MalformedAnswer(f"{action} answer {json.dumps(result)}: {cause}") from None
        return answer

    async def _refuse(self, unique_id: str, action: str, error: OCPPError) -> None:
        cause = (error.details or {}).get("cause") or error.description
        await self._gateway._record_message_rejected(
            self.id, action, unique_id, error.code, f"{error.code}: {cause}"
        )
        reply = CallError(unique_id or "-1", error.code, error.description, {"cause": str(cause)})
        await self._send(reply.to_json())

    async def _submit(
        self, action: str, unique_id: str, build: Callable[[], list[Command]]
    ) -> None:
        """Build the commands for one message and submit them; bad content is a rejection."""
        try:
            commands = build()
        except (ValueError, KeyError, TypeError) as error:
            reason = f"PropertyConstraintViolation: {_clean(error, 900)}"
            await self._gateway._record_message_rejected(
                self.id, action, unique_id, "PropertyConstraintViolation", reason
            )
            raise PropertyConstraintViolationError(details={"cause": _clean(error, 300)}) from None
        # Each station message starts a trace (when a tracer is configured) that the
        # hosts continue and hand on in the events' metadata. Without one, the span
        # would be a no-op that still cost ~7 % of a busy gateway: skip it.
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            await self._gateway._submit(commands)
            return
        with continued(
            "", f"ocpp.{action}", {"station_id": self.id, "unique_id": unique_id}
        ) as span:
            traceparent = traceparent_of(span)
            if traceparent:
                commands = [c.model_copy(update={"traceparent": traceparent}) for c in commands]
            await self._gateway._submit(commands)

    def _ids(self, unique_id: str) -> Callable[[int | str], str]:
        base = f"{self.id}:{unique_id}"
        return lambda n: base if n == 0 else f"{base}#{n}"

    # --- handlers ---------------------------------------------------------------------

    @on(Action.boot_notification)
    async def csms_on_boot(
        self, charging_station: dict[str, Any], reason: str, call_unique_id: str, **_: Any
    ) -> Any:
        now = self._gateway._now()
        await self._submit(
            "BootNotification",
            call_unique_id,
            lambda: [
                RecordBoot(
                    command_id=self._ids(call_unique_id)(0),
                    issued_at=now,
                    charger_id=self.id,
                    vendor=charging_station["vendor_name"],
                    model=charging_station["model"],
                    firmware_version=charging_station.get("firmware_version", ""),
                    serial_number=charging_station.get("serial_number", ""),
                    reason=reason,
                    ocpp_version=self._ocpp_version,
                )
            ],
        )
        return self._call_result.BootNotification(
            current_time=_iso(now),
            interval=self._gateway.heartbeat_interval_s,
            status="Accepted",
        )

    @after(Action.boot_notification)
    def csms_after_boot(self, **_: Any) -> None:
        # A rebooted station lost its profiles: send the setpoints in force again.
        self._gateway._spawn(self._gateway._resync(self.id))

    @on(Action.heartbeat)
    async def csms_on_heartbeat(self, call_unique_id: str, **_: Any) -> Any:
        now = self._gateway._now()
        await self._submit(
            "Heartbeat",
            call_unique_id,
            lambda: [
                RecordHeartbeat(
                    command_id=self._ids(call_unique_id)(0), issued_at=now, charger_id=self.id
                )
            ],
        )
        return self._call_result.Heartbeat(current_time=_iso(now))

    @on(Action.status_notification)
    async def csms_on_status(
        self,
        timestamp: str,
        connector_status: str,
        evse_id: int,
        connector_id: int,
        call_unique_id: str,
        **_: Any,
    ) -> Any:
        now = self._gateway._now()
        await self._submit(
            "StatusNotification",
            call_unique_id,
            lambda: [
                RecordStatus(
                    command_id=self._ids(call_unique_id)(0),
                    issued_at=now,
                    charger_id=self.id,
                    evse_id=evse_id,
                    connector_id=connector_id,
                    status=connector_status,
                    reported_at=_parse_time(timestamp),
                )
            ],
        )
        return self._call_result.StatusNotification()

    @on(Action.authorize)
    async def csms_on_authorize(
        self, id_token: dict[str, Any], call_unique_id: str, **_: Any
    ) -> Any:
        status = "Accepted" if self._gateway._authorize(self.id, id_token) else "Invalid"
        await self._submit(
            "Authorize",
            call_unique_id,
            lambda: [
                RecordAuthorization(
                    command_id=self._ids(call_unique_id)(0),
                    issued_at=self._gateway._now(),
                    charger_id=self.id,
                    id_token=id_token["id_token"],
                    token_type=id_token["type"],
                    status=status,
                )
            ],
        )
        return self._call_result.Authorize(id_token_info={"status": status})

    @on(Action.transaction_event)
    async def csms_on_transaction_event(
        self,
        event_type: str,
        timestamp: str,
        trigger_reason: str,
        seq_no: int,
        transaction_info: dict[str, Any],
        call_unique_id: str,
        evse: dict[str, Any] | None = None,
        id_token: dict[str, Any] | None = None,
        meter_value: list[dict[str, Any]] | None = None,
        **_: Any,
    ) -> Any:
        now = self._gateway._now()
        station = self._gateway._station(self.id)
        tx = transaction_info["transaction_id"]
        evse_id = evse["id"] if evse else station.transaction_evse.get(tx)
        token = id_token["id_token"] if id_token else ""
        ids = self._ids(call_unique_id)

        def build() -> list[Command]:
            commands: list[Command] = [
                RecordTransactionEvent(
                    command_id=ids(0),
                    issued_at=now,
                    charger_id=self.id,
                    event_type=event_type,
                    transaction_id=tx,
                    seq_no=seq_no,
                    evse_id=evse_id,
                    id_token=token,
                    trigger_reason=trigger_reason,
                    stopped_reason=transaction_info.get("stopped_reason", ""),
                    reported_at=_parse_time(timestamp),
                )
            ]
            for n, value in enumerate(meter_value or [], start=1):
                commands.append(
                    RecordMeterValues(
                        command_id=ids(n),
                        issued_at=now,
                        charger_id=self.id,
                        evse_id=evse_id or 0,
                        transaction_id=tx,
                        **_meter_fields(value),
                    )
                )
            return commands

        await self._submit("TransactionEvent", call_unique_id, build)
        station.note_transaction(event_type, tx, evse_id, token)
        if id_token:
            return self._call_result.TransactionEvent(id_token_info={"status": "Accepted"})
        return self._call_result.TransactionEvent()

    @on(Action.meter_values)
    async def csms_on_meter_values(
        self, evse_id: int, meter_value: list[dict[str, Any]], call_unique_id: str, **_: Any
    ) -> Any:
        now = self._gateway._now()
        ids = self._ids(call_unique_id)
        tx = self._gateway._station(self.id).evse_transaction.get(evse_id, "")
        await self._submit(
            "MeterValues",
            call_unique_id,
            lambda: [
                RecordMeterValues(
                    command_id=ids(n),
                    issued_at=now,
                    charger_id=self.id,
                    evse_id=evse_id,
                    transaction_id=tx,
                    **_meter_fields(value),
                )
                for n, value in enumerate(meter_value)
            ],
        )
        return self._call_result.MeterValues()

    @on(Action.notify_ev_charging_needs)
    async def csms_on_charging_needs(
        self, charging_needs: dict[str, Any], evse_id: int, call_unique_id: str, **_: Any
    ) -> Any:
        now = self._gateway._now()
        ids = self._ids(call_unique_id)
        token = self._gateway._station(self.id).evse_id_token.get(evse_id, "")

        def build() -> list[Command]:
            departure = charging_needs.get("departure_time")
            departure_at = None if departure is None else _parse_time(departure)
            energy_kwh = _needs_energy_kwh(charging_needs)
            commands: list[Command] = [
                RecordChargingNeeds(
                    command_id=ids(0),
                    issued_at=now,
                    charger_id=self.id,
                    evse_id=evse_id,
                    requested_energy_transfer=charging_needs["requested_energy_transfer"],
                    departure_at=departure_at,
                    energy_kwh=energy_kwh,
                    id_token=token,
                )
            ]
            report = ChargingNeedsReport(
                self.id, evse_id, token, departure_at, energy_kwh, ids("trip"), now
            )
            trip = self._gateway._plan_trip(report)
            if trip is not None:
                commands.append(trip)
            return commands

        await self._submit("NotifyEVChargingNeeds", call_unique_id, build)
        return self._call_result.NotifyEVChargingNeeds(status="Accepted")


def _unique_id_of(raw_msg: str | bytes) -> str:
    """The message id of a frame the library could not unpack, if one can be read."""
    try:
        frame = json.loads(raw_msg)
    except (ValueError, TypeError):
        return ""
    if isinstance(frame, list) and len(frame) > 1 and isinstance(frame[1], str):
        return _clean(frame[1], 36)
    return ""


class _Csms201(_CsmsChargePoint, v201.ChargePoint):
    pass


class _Csms21(_CsmsChargePoint, v21.ChargePoint):
    @on(Action.notify_allowed_energy_transfer)
    async def csms_on_allowed_energy_transfer(
        self,
        allowed_energy_transfer: list[str],
        transaction_id: str,
        call_unique_id: str,
        **_: Any,
    ) -> Any:
        await self._submit(
            "NotifyAllowedEnergyTransfer",
            call_unique_id,
            lambda: [
                RecordAllowedEnergyTransfer(
                    command_id=self._ids(call_unique_id)(0),
                    issued_at=self._gateway._now(),
                    charger_id=self.id,
                    transaction_id=transaction_id,
                    modes=tuple(allowed_energy_transfer),
                )
            ],
        )
        return self._call_result.NotifyAllowedEnergyTransfer(status="Accepted")


class OcppCsmsGateway:
    """A CSMS for OCPP 2.0.1 and 2.1 stations, submitting what they say to a `CommandSink`.

    Args:
        sink: where commands go (the runtime's router; `RecordingSink` in tests).
        stations: the allow-list, station id -> `StationCredentials` (or a password).
        gateway_id: names the stream of rejections, `ocpp-gateway-{gateway_id}`.
        host, port: where to listen; port 0 asks the OS for a free port (see `port`).
        ssl_context: a server `ssl.SSLContext` turns on security profile 2 (TLS + Basic
            auth; plaintext is refused). Its `sslobject_class` is replaced so that
            failed TLS handshakes (plaintext included) are recorded.
        heartbeat_interval_s: the interval told to stations at boot.
        offline_grace_s: a station silent for interval + grace is marked offline.
        ping_interval_s: how often the gateway pings each connection (WebSocket ping;
            no pong within the same time closes it). Default: interval + grace, the
            horizon at which silence is already noticed. OCPP leaves pinging to the
            station (`WebSocketPingInterval`), whose pings are answered in any case;
            at 10,000 stations websockets' default of 20 s was ~9 % of a gateway's CPU.
        watchdog_period_s: how often silence is checked.
        setpoint_timeout_s: how long a station may take to answer SetChargingProfile.
        trip_planner: turns a charging-needs report into the vehicle's PlanTrip command.
        on_offline: called with the station id when it is marked offline.
        authorize: `(station_id, id_token) -> bool`; every token is accepted by default.
        clock: the time source (UTC-aware), replaceable in tests.

    Example::

        gateway = OcppCsmsGateway(sink, {"CS-001": StationCredentials("s3cret")}, port=8080)
        async with gateway:
            await gateway.send_setpoint("CS-001", 1, -7.4, valid_until)

    Raises:
        OSError: from `start()` when the port cannot be bound.
    """

    def __init__(
        self,
        sink: CommandSink,
        stations: Mapping[str, StationCredentials | str],
        *,
        gateway_id: str = "csms",
        host: str = "127.0.0.1",
        port: int = 8080,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_interval_s: int = 60,
        offline_grace_s: float = 30.0,
        ping_interval_s: float | None = None,
        watchdog_period_s: float = 1.0,
        setpoint_timeout_s: float = 10.0,
        trip_planner: TripPlanner | None = None,
        on_offline: OfflineHook | None = None,
        authorize: Callable[[str, dict[str, Any]], bool] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._sink = sink
        self._credentials = {
            sid: c if isinstance(c, StationCredentials) else StationCredentials(c)
            for sid, c in stations.items()
        }
        self.gateway_id = gateway_id
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self.heartbeat_interval_s = heartbeat_interval_s
        self._offline_after_s = heartbeat_interval_s + offline_grace_s
        self._ping_interval_s = ping_interval_s or self._offline_after_s
        self._watchdog_period_s = watchdog_period_s
        self._setpoint_timeout_s = setpoint_timeout_s
        self._trip_planner = trip_planner
        self._on_offline = on_offline
        self._authorize_hook = authorize
        self._clock = clock or (lambda: datetime.now(UTC))
        self._stations: dict[str, _Station] = {}
        self._accepted: dict[ServerConnection, tuple[str, str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Server | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.rejected_connections = 0
        self.rejected_messages = 0

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for stations and start the liveness watchdog."""
        if self._ssl is not None:
            self._ssl.sslobject_class = _tls_watch(self._tls_failed)
        self._server = await serve(
            self._serve_station,
            self._host,
            self._port,
            subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
            process_request=self._check_handshake,
            ping_interval=self._ping_interval_s,
            ping_timeout=self._ping_interval_s,
            ssl=self._ssl,
            compression=None,
        )
        self._watchdog = asyncio.create_task(self._watch_liveness())

    async def stop(self) -> None:
        """Close every connection, stop listening and finish the gateway's own tasks."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> OcppCsmsGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port actually bound (useful with port=0)."""
        assert self._server is not None, "start() the gateway first"
        return int(self._server.sockets[0].getsockname()[1])

    def connected(self, station_id: str) -> bool:
        station = self._stations.get(station_id)
        return station is not None and station.cp is not None

    def online(self, station_id: str) -> bool:
        station = self._stations.get(station_id)
        return station is not None and station.online

    def last_seen_at(self, station_id: str) -> datetime | None:
        """When the station last said anything (None: never); keys the offline hook's ids."""
        station = self._stations.get(station_id)
        return None if station is None else station.last_seen_at

    # --- setpoints ------------------------------------------------------------------

    async def send_setpoint(
        self,
        station_id: str,
        evse_id: int,
        power_kw: float,
        valid_until: datetime,
        traceparent: str = "",
    ) -> SetpointOutcome:
        """Ask a station for `power_kw` on `evse_id` until `valid_until` (SetChargingProfile).

        On 2.0.1 the profile is a charge limit, so a negative setpoint is refused
        without a call; on 2.1 it is a CentralSetpoint V2X profile (negative setpoint =
        discharge). The station's answer is recorded as `RecordSetpointSent` or
        `RecordSetpointRejected` (station refused / timeout / station offline). The
        setpoint is remembered and sent again when the station reconnects or reboots.

        Raises:
            KeyError: the station is not in the allow-list.
        """
        if station_id not in self._credentials:
            raise KeyError(f"unknown station {station_id!r}")
        station = self._station(station_id)
        if not (station.version == "2.0.1" and power_kw < 0):
            station.desired[evse_id] = (power_kw, valid_until)
        # continues the trace of the setpoint decision; what the station answers is
        # recorded with it (see `_submit`)
        attributes = {"station_id": station_id, "evse_id": evse_id, "power_kw": power_kw}
        with continued(traceparent, "ocpp.SetChargingProfile", attributes) as span:
            token = _TRACE.set(handed_on(span, traceparent))
            try:
                return await self._push_setpoint(station, evse_id, power_kw, valid_until)
            finally:
                _TRACE.reset(token)

    async def _push_setpoint(
        self, station: _Station, evse_id: int, power_kw: float, valid_until: datetime
    ) -> SetpointOutcome:
        unique_id = str(uuid.uuid4())
        command_id = f"{station.station_id}:{unique_id}"
        cp = station.cp
        if cp is None:
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station offline", "not connected"
            )
        if cp._ocpp_version == "2.0.1" and power_kw < 0:
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station speaks 2.0.1: no discharge"
            )
        profile = self._profile(station, cp._ocpp_version, evse_id, power_kw, valid_until)
        try:
            answer = await cp.call_checked(
                cp._call.SetChargingProfile(evse_id=evse_id, charging_profile=profile), unique_id
            )
        except TimeoutError:
            detail = f"no answer within {self._setpoint_timeout_s} s"
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "timeout", detail
            )
        except OCPPError as error:
            detail = _clean(f"CallError {error.code}: {error.description}", 500)
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station refused", detail
            )
        except MalformedAnswer as error:
            detail = _clean(f"malformed answer: {error}", 500)
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station refused", detail
            )
        except ConnectionClosed:
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station offline", "connection closed"
            )
        if answer.status != "Accepted":
            info = answer.status_info or {}
            detail = _clean(f"{answer.status} {info.get('reason_code', '')}".strip(), 500)
            return await self._setpoint_rejected(
                station, command_id, evse_id, power_kw, "station refused", detail
            )
        await self._submit(
            [
                RecordSetpointSent(
                    command_id=command_id,
                    issued_at=self._now(),
                    charger_id=station.station_id,
                    evse_id=evse_id,
                    power_kw=power_kw,
                    valid_until=valid_until,
                    profile_id=PROFILE_ID_BASE + evse_id,
                )
            ]
        )
        return SetpointOutcome(accepted=True, command_id=command_id)

    def _profile(
        self, station: _Station, version: str, evse_id: int, power_kw: float, valid_until: datetime
    ) -> dict[str, Any]:
        now = self._now()
        power_w = round(power_kw * 1000.0, 1)
        if version == "2.1":
            period: dict[str, Any] = {
                "start_period": 0,
                "operation_mode": "CentralSetpoint",
                "setpoint": power_w,
                "limit": max(power_w, 0.0),
                "discharge_limit": min(power_w, 0.0),
            }
        else:
            period = {"start_period": 0, "limit": power_w}
        transaction_id = station.evse_transaction.get(evse_id)
        profile: dict[str, Any] = {
            "id": PROFILE_ID_BASE + evse_id,
            "stack_level": 1,
            "charging_profile_purpose": "TxProfile" if transaction_id else "TxDefaultProfile",
            "charging_profile_kind": "Absolute",
            "valid_to": _iso(valid_until),
            "charging_schedule": [
                {
                    "id": PROFILE_ID_BASE + evse_id,
                    "charging_rate_unit": "W",
                    "start_schedule": _iso(now),
                    "duration": max(1, math.ceil((valid_until - now).total_seconds())),
                    "charging_schedule_period": [period],
                }
            ],
        }
        if transaction_id:
            profile["transaction_id"] = transaction_id
        return profile

    async def _setpoint_rejected(
        self,
        station: _Station,
        command_id: str,
        evse_id: int,
        power_kw: float,
        reason: SetpointRejectionReason,
        detail: str = "",
    ) -> SetpointOutcome:
        await self._submit(
            [
                RecordSetpointRejected(
                    command_id=command_id,
                    issued_at=self._now(),
                    charger_id=station.station_id,
                    evse_id=evse_id,
                    power_kw=power_kw,
                    reason=reason,
                    detail=detail,
                )
            ]
        )
        return SetpointOutcome(False, command_id, reason, detail)

    async def _resync(self, station_id: str) -> None:
        station = self._station(station_id)
        now = self._now()
        for evse_id, (power_kw, valid_until) in sorted(station.desired.items()):
            if valid_until > now and station.cp is not None:
                await self._push_setpoint(station, evse_id, power_kw, valid_until)

    # --- handshake ------------------------------------------------------------------

    async def _check_handshake(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path.rstrip("/")
        station_id = unquote(path.rsplit("/", 1)[-1])
        try:
            subprotocol = self._negotiate(request.headers)
            credentials = self._credentials.get(station_id)
            if credentials is None:
                raise _Refused(HTTPStatus.NOT_FOUND, f"unknown station {station_id!r}")
            if not credentials.enabled:
                raise _Refused(HTTPStatus.FORBIDDEN, f"station {station_id!r} is blocked")
            self._check_basic_auth(request.headers, station_id, credentials)
        except _Refused as refused:
            key = request.headers.get("Sec-WebSocket-Key") or uuid.uuid4().hex
            await self._record_connection_rejected(
                f"{self.gateway_id}:handshake:{key}",
                station_id,
                int(refused.status),
                refused.reason,
                _peer(connection),
            )
            response = connection.respond(refused.status, refused.reason + "\n")
            if refused.status == HTTPStatus.UNAUTHORIZED:
                response.headers["WWW-Authenticate"] = build_www_authenticate_basic("OCPP")
            return response
        self._accepted[connection] = (station_id, _VERSION_OF[subprotocol])
        return None

    @staticmethod
    def _negotiate(headers: Headers) -> str:
        offered = {
            item.strip()
            for value in headers.get_all("Sec-WebSocket-Protocol")
            for item in value.split(",")
        }
        for subprotocol in SUBPROTOCOLS:
            if subprotocol in offered:
                return subprotocol
        raise _Refused(
            HTTPStatus.BAD_REQUEST,
            f"no supported OCPP subprotocol offered (expected one of {', '.join(SUBPROTOCOLS)})",
        )

    @staticmethod
    def _check_basic_auth(
        headers: Headers, station_id: str, credentials: StationCredentials
    ) -> None:
        header = headers.get("Authorization")
        if header is None:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "missing credentials (HTTP Basic required)")
        try:
            username, password = parse_authorization_basic(header)
        except InvalidHeader:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "malformed Authorization header") from None
        if username != station_id:
            raise _Refused(HTTPStatus.UNAUTHORIZED, "username does not match the station id")
        if not hmac.compare_digest(password.encode(), credentials.password.encode()):
            raise _Refused(HTTPStatus.UNAUTHORIZED, "wrong password")

    def _tls_failed(self, error: ssl.SSLError) -> None:
        if error.reason == "HTTP_REQUEST":
            reason = "plaintext HTTP on a TLS endpoint: security profile 2 requires TLS"
        else:
            reason = _clean(f"TLS handshake failed: {error.reason or error}", 400)
        command_id = f"{self.gateway_id}:tls:{uuid.uuid4().hex}"
        self._spawn(self._record_connection_rejected(command_id, "", None, reason, ""))

    async def _serve_station(self, connection: ServerConnection) -> None:
        station_id, version = self._accepted.pop(connection)
        station = self._station(station_id)
        if station.connection is not None:
            LOGGER.warning("%s connected again; closing its previous connection", station_id)
            self._spawn(station.connection.close())
        cls = _Csms21 if version == "2.1" else _Csms201
        cp = cls(station_id, connection, gateway=self, response_timeout=self._setpoint_timeout_s)
        station.cp, station.connection, station.version = cp, connection, version
        await self._heard_from(station_id, new_connection=True)
        try:
            await cp.start()
        except ConnectionClosed:
            pass
        finally:
            if station.cp is cp:
                station.cp, station.connection = None, None

    # --- liveness -------------------------------------------------------------------

    async def _heard_from(self, station_id: str, new_connection: bool = False) -> None:
        station = self._station(station_id)
        station.last_seen = asyncio.get_running_loop().time()
        station.last_seen_at = self._now()
        if station.online and not new_connection:
            return
        station.online = True
        await self._submit(
            [
                MarkOnline(
                    command_id=f"{station_id}:online:{_iso(station.last_seen_at)}",
                    issued_at=station.last_seen_at,
                    charger_id=station_id,
                )
            ]
        )
        self._spawn(self._resync(station_id))

    async def _watch_liveness(self) -> None:
        while True:
            await asyncio.sleep(self._watchdog_period_s)
            now = asyncio.get_running_loop().time()
            for station in list(self._stations.values()):
                if station.online and now - station.last_seen > self._offline_after_s:
                    await self._mark_offline(station)

    async def _mark_offline(self, station: _Station) -> None:
        station.online = False
        last_seen_at = station.last_seen_at or self._now()
        try:
            await self._submit(
                [
                    MarkOffline(
                        command_id=f"{station.station_id}:offline:{_iso(last_seen_at)}",
                        issued_at=self._now(),
                        charger_id=station.station_id,
                        last_seen_at=last_seen_at,
                    )
                ]
            )
        except Exception:
            LOGGER.exception("could not record %s offline", station.station_id)
        if self._on_offline is not None:
            outcome = self._on_offline(station.station_id)
            if inspect.isawaitable(outcome):
                await outcome

    # --- plumbing -------------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock()

    def _station(self, station_id: str) -> _Station:
        if station_id not in self._stations:
            self._stations[station_id] = _Station(station_id)
        return self._stations[station_id]

    def _authorize(self, station_id: str, id_token: dict[str, Any]) -> bool:
        return True if self._authorize_hook is None else self._authorize_hook(station_id, id_token)

    def _plan_trip(self, report: ChargingNeedsReport) -> Command | None:
        return None if self._trip_planner is None else self._trip_planner(report)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            LOGGER.error("gateway task failed", exc_info=task.exception())

    async def _submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        trace = _TRACE.get()
        if trace:
            commands = [
                c if c.traceparent else c.model_copy(update={"traceparent": trace})
                for c in commands
            ]
        results = await self._sink.submit(commands)
        for result in results:
            if not result.ok:
                LOGGER.warning("%s refused: %s", result.command_id, result.reason)
        return results

    async def _record_connection_rejected(
        self, command_id: str, station_id: str, status: int | None, reason: str, peer: str
    ) -> None:
        self.rejected_connections += 1
        LOGGER.warning("refused connection %r from %s: %s", station_id, peer, reason)
        try:
            await self._submit(
                [
                    RecordConnectionRejected(
                        command_id=_clean(command_id, 200),
                        issued_at=self._now(),
                        gateway_id=self.gateway_id,
                        station_id=_clean(station_id, 200),
                        http_status=status,
                        reason=_clean(reason, 500),
                        peer=peer,
                    )
                ]
            )
        except Exception:
            LOGGER.exception("could not record a refused connection")

    async def _record_message_rejected(
        self, station_id: str, action: str, unique_id: str, error_code: str, reason: str
    ) -> None:
        self.rejected_messages += 1
        suffix = _clean(unique_id, 100) if unique_id else f"unparsable-{uuid.uuid4().hex}"
        LOGGER.warning("refused %s %s from %s: %s", action, unique_id, station_id, reason)
        await self._submit(
            [
                RecordMessageRejected(
                    command_id=f"{station_id}:{suffix}:rejected"[:200],
                    issued_at=self._now(),
                    gateway_id=self.gateway_id,
                    station_id=station_id,
                    action=_clean(action, 100),
                    unique_id=_clean(unique_id, 100),
                    error_code=error_code,
                    reason=_clean(reason, 1000),
                )
            ]
        )


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else ""


def _tls_watch(on_failure: Callable[[ssl.SSLError], None]) -> type[ssl.SSLObject]:
    """An SSLObject class that reports failed server handshakes (plaintext included)."""

    class _WatchedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as error:
                on_failure(error)
                raise

    return _WatchedSSLObject


__all__ = [
    "PROFILE_ID_BASE",
    "SUBPROTOCOLS",
    "ChargingNeedsReport",
    "OcppCsmsGateway",
    "OfflineHook",
    "SetpointOutcome",
    "StationCredentials",
    "TripPlanner",
]
