"""Simulated vehicles publishing telemetry over MQTT, driven by the power delivered.

Each vehicle's state of charge integrates the power it actually receives (the
caller supplies it: a dict or a callback `vehicle_id -> power_kw`, > 0 charging,
< 0 discharging), with a one-way efficiency; its battery temperature relaxes to
`ambient_c + heating_c_per_kw * |power_kw|`. SoC stops at 0 and 1.

Example:

    power = {"ev-1": 7.4, "ev-2": -5.0}
    publisher = TelemetryPublisher(BrokerSettings("127.0.0.1", port), "site-a",
                                   [SimulatedVehicle("ev-1", 60.0, 0.4),
                                    SimulatedVehicle("ev-2", 75.0, 0.8)],
                                   power_kw=power, interval_s=1.0)
    task = asyncio.create_task(publisher.run())
    ...
    await publisher.stop(); await task
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiomqtt

from actors.gateways.mqtt_telemetry import BrokerSettings, telemetry_topic

log = logging.getLogger(__name__)


@dataclass
class SimulatedVehicle:
    vehicle_id: str
    capacity_kwh: float
    soc: float
    soh: float = 0.95
    battery_temp_c: float = 25.0
    efficiency: float = 0.95
    ambient_c: float = 25.0
    heating_c_per_kw: float = 0.8
    thermal_tau_s: float = 1800.0
    seq: int = 0

    def advance(self, power_kw: float, dt_s: float) -> None:
        """Integrate `power_kw` over `dt_s` seconds (losses on both directions)."""
        energy_kwh = power_kw * dt_s / 3600.0
        stored_kwh = (
            energy_kwh * self.efficiency if energy_kwh > 0 else energy_kwh / self.efficiency
        )
        usable_kwh = self.capacity_kwh * self.soh
        self.soc = min(1.0, max(0.0, self.soc + stored_kwh / usable_kwh))
        target_c = self.ambient_c + self.heating_c_per_kw * abs(power_kw)
        self.battery_temp_c += (target_c - self.battery_temp_c) * (
            1 - math.exp(-dt_s / self.thermal_tau_s)
        )

    def payload(self, measured_at: datetime) -> bytes:
        self.seq += 1
        return json.dumps(
            {
                "soc": round(self.soc, 6),
                "battery_temp_c": round(self.battery_temp_c, 3),
                "soh": self.soh,
                "measured_at": measured_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "seq": self.seq,
            }
        ).encode()


PowerSource = Mapping[str, float] | Callable[[str], float]


class TelemetryPublisher:
    """Publishes one QoS 1 telemetry message per vehicle every `interval_s`.

    Args:
        broker: where to publish.
        site_id: the `<site>` level of the topic.
        vehicles: the simulated fleet.
        power_kw: power actually delivered to each vehicle (dict or callback);
            a vehicle missing from the dict gets 0 kW.
        publish_timeout_s: how long to wait for a PUBACK; aiomqtt does not notice a
            broker that went away while a QoS 1 publish waits, so keep this short.
        interval_s: wall-clock period; `time_scale` simulated seconds pass per
            wall-clock second (e.g. 60 makes one second a minute).
    """

    def __init__(
        self,
        broker: BrokerSettings,
        site_id: str,
        vehicles: Sequence[SimulatedVehicle],
        power_kw: PowerSource,
        *,
        interval_s: float = 1.0,
        time_scale: float = 1.0,
        qos: int = 1,
        start_at: datetime | None = None,
        backoff_max_s: float = 2.0,
        publish_timeout_s: float = 1.0,
    ) -> None:
        self.broker = broker
        self.site_id = site_id
        self.vehicles = list(vehicles)
        self.power_kw = power_kw
        self.interval_s = interval_s
        self.time_scale = time_scale
        self.qos = qos
        self.now = start_at or datetime.now(UTC)
        self.backoff_max_s = backoff_max_s
        self.publish_timeout_s = publish_timeout_s
        self.published = 0
        self._stopping = asyncio.Event()

    def _power(self, vehicle_id: str) -> float:
        if callable(self.power_kw):
            return float(self.power_kw(vehicle_id))
        return float(self.power_kw.get(vehicle_id, 0.0))

    def step(self, dt_s: float) -> list[tuple[str, bytes]]:
        """Advance every vehicle by `dt_s` simulated seconds; the messages to publish."""
        self.now += timedelta(seconds=dt_s)
        messages = []
        for vehicle in self.vehicles:
            vehicle.advance(self._power(vehicle.vehicle_id), dt_s)
            topic = telemetry_topic(self.site_id, vehicle.vehicle_id)
            messages.append((topic, vehicle.payload(self.now)))
        return messages

    async def run(self, steps: int | None = None) -> None:
        """Publish every `interval_s` until `stop()` (or `steps` rounds); reconnects."""
        self._stopping.clear()
        pending: list[tuple[str, bytes]] = []
        done_steps = 0
        attempt = 0
        while not self._stopping.is_set() and (steps is None or done_steps < steps or pending):
            try:
                async with self.broker.client() as client:
                    attempt = 0
                    while not self._stopping.is_set():
                        if not pending:
                            if steps is not None and done_steps >= steps:
                                return
                            pending = self.step(self.interval_s * self.time_scale)
                            done_steps += 1
                        while pending:
                            topic, payload = pending[0]
                            await client.publish(
                                topic, payload, qos=self.qos, timeout=self.publish_timeout_s
                            )
                            pending.pop(0)
                            self.published += 1
                        await self._sleep(self.interval_s)
            except aiomqtt.MqttError as exc:
                delay = min(self.backoff_max_s, 0.05 * 2**attempt)
                attempt += 1
                log.info("publisher: broker unavailable (%s); retry in %.2f s", exc, delay)
                await self._sleep(delay)

    async def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


__all__ = ["PowerSource", "SimulatedVehicle", "TelemetryPublisher"]
