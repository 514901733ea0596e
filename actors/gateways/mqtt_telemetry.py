"""Vehicle telemetry over MQTT (aiomqtt): one message, one telemetry command.

Topic: `v2g/<site_id>/vehicles/<vehicle_id>/telemetry`, QoS 1, JSON payload

    {"soc": 0.62, "battery_temp_c": 24.5, "soh": 0.93,
     "measured_at": "2026-11-29T17:00:00Z", "seq": 1234}

(`seq` optional; unknown extra fields are ignored). See `docs/mqtt.md`.

Each valid message becomes the vehicle's telemetry command (by default
`actors.vehicle.ReportTelemetry`, or any factory with the same keyword
arguments) with `command_id = "telemetry:<vehicle_id>:<measured_at UTC>[:<seq>]"`,
so a QoS 1 redelivery yields the same id and the host records it once.

A message that cannot become a command (not JSON, out-of-range values, a topic
that is not a telemetry topic, a vehicle outside `known_vehicles`, or a command the
sink rejects, e.g. `UnknownEntity`) is counted by reason, logged, and submitted as
`RecordTelemetryRejection` on stream `telemetry-rejections-<site_id>`; it changes no
vehicle state.

Several ingest processes split one stream with an MQTT v5 shared subscription
(`shared_group="ingest"` subscribes to `$share/ingest/v2g/+/vehicles/+/telemetry`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from actors.gateways.sink import CommandSink
from actors.telemetry import RecordTelemetryRejection
from events.base import Command

log = logging.getLogger(__name__)

TOPIC_PREFIX = "v2g"

TelemetryCommandFactory = Callable[..., Command]
"""Called as `factory(vehicle_id=, soc=, battery_temp_c=, soh=, measured_at=,
command_id=, issued_at=, correlation_id=)`; `ReportTelemetry` itself qualifies."""


def telemetry_topic(site_id: str, vehicle_id: str) -> str:
    return f"{TOPIC_PREFIX}/{site_id}/vehicles/{vehicle_id}/telemetry"


def telemetry_filter(site_id: str = "+", shared_group: str | None = None) -> str:
    """The subscription filter; with `shared_group`, an MQTT v5 shared subscription."""
    topic = f"{TOPIC_PREFIX}/{site_id}/vehicles/+/telemetry"
    return f"$share/{shared_group}/{topic}" if shared_group else topic


class TelemetryPayload(BaseModel):
    """The JSON body of one telemetry message."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    soc: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    battery_temp_c: float = Field(ge=-40.0, le=100.0, allow_inf_nan=False)
    soh: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    measured_at: AwareDatetime
    seq: int | None = Field(default=None, ge=0)


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect; the same for the gateway and the publisher simulator.

    For a production broker set `port=8883`, `tls_context=ssl.create_default_context()`
    (or `tls_params` with your CA and client certificate) and `username`/`password`.
    """

    hostname: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    tls_params: aiomqtt.TLSParameters | None = None
    keepalive_s: int = 30

    def client(
        self,
        identifier: str | None = None,
        *,
        clean_start: bool | int = True,
        session_expiry_s: int = 0,
        max_queued_incoming: int = 0,
    ) -> aiomqtt.Client:
        properties = None
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
        return aiomqtt.Client(
            self.hostname,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=self.keepalive_s,
            clean_start=clean_start,
            properties=properties,
            tls_context=self.tls_context,
            tls_params=self.tls_params,
            max_queued_incoming_messages=max_queued_incoming,
        )


@dataclass
class TelemetryStats:
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    sink_errors: int = 0
    connects: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class _Rejected(Exception):
    def __init__(self, kind: str, reason: str, vehicle_id: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.vehicle_id = vehicle_id


def resolve_telemetry_factory() -> TelemetryCommandFactory:
    """`actors.vehicle.ReportTelemetry`, imported when the gateway is built.

    Raises:
        ImportError: the vehicle module does not define it; pass `command_factory`.
    """
    try:
        from actors.vehicle import ReportTelemetry  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ImportError(
            "actors.vehicle.ReportTelemetry is not available; pass command_factory="
        ) from exc
    factory: TelemetryCommandFactory = ReportTelemetry
    return factory


class MqttTelemetryGateway:
    """Subscribes to vehicle telemetry and submits one command per message.

    Args:
        sink: where commands go.
        broker: connection settings (host, port, auth, TLS).
        site_id: `+` for every site, or one site.
        shared_group: MQTT v5 shared-subscription group; processes with the same
            group split the stream (each message goes to one of them).
        known_vehicles: if given, telemetry for any other vehicle is rejected here.
        command_factory: builds the telemetry command; default `ReportTelemetry`.
        client_id: MQTT client id (stable across reconnects); default random.
        session_expiry_s: broker keeps the session (and queues QoS 1 messages) this
            long while the gateway is away; 0 for no persistent session.
        resume_session: start by resuming an existing session instead of a clean one.
        max_batch: most commands handed to the sink in one `submit`.
        submit_rejections: also send `RecordTelemetryRejection` to the sink.
        manual_ack: acknowledge a QoS 1 message only once the sink has answered for
            its batch (paho's manual ack), so a process that dies before that gets
            it redelivered by the broker (with a persistent session). A batch the
            sink could not take is not acknowledged: the gateway reconnects and the
            broker sends it again.
        backoff_initial_s, backoff_max_s: reconnect backoff (doubling, capped).

    Example:

        gateway = MqttTelemetryGateway(sink, BrokerSettings("127.0.0.1", 1883),
                                       shared_group="ingest")
        task = asyncio.create_task(gateway.run())
        ...
        await gateway.stop(); await task
    """

    def __init__(
        self,
        sink: CommandSink,
        broker: BrokerSettings,
        *,
        site_id: str = "+",
        shared_group: str | None = None,
        known_vehicles: Collection[str] | None = None,
        command_factory: TelemetryCommandFactory | None = None,
        client_id: str | None = None,
        session_expiry_s: int = 0,
        resume_session: bool = False,
        max_batch: int = 500,
        submit_rejections: bool = True,
        manual_ack: bool = True,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        subscribe_timeout_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.sink = sink
        self.broker = broker
        self.topic_filter = telemetry_filter(site_id, shared_group)
        self.known_vehicles = frozenset(known_vehicles) if known_vehicles is not None else None
        self.command_factory = command_factory or resolve_telemetry_factory()
        self.client_id = client_id or f"v2g-telemetry-{uuid.uuid4().hex[:12]}"
        self.session_expiry_s = session_expiry_s
        self.resume_session = resume_session
        self.max_batch = max_batch
        self.submit_rejections = submit_rejections
        self.manual_ack = manual_ack
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.subscribe_timeout_s = subscribe_timeout_s
        self.clock = clock
        self.stats = TelemetryStats()
        self.subscribed = asyncio.Event()
        self._stopping = asyncio.Event()

    # --- message → command -----------------------------------------------------

    def to_command(self, topic: str, payload: bytes) -> Command:
        """The telemetry command for one message.

        Raises:
            _Rejected: with `kind` (topic, json, payload, unknown_vehicle) and reason.
        """
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != TOPIC_PREFIX or parts[2:5:2] != ["vehicles", "telemetry"]:
            raise _Rejected("topic", f"not a telemetry topic: {topic!r}")
        vehicle_id = parts[3]
        if not _valid_id(vehicle_id):
            raise _Rejected("topic", f"invalid vehicle id in topic: {vehicle_id!r}")
        if self.known_vehicles is not None and vehicle_id not in self.known_vehicles:
            raise _Rejected("unknown_vehicle", f"unknown vehicle {vehicle_id!r}", vehicle_id)
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Rejected("json", f"malformed JSON: {exc}", vehicle_id) from None
        if not isinstance(body, dict):
            raise _Rejected("json", "payload is not a JSON object", vehicle_id)
        try:
            data = TelemetryPayload.model_validate(body)
        except ValidationError as exc:
            reason = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise _Rejected("payload", f"invalid telemetry: {reason}", vehicle_id) from None
        measured_at = data.measured_at.astimezone(UTC)
        command_id = f"telemetry:{vehicle_id}:{measured_at.isoformat()}"
        if data.seq is not None:
            command_id += f":{data.seq}"
        try:
            return self.command_factory(
                vehicle_id=vehicle_id,
                soc=data.soc,
                battery_temp_c=data.battery_temp_c,
                soh=data.soh,
                measured_at=measured_at,
                command_id=command_id,
                issued_at=measured_at,
                correlation_id="",
            )
        except ValidationError as exc:
            reason = f"invalid telemetry: {exc.errors()[0]['msg']}"
            raise _Rejected("payload", reason, vehicle_id) from None

    def _rejection(self, topic: str, payload: bytes, rejected: _Rejected) -> Command:
        digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]
        parts = topic.split("/")
        site_id = parts[1] if len(parts) > 1 and _valid_id(parts[1]) else "unknown"
        excerpt = payload[:200].decode("utf-8", errors="replace")
        return RecordTelemetryRejection(
            site_id=site_id,
            topic=topic[:300],
            vehicle_id=rejected.vehicle_id,
            reason=rejected.reason[:500],
            payload_excerpt="".join(ch if ch.isprintable() else "?" for ch in excerpt),
            command_id=f"telemetry-rejection:{digest}",
            issued_at=self.clock(),
        )

    # --- the loop --------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; reconnect with backoff whenever the broker goes away."""
        self._stopping.clear()
        attempt = 0
        first = not self.resume_session
        while not self._stopping.is_set():
            client = self.broker.client(
                self.client_id,
                clean_start=first,
                session_expiry_s=self.session_expiry_s,
            )
            if self.manual_ack:
                # aiomqtt 2.5 has no option for it; paho 2.x (its engine) does.
                client._client.manual_ack_set(True)
            try:
                async with client:
                    first = False
                    attempt = 0
                    self.stats.connects += 1
                    # A resumed session starts delivering its queue before the SUBACK
                    # arrives behind it: consume while subscribing, or the SUBACK
                    # times out under a backlog and the session is torn down.
                    subscribing = asyncio.ensure_future(
                        client.subscribe(self.topic_filter, qos=1, timeout=self.subscribe_timeout_s)
                    )
                    try:
                        await self._consume(client, subscribing)
                    finally:
                        subscribing.cancel()
            except aiomqtt.MqttError as exc:
                self.subscribed.clear()
                if self._stopping.is_set():
                    break
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2**attempt)
                attempt += 1
                log.warning("telemetry: broker connection lost (%s); retry in %.2f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        self.subscribed.clear()

    async def stop(self) -> None:
        self._stopping.set()

    async def _consume(self, client: aiomqtt.Client, subscribing: asyncio.Future[Any]) -> None:
        messages = client.messages
        stop_task = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                batch: list[aiomqtt.Message] = []
                if not len(messages):  # idle: wait for a message or for stop()
                    next_task = asyncio.ensure_future(anext(messages))
                    waiting = {next_task, stop_task}
                    if not subscribing.done():
                        waiting.add(subscribing)
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    self._check_subscription(subscribing)
                    if next_task not in done and stop_task not in done:
                        next_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await next_task
                        continue
                    if stop_task in done:
                        next_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await next_task
                        return
                    batch.append(next_task.result())
                elif self._stopping.is_set():
                    return
                while len(batch) < self.max_batch:
                    message = _next_queued(client)
                    if message is None:
                        break
                    batch.append(message)
                sink_errors = self.stats.sink_errors
                await self.handle([(m.topic.value, _payload_bytes(m.payload)) for m in batch])
                if self.manual_ack:
                    if self.stats.sink_errors != sink_errors:
                        # Not recorded: leave it unacknowledged and reconnect, so the
                        # broker delivers the batch again.
                        raise aiomqtt.MqttError("the sink did not take a batch; reconnecting")
                    for m in batch:
                        if m.qos > 0:
                            client._client.ack(m.mid, m.qos)
                self._check_subscription(subscribing)
        finally:
            stop_task.cancel()

    def _check_subscription(self, subscribing: asyncio.Future[Any]) -> None:
        if subscribing.done() and not self.subscribed.is_set():
            subscribing.result()  # raises MqttError if the broker refused or timed out
            self.subscribed.set()

    async def handle(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Turn (topic, payload) pairs into commands and rejections; submit them."""
        commands: list[Command] = []
        origins: list[tuple[str, bytes]] = []
        rejections: list[Command] = []
        for topic, payload in messages:
            self.stats.received += 1
            try:
                commands.append(self.to_command(topic, payload))
                origins.append((topic, payload))
            except _Rejected as rejected:
                rejections.append(self._reject(topic, payload, rejected))
        if commands:
            results = await self._submit(commands)
            for (topic, payload), command, result in zip(origins, commands, results, strict=False):
                if not result.ok:
                    vehicle_id = str(getattr(command, "vehicle_id", ""))
                    rejected = _Rejected(
                        "sink", f"rejected by the host: {result.reason}", vehicle_id
                    )
                    rejections.append(self._reject(topic, payload, rejected))
                elif result.duplicate:
                    self.stats.duplicates += 1
                else:
                    self.stats.accepted += 1
        if rejections and self.submit_rejections:
            await self._submit(rejections)

    def _reject(self, topic: str, payload: bytes, rejected: _Rejected) -> Command:
        self.stats.rejected[rejected.kind] += 1
        log.warning("telemetry rejected on %s: %s", topic[:120], rejected.reason)
        return self._rejection(topic, payload, rejected)

    async def _submit(self, commands: list[Command]) -> list[Any]:
        for attempt in range(3):
            try:
                return await self.sink.submit(commands)
            except Exception:
                log.exception("telemetry: sink failed (attempt %d of 3)", attempt + 1)
                await asyncio.sleep(self.backoff_initial_s * 2**attempt)
        self.stats.sink_errors += len(commands)
        return []


def _next_queued(client: aiomqtt.Client) -> aiomqtt.Message | None:
    """A message already received, without awaiting, or None.

    aiomqtt's iterator creates a task and an `asyncio.wait` per message even when
    messages are queued; draining its queue directly doubles the rate a process
    ingests. This reads `Client._queue` (aiomqtt 2.5, pinned in pyproject).
    """
    queue: asyncio.Queue[aiomqtt.Message] = client._queue
    try:
        return queue.get_nowait()
    except asyncio.QueueEmpty:
        return None


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(
        (ch.isascii() and ch.isalnum()) or ch in "_.:-" for ch in value
    )


__all__ = [
    "BrokerSettings",
    "MqttTelemetryGateway",
    "RecordTelemetryRejection",
    "TelemetryCommandFactory",
    "TelemetryPayload",
    "TelemetryStats",
    "resolve_telemetry_factory",
    "telemetry_filter",
    "telemetry_topic",
]
