"""Vehicle telemetry over a real mosquitto on loopback, into a recording sink."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest
from pydantic import AwareDatetime, Field

from actors.decider import CommandResult
from actors.gateways.mqtt_telemetry import (
    BrokerSettings,
    MqttTelemetryGateway,
    RecordTelemetryRejection,
    telemetry_topic,
)
from actors.gateways.sink import RecordingSink
from cluster.mosquitto import Mosquitto
from cluster.simulators.telemetry_publisher import SimulatedVehicle, TelemetryPublisher
from events.base import Command

pytestmark = pytest.mark.network

T0 = datetime(2026, 11, 29, 17, 0, tzinfo=UTC)


class ReportTelemetryStub(Command):
    """Stands in for `actors.vehicle.ReportTelemetry` (same fields)."""

    vehicle_id: str
    soc: float = Field(ge=0, le=1)
    battery_temp_c: float
    soh: float = Field(ge=0, le=1)
    measured_at: AwareDatetime

    @property
    def stream_id(self) -> str:
        return f"vehicle-{self.vehicle_id}"


class HostLikeSink(RecordingSink):
    """Rejects telemetry for vehicles the host never registered, as `UnknownEntity` would."""

    def __init__(self, registered: set[str] | None = None) -> None:
        super().__init__()
        self.registered = registered

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        results: list[CommandResult] = []
        for command in commands:
            vehicle_id = getattr(command, "vehicle_id", None)
            if (
                isinstance(command, ReportTelemetryStub)
                and self.registered is not None
                and vehicle_id not in self.registered
            ):
                results.append(
                    CommandResult(
                        command_id=command.command_id,
                        stream_id=command.stream_id,
                        status="rejected",
                        reason=f"vehicle {vehicle_id!r} is not registered",
                    )
                )
            else:
                results.extend(await super().submit([command]))
        return results


def settings(broker: Mosquitto) -> BrokerSettings:
    return BrokerSettings(broker.host, broker.port, broker.username, broker.password)


def telemetry(soc: float, at: datetime, seq: int | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "soc": soc,
        "battery_temp_c": 24.5,
        "soh": 0.93,
        "measured_at": at.isoformat().replace("+00:00", "Z"),
    }
    if seq is not None:
        body["seq"] = seq
    body.update(extra)
    return json.dumps(body).encode()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def telemetry_commands(sink: RecordingSink) -> list[ReportTelemetryStub]:
    return [c for c in sink.commands if isinstance(c, ReportTelemetryStub)]


def rejections(sink: RecordingSink) -> list[RecordTelemetryRejection]:
    return [c for c in sink.commands if isinstance(c, RecordTelemetryRejection)]


class Running:
    """Start a gateway task, wait for its subscription, stop it on exit."""

    def __init__(self, gateway: MqttTelemetryGateway) -> None:
        self.gateway = gateway
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttTelemetryGateway:
        self.task = asyncio.create_task(self.gateway.run())
        await asyncio.wait_for(self.gateway.subscribed.wait(), 5)
        return self.gateway

    async def __aexit__(self, *exc: object) -> None:
        await self.gateway.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


async def publish(broker: Mosquitto, messages: Sequence[tuple[str, bytes]]) -> None:
    async with settings(broker).client() as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def test_messages_become_telemetry_commands(mosquitto: Mosquitto, arun: Any) -> None:
    async def scenario() -> None:
        sink = HostLikeSink()
        gateway = MqttTelemetryGateway(
            sink, settings(mosquitto), command_factory=ReportTelemetryStub
        )
        async with Running(gateway):
            await publish(
                mosquitto,
                [
                    (telemetry_topic("site-a", "ev-1"), telemetry(0.61, T0, seq=7)),
                    (telemetry_topic("site-a", "ev-2"), telemetry(0.35, T0)),
                    (
                        telemetry_topic("site-b", "ev-1"),
                        telemetry(0.62, T0 + timedelta(seconds=1), seq=8),
                    ),
                ],
            )
            await wait_until(lambda: len(sink.commands) == 3)
        first, second, third = telemetry_commands(sink)
        assert (first.vehicle_id, first.soc, first.battery_temp_c, first.soh) == (
            "ev-1",
            0.61,
            24.5,
            0.93,
        )
        assert first.measured_at == T0 and first.issued_at == T0
        assert first.command_id == "telemetry:ev-1:2026-11-29T17:00:00+00:00:7"
        assert second.command_id == "telemetry:ev-2:2026-11-29T17:00:00+00:00"
        assert third.stream_id == "vehicle-ev-1"
        assert gateway.stats.accepted == 3 and gateway.stats.rejected_total == 0

    arun(scenario())


def test_a_qos1_redelivery_gives_the_same_command_id(mosquitto: Mosquitto, arun: Any) -> None:
    async def scenario() -> None:
        sink = HostLikeSink()
        gateway = MqttTelemetryGateway(
            sink, settings(mosquitto), command_factory=ReportTelemetryStub
        )
        async with Running(gateway):
            message = (telemetry_topic("site-a", "ev-1"), telemetry(0.5, T0, seq=1))
            await publish(mosquitto, [message, message])
            await wait_until(lambda: gateway.stats.received == 2)
        assert len(telemetry_commands(sink)) == 1
        assert gateway.stats.accepted == 1 and gateway.stats.duplicates == 1

    arun(scenario())


def test_malformed_and_unknown_telemetry_is_rejected_and_counted(
    mosquitto: Mosquitto, arun: Any
) -> None:
    async def scenario() -> None:
        sink = HostLikeSink(registered={"ev-1", "ev-2"})
        gateway = MqttTelemetryGateway(
            sink,
            settings(mosquitto),
            known_vehicles={"ev-1", "ev-2", "ev-3"},
            command_factory=ReportTelemetryStub,
        )
        async with Running(gateway):
            await publish(
                mosquitto,
                [
                    (telemetry_topic("site-a", "ev-1"), b"{not json"),
                    (telemetry_topic("site-a", "ev-1"), telemetry(1.5, T0)),
                    (telemetry_topic("site-a", "ev-2"), b'{"soc": 0.5}'),
                    (telemetry_topic("site-a", "ev-2"), telemetry(0.5, T0.replace(tzinfo=None))),
                    (telemetry_topic("site-a", "ev-9"), telemetry(0.5, T0)),  # not known here
                    (telemetry_topic("site-a", "ev-3"), telemetry(0.5, T0)),  # host: not registered
                    (telemetry_topic("site-a", "ev-1"), telemetry(0.5, T0)),  # fine
                ],
            )
            await wait_until(lambda: gateway.stats.received == 7)
            await wait_until(lambda: len(rejections(sink)) == 6)
        assert [c.vehicle_id for c in telemetry_commands(sink)] == ["ev-1"]
        assert gateway.stats.rejected == {
            "json": 1,
            "payload": 3,
            "unknown_vehicle": 1,
            "sink": 1,
        }
        reasons = {r.vehicle_id: r.reason for r in rejections(sink)}
        assert "malformed JSON" in rejections(sink)[0].reason
        assert "soc" in rejections(sink)[1].reason
        assert "unknown vehicle 'ev-9'" in reasons["ev-9"]
        assert "not registered" in reasons["ev-3"]
        assert {r.stream_id for r in rejections(sink)} == {"telemetry-rejections-site-a"}

    arun(scenario())


def test_ingestion_resumes_after_mosquitto_restarts(mosquitto: Mosquitto, arun: Any) -> None:
    async def scenario() -> None:
        sink = HostLikeSink()
        gateway = MqttTelemetryGateway(
            sink,
            settings(mosquitto),
            command_factory=ReportTelemetryStub,
            client_id="ingest-restart-test",
            session_expiry_s=60,
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
        vehicles = [SimulatedVehicle(f"ev-{i}", 60.0, 0.5) for i in range(3)]
        publisher = TelemetryPublisher(
            settings(mosquitto), "site-a", vehicles, {"ev-0": 11.0}, interval_s=0.02
        )
        async with Running(gateway):
            publishing = asyncio.create_task(publisher.run())
            await wait_until(lambda: len(sink.commands) >= 15)
            await asyncio.to_thread(mosquitto.restart, 0.3)
            before = len(sink.commands)
            await wait_until(lambda: len(sink.commands) >= before + 15)
            await publisher.stop()
            await asyncio.wait_for(publishing, 5)
        assert gateway.stats.connects >= 2
        ids = [c.command_id for c in sink.commands]
        assert len(ids) == len(set(ids))
        ev0 = [c for c in telemetry_commands(sink) if c.vehicle_id == "ev-0"]
        assert ev0[-1].soc > ev0[0].soc  # charging at 11 kW

    arun(scenario(), timeout_s=40)


def test_shared_subscription_splits_the_stream_and_auth_is_enforced(
    mosquitto_auth: Mosquitto, arun: Any
) -> None:
    async def scenario() -> None:
        sink = HostLikeSink()
        gateways = [
            MqttTelemetryGateway(
                sink,
                settings(mosquitto_auth),
                shared_group="ingest",
                command_factory=ReportTelemetryStub,
            )
            for _ in range(2)
        ]
        async with Running(gateways[0]), Running(gateways[1]):
            await publish(
                mosquitto_auth,
                [
                    (telemetry_topic("site-a", f"ev-{i % 10}"), telemetry(0.5, T0, seq=i))
                    for i in range(200)
                ],
            )
            await wait_until(lambda: len(sink.commands) == 200)
        received = [g.stats.received for g in gateways]
        assert sum(received) == 200 and min(received) > 0  # each got part, none got all

        anonymous = BrokerSettings(mosquitto_auth.host, mosquitto_auth.port)
        with pytest.raises(aiomqtt.MqttError):
            async with anonymous.client():
                pass

    arun(scenario())


def test_simulated_soc_follows_the_power_delivered() -> None:
    vehicle = SimulatedVehicle("ev-1", capacity_kwh=60.0, soc=0.5, soh=1.0, efficiency=0.95)
    vehicle.advance(power_kw=10.0, dt_s=3600)
    assert vehicle.soc == pytest.approx(0.5 + 9.5 / 60)
    vehicle.advance(power_kw=-9.5, dt_s=3600)
    assert vehicle.soc == pytest.approx(0.5 + 9.5 / 60 - 10.0 / 60)
    vehicle.advance(power_kw=-100.0, dt_s=3600)
    assert vehicle.soc == 0.0  # stops empty
    assert vehicle.battery_temp_c > 25.0  # warmed by the current
