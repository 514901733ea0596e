"""Bench: telemetry ingestion mosquitto → gateway → sink, against plain aiomqtt receive.

One bounded run on a loopback mosquitto it starts itself:

1. persistent sessions are created (clean start, session expiry) for one plain
   subscriber (`raw`) and for `--ingest` gateway processes sharing one MQTT v5
   shared subscription (`$share/bench/...`), then disconnected;
2. `--messages` QoS 1 telemetry messages are published (several publisher
   processes); the broker queues them for every session;
3. the raw subscriber reconnects alone and drains its copy: `raw_receive_msgs_per_s`
   (plain aiomqtt receive, one process, no parsing);
4. the ingest processes reconnect together and drain the shared copy, each
   parsing, validating and submitting commands in batches to a counting sink:
   `telemetry_msgs_per_s`.

Draining a queue that is already full measures the consumers, not the publishers.
Progress goes to stderr; the last line on stdout is one JSON object.

    python scripts/bench_mqtt.py [--messages 100000] [--ingest 2] [--publishers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt

from actors.decider import CommandResult
from actors.gateways.mqtt_telemetry import (
    BrokerSettings,
    MqttTelemetryGateway,
    TelemetryCommandFactory,
    resolve_telemetry_factory,
    telemetry_filter,
    telemetry_topic,
)
from cluster.mosquitto import Mosquitto
from events.base import Command

SESSION_EXPIRY_S = 600
T0 = datetime(2026, 11, 29, 17, 0, tzinfo=UTC)


class BenchTelemetry(Command):
    """Used only if `actors.vehicle.ReportTelemetry` does not exist yet."""

    vehicle_id: str
    soc: float
    battery_temp_c: float
    soh: float
    measured_at: datetime

    @property
    def stream_id(self) -> str:
        return f"vehicle-{self.vehicle_id}"


def telemetry_factory() -> tuple[TelemetryCommandFactory, str]:
    try:
        factory = resolve_telemetry_factory()
        return factory, "actors.vehicle.ReportTelemetry"
    except ImportError:
        return BenchTelemetry, "bench stand-in (actors.vehicle.ReportTelemetry missing)"


class CountingSink:
    """Counts what arrives; shares the count with the parent."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        with self.counter.get_lock():
            self.counter.value += len(commands)
        return [
            CommandResult(command_id=c.command_id, stream_id=c.stream_id, status="recorded")
            for c in commands
        ]


