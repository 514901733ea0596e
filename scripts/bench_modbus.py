"""Bench: setpoint write + read-back latency through the Modbus gateway (loopback).

Starts the inverter simulator (a real pymodbus TCP server) on a free 127.0.0.1
port, then times `ModbusInverterGateway.write_setpoint` (allow-list check, write,
read back, confirmation command to a counting sink) and, for comparison, the bare
pymodbus write + read pair. Progress goes to stderr; the last line on stdout is
one JSON object.

    python scripts/bench_modbus.py [--writes 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence

from actors.decider import CommandResult
from actors.gateways.modbus_inverter import ModbusInverterGateway
from actors.gateways.register_map import InverterRegisterMap, Reg, from_int16
from cluster.simulators.modbus_inverter import InverterSimulator
from events.base import Command


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        self.count += len(commands)
        return [
            CommandResult(command_id=c.command_id, stream_id=c.stream_id, status="recorded")
            for c in commands
        ]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def bench(writes: int) -> dict[str, object]:
    sim = InverterSimulator(rated_power_kw=11.0)
    await sim.start()
    sink = CountingSink()
    gateway = ModbusInverterGateway.tcp(
        "bench-inv", sink, sim.host, sim.port, InverterRegisterMap(rated_power_kw=11.0)
    )
    try:
        values = [round(((i % 221) - 110) / 10, 1) for i in range(writes)]
        for value in values[:200]:  # warm-up: connect, JIT-free but cache-warm
            await gateway.write_setpoint(value)
        latencies_ms: list[float] = []
        statuses: dict[str, int] = {}
        started = time.perf_counter()
        for i, value in enumerate(values):
            t0 = time.perf_counter()
            outcome = await gateway.write_setpoint(value, command_id=f"bench-{i}")
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
            if i and i % 1000 == 0:
                print(
                    f"  {i} setpoints, p50 so far {statistics.median(latencies_ms):.3f} ms",
                    file=sys.stderr,
                )
        elapsed_s = time.perf_counter() - started

        client = gateway.client._client  # type: ignore[attr-defined]  # the bare pymodbus client
        raw_ms: list[float] = []
        for i in range(writes):
            t0 = time.perf_counter()
            await client.write_register(Reg.W_SETPOINT, from_int16(i % 100), device_id=1)
            await client.read_holding_registers(Reg.W_SETPOINT, count=1, device_id=1)
            raw_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        gateway.client.close()
        await sim.stop()
    return {
        "bench": "modbus_setpoint",
        "writes": writes,
        "statuses": statuses,
        "setpoint_write_readback_p50_ms": round(percentile(latencies_ms, 50), 3),
        "setpoint_write_readback_p99_ms": round(percentile(latencies_ms, 99), 3),
        "setpoint_write_readback_max_ms": round(max(latencies_ms), 3),
        "setpoints_per_s": round(writes / elapsed_s, 1),
        "raw_pymodbus_pair_p50_ms": round(percentile(raw_ms, 50), 3),
        "raw_pymodbus_pair_p99_ms": round(percentile(raw_ms, 99), 3),
        "commands_submitted": sink.count,
        "target_p99_ms": 5.0,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=5000)
    args = parser.parse_args()
    print(f"bench_modbus: {args.writes} setpoint writes with read-back", file=sys.stderr)
    result = asyncio.run(bench(args.writes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
