"""The Modbus inverter gateway against a real pymodbus server on loopback."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from actors.gateways.modbus_inverter import (
    InMemoryRegisterClient,
    ModbusFault,
    ModbusInverterGateway,
)
from actors.gateways.register_map import (
    BLOCK_COUNT,
    REGISTER_COUNT,
    InverterRegisterMap,
    Reg,
    WriteRefused,
    from_int16,
)
from actors.gateways.sink import RecordingSink
from actors.inverter import (
    RecordInverterFault,
    RecordInverterMeasurement,
    RecordSetpointConfirmed,
    RecordSetpointMismatch,
)
from cluster.simulators.modbus_inverter import InverterSimulator

pytestmark = pytest.mark.network


def gateway_for(
    sim: InverterSimulator, sink: RecordingSink, **options: Any
) -> ModbusInverterGateway:
    rated_kw = options.pop("rated_power_kw", sim.rated_power_kw)
    options.setdefault("timeout_s", 0.3)
    return ModbusInverterGateway.tcp(
        "inv-1", sink, sim.host, sim.port, InverterRegisterMap(rated_power_kw=rated_kw), **options
    )


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def of_type(sink: RecordingSink, kind: type) -> list[Any]:
    return [c for c in sink.commands if isinstance(c, kind)]


def test_a_setpoint_is_written_read_back_and_confirmed(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        sim = InverterSimulator(rated_power_kw=11.0)
        await sim.start()
        sink = RecordingSink()
        gateway = gateway_for(sim, sink)
        try:
            outcome = await gateway.write_setpoint(-7.5, command_id="req-42", correlation_id="c-1")
            assert outcome.status == "confirmed"
            assert outcome.read_back_kw == -7.5
            assert sim.setpoint_kw == -7.5
            [confirmed] = of_type(sink, RecordSetpointConfirmed)
            assert confirmed.command_id == "req-42:confirmed"
            assert confirmed.power_kw == -7.5
            assert confirmed.correlation_id == "c-1"
            assert confirmed.stream_id == "inverter-inv-1"

            measurement = await gateway.poll_once()
            assert measurement is not None
            assert measurement.active_power_kw == -7.5  # discharging: exporting 7.5 kW
            assert measurement.dc_voltage_v == pytest.approx(400 - 0.8 * 7.5, abs=0.1)
            assert 20 < measurement.temperature_c < 40
            assert measurement.command_id.startswith("inv-1:measurement:")
        finally:
            gateway.client.close()
            await sim.stop()

    arun(scenario())


def test_an_out_of_range_value_is_refused_before_the_wire(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        sim = InverterSimulator(rated_power_kw=11.0)
        await sim.start()
        sink = RecordingSink()
        gateway = gateway_for(sim, sink)
        try:
            await gateway.write_setpoint(3.0)
            before = (sim.writes_accepted, sim.writes_rejected)
            for bad in (11.5, -20.0, math.nan, math.inf):
                with pytest.raises(WriteRefused) as refused:
                    await gateway.write_setpoint(bad)
                assert "WSetpt" in refused.value.reason
            with pytest.raises(WriteRefused, match=r"outside the allowed range \[-11.0, 11.0\] kW"):
                gateway.register_map.check_write(Reg.W_SETPOINT, 12)
            with pytest.raises(WriteRefused, match="not in the write allow-list"):
                gateway.register_map.check_write(Reg.W_RTG, 5.0)
            assert (sim.writes_accepted, sim.writes_rejected) == before  # nothing on the wire
            assert sim.setpoint_kw == 3.0
            assert gateway.stats.writes_refused == 4
            assert len(sink.commands) == 1  # only the confirmation of the 3 kW write
        finally:
            gateway.client.close()
            await sim.stop()

    arun(scenario())


def test_exception_0x03_from_the_device_becomes_a_fault_command(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        sim = InverterSimulator(rated_power_kw=11.0)
        await sim.start()
        sink = RecordingSink()
        # The gateway was configured for a 20 kW unit: its bounds let 15 kW through,
        # the 11 kW device answers "illegal data value".
        gateway = gateway_for(sim, sink, rated_power_kw=20.0)
        try:
            outcome = await gateway.write_setpoint(15.0, command_id="req-7")
            assert outcome.status == "fault"
            assert outcome.attempts == 1  # a refusal is not retried
            assert outcome.fault is not None and outcome.fault.exception_code == 0x03
            [fault] = of_type(sink, RecordInverterFault)
            assert fault.fault_kind == "modbus_exception"
            assert fault.exception_code == 3
            assert "illegal data value" in fault.detail
            assert fault.retry_count == 0
            assert sim.setpoint_kw == 0.0 and sim.writes_rejected == 1
            assert not of_type(sink, RecordSetpointConfirmed)
        finally:
            gateway.client.close()
            await sim.stop()

    arun(scenario())


def test_a_server_that_goes_away_gives_faults_then_recovery(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        sim = InverterSimulator(rated_power_kw=11.0)
        await sim.start()
        sink = RecordingSink()
        gateway = gateway_for(
            sim, sink, poll_interval_s=0.02, backoff_initial_s=0.02, backoff_max_s=0.2
        )
        task = asyncio.create_task(gateway.run())
        try:
            await wait_until(lambda: len(of_type(sink, RecordInverterMeasurement)) >= 3)
            await sim.stop()
            await wait_until(lambda: len(of_type(sink, RecordInverterFault)) >= 3)
            measured_while_down = len(of_type(sink, RecordInverterMeasurement))

            await sim.start()  # same port, same state
            await wait_until(
                lambda: len(of_type(sink, RecordInverterMeasurement)) >= measured_while_down + 3
            )
            faults = of_type(sink, RecordInverterFault)
            assert {f.fault_kind for f in faults} <= {"connection_lost", "timeout"}
            assert [f.retry_count for f in faults[:3]] == [0, 1, 2]
            assert gateway.stats.reconnects >= 2
            assert not task.done()  # it never crashed
            ids = [c.command_id for c in sink.commands]
            assert len(ids) == len(set(ids))
        finally:
            await gateway.stop()
            await asyncio.wait_for(task, 5)
            await sim.stop()

    arun(scenario())


def test_a_device_that_never_answers_gives_timeout_faults(arun: Callable[..., Any]) -> None:
    async def scenario() -> None:
        handlers: list[asyncio.Task[None]] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            while await reader.read(1024):  # swallow every request, never answer
                pass
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sink = RecordingSink()
        gateway = ModbusInverterGateway.tcp(
            "inv-1",
            sink,
            "127.0.0.1",
            port,
            InverterRegisterMap(rated_power_kw=11.0),
            timeout_s=0.1,
            max_attempts=2,
            backoff_initial_s=0.01,
        )
        try:
            outcome = await gateway.write_setpoint(1.0)
            assert outcome.status == "fault"
            assert outcome.attempts == 2
            kinds = [f.fault_kind for f in of_type(sink, RecordInverterFault)]
            assert kinds[0] == "timeout"
            assert len(kinds) == 2
        finally:
            gateway.client.close()
            server.close()
            await asyncio.wait_for(asyncio.gather(*handlers), 5)
            await server.wait_closed()

    arun(scenario())


# --- the fake seam: behaviour that is hard to provoke in a real device ------------


def fake_registers() -> list[int]:
    registers = [0] * REGISTER_COUNT
    registers[Reg.W_SF] = registers[Reg.V_SF] = registers[Reg.TMP_SF] = from_int16(-1)
    registers[Reg.DCV] = 4000
    registers[Reg.TMP] = 300
    return registers


def test_a_read_back_that_differs_is_reported_as_a_mismatch(arun: Callable[..., Any]) -> None:
    class Sticky(InMemoryRegisterClient):
        async def write(self, address: int, value: int) -> None:
            self.writes.append((address, value))
            self.registers[address] = from_int16(50)  # the device keeps its own limit: 5 kW

    sink = RecordingSink()
    gateway = ModbusInverterGateway(
        "inv-1", sink, InverterRegisterMap(rated_power_kw=11.0), Sticky(fake_registers())
    )
    outcome = arun(gateway.write_setpoint(8.0, command_id="req-1"))
    assert outcome.status == "mismatch" and outcome.read_back_kw == 5.0
    [mismatch] = of_type(sink, RecordSetpointMismatch)
    assert (mismatch.expected_power_kw, mismatch.read_back_power_kw) == (8.0, 5.0)
    assert mismatch.command_id == "req-1:mismatch"


def test_link_failures_are_retried_with_backoff_then_succeed(arun: Callable[..., Any]) -> None:
    client = InMemoryRegisterClient(fake_registers())
    client.faults = [
        ModbusFault("timeout", "no answer"),
        ModbusFault("connection_lost", "reset by peer"),
    ]
    sink = RecordingSink()
    gateway = ModbusInverterGateway(
        "inv-1",
        sink,
        InverterRegisterMap(rated_power_kw=11.0),
        client,
        backoff_initial_s=0.01,
        max_attempts=3,
    )
    outcome = arun(gateway.write_setpoint(-4.2))
    assert outcome.status == "confirmed" and outcome.attempts == 3
    faults = of_type(sink, RecordInverterFault)
    assert [(f.fault_kind, f.retry_count) for f in faults] == [
        ("timeout", 0),
        ("connection_lost", 1),
    ]
    assert client.writes == [(Reg.W_SETPOINT, from_int16(-42))]


def test_a_poll_decodes_the_block_with_its_scale_factors(arun: Callable[..., Any]) -> None:
    registers = fake_registers()
    registers[Reg.W] = from_int16(-73)
    registers[Reg.TMP] = from_int16(-52)
    client = InMemoryRegisterClient(registers)
    sink = RecordingSink()
    gateway = ModbusInverterGateway("inv-1", sink, InverterRegisterMap(11.0), client)
    command = arun(gateway.poll_once())
    assert command is not None
    assert (command.active_power_kw, command.temperature_c, command.dc_voltage_v) == (
        -7.3,
        -5.2,
        400.0,
    )
    assert BLOCK_COUNT == 10