def message(i: int, vehicles: int) -> tuple[str, bytes]:
    vehicle = f"ev-{i % vehicles:05d}"
    at = T0 + timedelta(seconds=i // vehicles)
    body = {
        "soc": round((i % 1000) / 1000, 3),
        "battery_temp_c": 25.0,
        "soh": 0.95,
        "measured_at": at.isoformat().replace("+00:00", "Z"),
        "seq": i,
    }
    return telemetry_topic("bench", vehicle), json.dumps(body).encode()


async def create_session(broker: BrokerSettings, client_id: str, topic_filter: str) -> None:
    client = broker.client(client_id, clean_start=True, session_expiry_s=SESSION_EXPIRY_S)
    async with client:
        await client.subscribe(topic_filter, qos=1)


def publisher(port: int, start: int, stop: int, vehicles: int, done: Any) -> None:
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # "N pending publish calls" is the point

    async def run() -> None:
        async with BrokerSettings("127.0.0.1", port).client(max_queued_incoming=0) as client:
            window: list[asyncio.Task[None]] = []
            for i in range(start, stop):
                topic, payload = message(i, vehicles)
                window.append(asyncio.ensure_future(client.publish(topic, payload, qos=1)))
                if len(window) >= 200:
                    await asyncio.gather(*window)
                    window.clear()
                    with done.get_lock():
                        done.value += 200
            await asyncio.gather(*window)
            with done.get_lock():
                done.value += len(window)

    asyncio.run(run())


def raw_receiver(port: int, expected: int, result: Any) -> None:
    async def run() -> None:
        client = BrokerSettings("127.0.0.1", port).client(
            "bench-raw", clean_start=False, session_expiry_s=SESSION_EXPIRY_S
        )
        received = 0
        started = time.perf_counter()  # imports done: connect, receive, count
        async with client:
            async for _ in client.messages:
                received += 1
                if received >= expected:
                    break
        result.put((received, time.perf_counter() - started))

    asyncio.run(run())


def ingest(port: int, index: int, counter: Any, ready_at: Any, stop: Any) -> None:
    async def run() -> None:
        factory, _ = telemetry_factory()
        gateway = MqttTelemetryGateway(
            CountingSink(counter),
            BrokerSettings("127.0.0.1", port),
            shared_group="bench",
            command_factory=factory,
            client_id=f"bench-ingest-{index}",
            session_expiry_s=SESSION_EXPIRY_S,
            resume_session=True,
        )
        ready_at.value = time.time()  # imports done: connect, receive, parse, submit
        task = asyncio.create_task(gateway.run())
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await gateway.stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(run())


def say(text: str) -> None:
    print(f"bench_mqtt: {text}", file=sys.stderr, flush=True)


def publish_all(ctx: Any, port: int, n: int, publishers: int, vehicles: int) -> float:
    """Publish `n` telemetry messages from `publishers` processes; the seconds it took."""
    done = ctx.Value("q", 0)
    bounds = [round(n * k / publishers) for k in range(publishers + 1)]
    started = time.perf_counter()
    pubs = [
        ctx.Process(target=publisher, args=(port, bounds[k], bounds[k + 1], vehicles, done))
        for k in range(publishers)
    ]
    for p in pubs:
        p.start()
    for p in pubs:
        while p.is_alive():
            p.join(timeout=2)
            say(f"published {done.value}/{n}")
    publish_s = time.perf_counter() - started
    say(f"published {n} in {publish_s:.1f} s ({n / publish_s:.0f}/s)")
    return publish_s


def receive_raw(ctx: Any, port: int, n: int, timeout_s: float) -> tuple[int, float]:
    """Plain aiomqtt receive of `n` messages in one process: (received, seconds)."""
    results = ctx.Queue()
    raw = ctx.Process(target=raw_receiver, args=(port, n, results))
    raw.start()
    received, seconds = results.get(timeout=timeout_s)
    raw.join(timeout=10)
    say(f"raw receive: {received} in {seconds:.2f} s ({received / seconds:.0f}/s)")
    return received, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--ingest", type=int, default=2, help="gateway processes")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--vehicles", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    n = args.messages
    ctx = mp.get_context("spawn")

    _, command_class = telemetry_factory()
    with Mosquitto(max_queued_messages=0, max_inflight_messages=0) as mosquitto:
        port = mosquitto.port
        broker = BrokerSettings(mosquitto.host, port)
        say(f"mosquitto on 127.0.0.1:{port}; {n} messages, {args.ingest} ingest processes")

        async def sessions() -> None:
            await create_session(broker, "bench-raw", telemetry_filter("bench"))
            for i in range(args.ingest):
                await create_session(
                    broker, f"bench-ingest-{i}", telemetry_filter("bench", "bench")
                )

        asyncio.run(sessions())

        publish_s = publish_all(ctx, port, n, args.publishers, args.vehicles)
        raw_received, raw_s = receive_raw(ctx, port, n, args.timeout)
        raw_rate = raw_received / raw_s

        counter = ctx.Value("q", 0)
        firsts = [ctx.Value("d", 0.0) for _ in range(args.ingest)]
        stop = ctx.Event()
        workers = [
            ctx.Process(target=ingest, args=(port, i, counter, firsts[i], stop))
            for i in range(args.ingest)
        ]
        started = time.perf_counter()
        for w in workers:
            w.start()
        deadline = started + args.timeout
        last_report = started
        while counter.value < n and time.perf_counter() < deadline:
            time.sleep(0.01)
            if time.perf_counter() - last_report > 2:
                last_report = time.perf_counter()
                say(f"ingested {counter.value}/{n}")
        finished_at = time.time()
        if counter.value < n:
            say(f"STALLED at {counter.value}/{n}; mosquitto log tail:")
            say(mosquitto.log_path.read_text()[-3000:])
        ingest_s = time.perf_counter() - started
        ingested = counter.value
        ready = [f.value for f in firsts if f.value]
        first_at = min(ready) if ready else 0.0
        stop.set()
        for w in workers:
            w.join(timeout=15)
            if w.is_alive():
                w.terminate()
                w.join()
        # From the first process ready to connect (interpreter start-up and imports
        # excluded) to the last command submitted.
        steady_s = finished_at - first_at if first_at else ingest_s
        rate = ingested / steady_s
        say(
            f"gateway ingest: {ingested} in {steady_s:.2f} s ({rate:.0f}/s); "
            f"{ingest_s:.2f} s including process start-up"
        )

    print(
        json.dumps(
            {
                "bench": "mqtt_telemetry",
                "messages": n,
                "qos": 1,
                "ingest_processes": args.ingest,
                "cpus": os.cpu_count(),
                "command_class": command_class,
                "telemetry_msgs_per_s": round(rate, 1),
                "telemetry_ingested": ingested,
                "telemetry_msgs_per_s_incl_startup": round(ingested / ingest_s, 1),
                "raw_receive_msgs_per_s": round(raw_rate, 1),
                "ratio_to_raw": round(rate / raw_rate, 3),
                "publish_msgs_per_s": round(n / publish_s, 1),
                "target_msgs_per_s": 10_000,
                "aiomqtt": aiomqtt.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
