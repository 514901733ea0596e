"""Bench: vehicle telemetry from mosquitto through the Ray ingest actors into the log.

Unlike `bench_mqtt.py` (gateway processes and a counting sink), every message here
becomes a `ReportTelemetry` command decided by the vehicle host shards and an event
appended (fsync) to the log, and is acknowledged to the broker only afterwards.

One bounded run on a loopback mosquitto and a local Ray it starts itself:

1. the runtime starts and `--vehicles` vehicles are registered;
2. a persistent session is created for one plain subscriber (`raw`); the
   `--ingest` ingest actors start (one MQTT v5 shared subscription, persistent
   sessions), subscribe, and are paused (they hold what arrives, unacknowledged);
3. `--messages` QoS 1 telemetry messages are published (several publisher processes);
4. the raw subscriber drains its copy: `raw_receive_msgs_per_s` (plain aiomqtt
   `async for`, one process, no parsing);
5. the ingest actors are resumed together and drain theirs into the log:
   `telemetry_msgs_per_s` = messages / time until every one has its command
   answered by the hosts (recorded, or unchanged for a sample older than one the
   vehicle already holds: the shared subscription does not keep per-vehicle order).

Progress goes to stderr; the last line on stdout is one JSON object.

    python scripts/bench_mqtt_ray.py [--messages 100000] [--ingest 2] [--vehicles 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime

import aiomqtt

from actors.gateways.mqtt_telemetry import BrokerSettings, telemetry_filter
from cluster.mosquitto import Mosquitto
from scripts.bench_mqtt import publish_all, receive_raw

SESSION_EXPIRY_S = 600
SITE = "bench"


async def create_session(broker: BrokerSettings, client_id: str, topic_filter: str) -> None:
    client = broker.client(client_id, clean_start=True, session_expiry_s=SESSION_EXPIRY_S)
    async with client:
        await client.subscribe(topic_filter, qos=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--ingest", type=int, default=2, help="ingest actors")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--vehicles", type=int, default=20_000)
    parser.add_argument("--vehicle-shards", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    n = args.messages
    ctx = mp.get_context("spawn")

    def say(text: str) -> None:
        print(f"bench_mqtt_ray: {text}", file=sys.stderr, flush=True)

    import ray

    from actors.vehicle import RegisterVehicle
    from cluster.client import FleetClient
    from cluster.device_config import BrokerConfig, DeviceConfig
    from cluster.gateways import DeviceServices
    from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig

    data_dir = tempfile.mkdtemp(prefix="v2g-bench-mqtt-ray-")
    with Mosquitto(max_queued_messages=0, max_inflight_messages=0) as mosquitto:
        port = mosquitto.port
        broker = BrokerSettings(mosquitto.host, port)
        config = RuntimeConfig(
            name="benchmqtt",
            data_dir=data_dir,
            num_cpus=2,
            shards={"vehicle": args.vehicle_shards},
        )
        # address="local": a Ray of our own, even if another one runs on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace=NAMESPACE,
            log_to_driver=False,
        )
        runtime = Runtime(config).start()
        fleet = FleetClient(runtime, owns_ray=False)
        now = datetime.now(UTC)
        registered = fleet.send_many(
            [
                RegisterVehicle(
                    command_id=f"reg-ev-{v:05d}",
                    issued_at=now,
                    vehicle_id=f"ev-{v:05d}",
                    model="Volkswagen ID.4",
                    site_id=SITE,
                )
                for v in range(args.vehicles)
            ]
        )
        assert all(r.ok for r in registered), registered[:3]
        devices = DeviceConfig(
            broker=BrokerConfig(
                port=port,
                shared_group="bench",
                ingest_actors=args.ingest,
                session_expiry_s=SESSION_EXPIRY_S,
                max_batch=1000,
            )
        )

        # The ingest actors make their own persistent sessions when they start.
        asyncio.run(create_session(broker, "bench-raw", telemetry_filter(SITE)))
        services = DeviceServices(config, devices, relay=False).start()
        ray.get([a.subscribed.remote() for a in services.ingest])
        ray.get([a.pause.remote() for a in services.ingest])
        say(f"mosquitto on 127.0.0.1:{port}; {n} messages; {args.ingest} ingest actors paused")

        publish_s = publish_all(ctx, port, n, args.publishers, args.vehicles)
        raw_received, raw_s = receive_raw(ctx, port, n, args.timeout)
        raw_rate = raw_received / raw_s

        watermark_before = fleet.watermark()
        started = time.perf_counter()
        ray.get([a.resume.remote() for a in services.ingest])
        deadline = started + args.timeout
        answered = 0
        last_report = started
        while time.perf_counter() < deadline:
            status = ray.get([a.status.remote() for a in services.ingest])
            answered = sum(s["accepted"] + s["duplicates"] for s in status)
            if answered >= n:
                break
            if time.perf_counter() - last_report > 2:
                last_report = time.perf_counter()
                say(f"recorded {answered}/{n}")
            time.sleep(0.02)
        ingest_s = time.perf_counter() - started
        status = ray.get([a.status.remote() for a in services.ingest])
        rate = answered / ingest_s
        events = fleet.watermark() - watermark_before
        say(f"through Ray into the log: {answered} in {ingest_s:.2f} s ({rate:.0f}/s)")
        rejected = {k: v for s in status for k, v in s["rejected"].items()}
        services.stop()
        runtime.stop()
        ray.shutdown()
    shutil.rmtree(data_dir, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "mqtt_telemetry_ray",
                "messages": n,
                "qos": 1,
                "ingest_actors": args.ingest,
                "vehicle_shards": args.vehicle_shards,
                "vehicles": args.vehicles,
                "cpus": os.cpu_count(),
                "telemetry_msgs_per_s": round(rate, 1),
                "telemetry_answered": answered,
                "telemetry_events_appended": events,
                # The rest were answered "unchanged": a sample older than one the vehicle
                # already holds (the two preloaded queues drain at different paces).
                "telemetry_events_per_s": round(events / ingest_s, 1),
                "rejected": rejected,
                "per_actor_received": [s["received"] for s in status],
                "raw_receive_msgs_per_s": round(raw_rate, 1),
                "ratio_to_raw": round(rate / raw_rate, 3),
                "publish_msgs_per_s": round(n / publish_s, 1),
                "target_msgs_per_s": 10_000,
                "ack": "after the log recorded the command (manual ack)",
                "aiomqtt": aiomqtt.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
