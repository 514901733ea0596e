"""The inverter gateway: Modbus TCP on one side, inverter commands on the other.

One seam, one fake: the gateway talks to a `RegisterClient` (read and write holding
registers). `PymodbusRegisterClient` is the real one (pymodbus
`AsyncModbusTcpClient`); `InMemoryRegisterClient` is the fake for unit tests.

What the gateway guarantees:

- it writes only registers in the map's allow-list, with values inside their
  bounds; anything else raises `WriteRefused` before a byte goes on the wire;
- every write is read back: `RecordSetpointConfirmed` or `RecordSetpointMismatch`;
- it polls the measurement block every `poll_interval_s` and submits
  `RecordInverterMeasurement` with `command_id = "<inverter>:measurement:<sample time>"`;
- a Modbus exception, a timeout or a lost connection becomes `RecordInverterFault`
  (with the retry count); it backs off exponentially, reconnects when the device
  is back, and never lets an exception escape its poll loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from actors.decider import CommandResult
from actors.gateways.register_map import (
    BLOCK_COUNT,
    BLOCK_START,
    InverterReading,
    InverterRegisterMap,
    WriteRefused,
    decode_block,
)
from actors.gateways.sink import CommandSink
from actors.inverter import (
    RecordInverterFault,
    RecordInverterMeasurement,
    RecordSetpointConfirmed,
    RecordSetpointMismatch,
)
from events.base import Command
from events.inverter import FaultKind

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ModbusFault(Exception):
    """One failed exchange, classified the way `RecordInverterFault` records it."""

    def __init__(self, kind: FaultKind, detail: str, exception_code: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.exception_code = exception_code


# --- the seam --------------------------------------------------------------------


class RegisterClient(Protocol):
    """Holding-register access to one device; every failure is a `ModbusFault`."""

    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def read(self, address: int, count: int) -> list[int]: ...

    async def write(self, address: int, value: int) -> None: ...

    def close(self) -> None: ...


class PymodbusRegisterClient:
    """`RegisterClient` over pymodbus' `AsyncModbusTcpClient`.

    pymodbus' own retries and reconnects are switched off (`retries=0`,
    `reconnect_delay=0`): the gateway owns retry, backoff and reconnection, so
    each attempt is visible as a fault command.
    """

    def __init__(self, host: str, port: int, *, device_id: int = 1, timeout_s: float = 1.0):
        self.host = host
        self.port = port
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0
        )

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    async def connect(self) -> None:
        try:
            ok = await asyncio.wait_for(self._client.connect(), self.timeout_s * 2)
        except (OSError, TimeoutError, ModbusException) as exc:
            raise ModbusFault("connection_lost", f"connect {self.host}:{self.port}: {exc}") from exc
        if not ok:
            raise ModbusFault("connection_lost", f"cannot connect to {self.host}:{self.port}")

    async def read(self, address: int, count: int) -> list[int]:
        response = await self._call(
            lambda: self._client.read_holding_registers(
                address, count=count, device_id=self.device_id
            )
        )
        return list(response.registers)

    async def write(self, address: int, value: int) -> None:
        await self._call(
            lambda: self._client.write_register(address, value, device_id=self.device_id)
        )

    def close(self) -> None:
        self._client.close()

    async def _call(self, request: Callable[[], Awaitable[ModbusPDU]]) -> ModbusPDU:
        if not self._client.connected:
            raise ModbusFault("connection_lost", f"not connected to {self.host}:{self.port}")
        try:
            response = await asyncio.wait_for(request(), self.timeout_s * 2)
        except ConnectionException as exc:
            raise ModbusFault("connection_lost", str(exc)) from exc
        except (ModbusIOException, TimeoutError) as exc:
            if not self._client.connected:
                raise ModbusFault("connection_lost", f"connection lost: {exc}") from exc
            raise ModbusFault("timeout", f"no answer within {self.timeout_s} s") from exc
        except (OSError, ModbusException) as exc:
            raise ModbusFault("connection_lost", f"{type(exc).__name__}: {exc}") from exc
        if response.isError():
            code = int(getattr(response, "exception_code", 0)) or None
            raise ModbusFault(
                "modbus_exception",
                f"device answered exception 0x{code or 0:02X} ({_EXCEPTION_NAMES.get(code, '?')})",
                exception_code=code,
            )
        return response


_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    6: "device busy",
}


class InMemoryRegisterClient:
    """Fake `RegisterClient`: a list of registers, plus scripted faults for unit tests."""

    def __init__(self, registers: list[int]) -> None:
        self.registers = list(registers)
        self.writes: list[tuple[int, int]] = []
        self.faults: list[ModbusFault] = []
        self.connected = False

    async def connect(self) -> None:
        self._maybe_fail()
        self.connected = True

    async def read(self, address: int, count: int) -> list[int]:
        self._maybe_fail()
        return self.registers[address : address + count]

    async def write(self, address: int, value: int) -> None:
        self._maybe_fail()
        self.writes.append((address, value))
        self.registers[address] = value

    def close(self) -> None:
        self.connected = False

    def _maybe_fail(self) -> None:
        if self.faults:
            fault = self.faults.pop(0)
            if fault.kind == "connection_lost":
                self.connected = False
            raise fault


# --- the gateway -----------------------------------------------------------------


@dataclass(frozen=True)
class SetpointOutcome:
    """What became of one setpoint write.

    status: `confirmed` (read back equal), `mismatch` (read back different) or
    `fault` (the device refused or could not be reached after `attempts`).
    """

    status: Literal["confirmed", "mismatch", "fault"]
    power_kw: float
    read_back_kw: float | None = None  # None when the write itself failed
    fault: ModbusFault | None = None
    attempts: int = 1


@dataclass
class GatewayStats:
    polls_ok: int = 0
    polls_failed: int = 0
    writes_ok: int = 0
    writes_refused: int = 0
    faults: int = 0
    reconnects: int = 0
    sink_errors: int = 0
    last_results: list[CommandResult] = field(default_factory=list)


class ModbusInverterGateway:
    """Polls one inverter and writes its setpoint, turning both into commands.

    Args:
        inverter_id: the entity id; commands go to stream `inverter-<inverter_id>`.
        sink: where commands go (`CommandSink`).
        register_map: scale factors and write allow-list (bounds = ±rating).
        client: a `RegisterClient`; build one with `ModbusInverterGateway.tcp(...)`.
        poll_interval_s: time between measurement polls while healthy.
        max_attempts: attempts per setpoint write before it is reported `fault`.
        backoff_initial_s, backoff_max_s: exponential backoff between failed
            attempts (doubling, capped); failed polls back off the same way but
            never poll faster than `poll_interval_s`.
        clock: UTC time source for `issued_at` and sample times.

    Example:

        gateway = ModbusInverterGateway.tcp("inv-7", sink, "127.0.0.1", 5020,
                                            InverterRegisterMap(rated_power_kw=11))
        task = asyncio.create_task(gateway.run())
        outcome = await gateway.write_setpoint(-7.5)   # discharge 7.5 kW
        await gateway.stop(); await task
    """

    def __init__(
        self,
        inverter_id: str,
        sink: CommandSink,
        register_map: InverterRegisterMap,
        client: RegisterClient,
        *,
        poll_interval_s: float = 1.0,
        max_attempts: int = 3,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 30.0,
        clock: Clock = _utc_now,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.inverter_id = inverter_id
        self.sink = sink
        self.register_map = register_map
        self.client = client
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.stats = GatewayStats()
        self.last_reading: InverterReading | None = None
        self._connect_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._consecutive_failures = 0

    @classmethod
    def tcp(
        cls,
        inverter_id: str,
        sink: CommandSink,
        host: str,
        port: int,
        register_map: InverterRegisterMap,
        *,
        device_id: int = 1,
        timeout_s: float = 1.0,
        **options: float,
    ) -> ModbusInverterGateway:
        """A gateway over Modbus TCP (pymodbus) to `host:port`, unit `device_id`."""
        client = PymodbusRegisterClient(host, port, device_id=device_id, timeout_s=timeout_s)
        return cls(inverter_id, sink, register_map, client, **options)  # type: ignore[arg-type]

    # --- setpoints -------------------------------------------------------------

    async def write_setpoint(
        self, power_kw: float, *, command_id: str | None = None, correlation_id: str = ""
    ) -> SetpointOutcome:
        """Write the active-power setpoint, read it back and report the result.

        Args:
            power_kw: > 0 charges, < 0 discharges; must lie within ±rating.
            command_id: the id of the decision being carried out (e.g. the
                `RequestInverterSetpoint` command id); the confirmation command is
                `<command_id>:confirmed` / `:mismatch`. Default: built from the
                inverter id, value and time.
            correlation_id: copied onto every command this write causes.

        Raises:
            WriteRefused: the value is outside the allow-list bounds; nothing was
                written and no command was submitted.
        """
        register = self.register_map.setpoint
        try:
            raw = self.register_map.check_write(register.address, power_kw)
        except WriteRefused:
            self.stats.writes_refused += 1
            raise
        issued_at = self.clock()
        base_id = command_id or f"{self.inverter_id}:setpoint:{power_kw}:{issued_at.isoformat()}"
        written_kw = register.decode(raw)
        assert written_kw is not None
        fault: ModbusFault | None = None
        for attempt in range(self.max_attempts):
            try:
                await self._ensure_connected()
                await self.client.write(register.address, raw)
                read_back = (await self.client.read(register.address, 1))[0]
            except ModbusFault as exc:
                fault = exc
                await self._report_fault(exc, attempt, "setpoint", correlation_id)
                if exc.kind == "modbus_exception" or attempt + 1 == self.max_attempts:
                    break  # the device said no: repeating the same write will not help
                await self._sleep(self._backoff_s(attempt))
                continue
            self.stats.writes_ok += 1
            now = self.clock()
            read_back_kw = register.value_of(read_back)
            command: Command
            if read_back == raw:
                command = RecordSetpointConfirmed(
                    inverter_id=self.inverter_id,
                    power_kw=written_kw,
                    command_id=f"{base_id}:confirmed",
                    issued_at=now,
                    correlation_id=correlation_id,
                )
                await self._submit([command])
                return SetpointOutcome("confirmed", written_kw, read_back_kw, attempts=attempt + 1)
            command = RecordSetpointMismatch(
                inverter_id=self.inverter_id,
                expected_power_kw=written_kw,
                read_back_power_kw=read_back_kw,
                command_id=f"{base_id}:mismatch",
                issued_at=now,
                correlation_id=correlation_id,
            )
            await self._submit([command])
            return SetpointOutcome("mismatch", written_kw, read_back_kw, attempts=attempt + 1)
        return SetpointOutcome("fault", written_kw, None, fault=fault, attempts=attempt + 1)

    # --- measurements ----------------------------------------------------------

    async def poll_once(self) -> RecordInverterMeasurement | None:
        """Read the measurement block once; submit a measurement or a fault command.

        Returns the measurement command, or None if the read failed (the fault was
        submitted). Never raises for device or link problems.
        """
        try:
            await self._ensure_connected()
            registers = await self.client.read(BLOCK_START, BLOCK_COUNT)
            reading = decode_block(registers)
        except ModbusFault as exc:
            self.stats.polls_failed += 1
            await self._report_fault(exc, self._consecutive_failures, "poll")
            self._consecutive_failures += 1
            return None
        measured_at = self.clock()
        self._consecutive_failures = 0
        self.stats.polls_ok += 1
        self.last_reading = reading
        command = RecordInverterMeasurement(
            inverter_id=self.inverter_id,
            measured_at=measured_at,
            active_power_kw=reading.active_power_kw or 0.0,
            dc_voltage_v=reading.dc_voltage_v or 0.0,
            temperature_c=reading.temperature_c if reading.temperature_c is not None else 0.0,
            status=reading.status,
            fault_code=reading.fault_code,
            command_id=f"{self.inverter_id}:measurement:{measured_at.isoformat()}",
            issued_at=measured_at,
        )
        await self._submit([command])
        return command

    async def run(self) -> None:
        """Poll until `stop()`; back off exponentially while the device fails."""
        self._stopping.clear()
        while not self._stopping.is_set():
            try:
                await self.poll_once()
            except Exception:  # a bug must not stop the polling of a live device
                log.exception("inverter %s: unexpected error while polling", self.inverter_id)
                self._consecutive_failures += 1
            delay = self.poll_interval_s
            if self._consecutive_failures:
                delay = max(delay, self._backoff_s(self._consecutive_failures - 1))
            await self._sleep(delay)
        self.client.close()

    async def stop(self) -> None:
        self._stopping.set()

    # --- internals -------------------------------------------------------------

    def _backoff_s(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2**attempt)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _ensure_connected(self) -> None:
        if self.client.connected:
            return
        async with self._connect_lock:
            if not self.client.connected:
                await self.client.connect()
                self.stats.reconnects += 1
                log.info("inverter %s: connected", self.inverter_id)

    async def _report_fault(
        self, fault: ModbusFault, retry_count: int, operation: str, correlation_id: str = ""
    ) -> None:
        self.stats.faults += 1
        observed_at = self.clock()
        log.warning(
            "inverter %s: %s %s (retry %d): %s",
            self.inverter_id,
            operation,
            fault.kind,
            retry_count,
            fault.detail,
        )
        command = RecordInverterFault(
            inverter_id=self.inverter_id,
            fault_kind=fault.kind,
            detail=f"{operation}: {fault.detail}"[:500],
            exception_code=fault.exception_code,
            retry_count=retry_count,
            command_id=(
                f"{self.inverter_id}:fault:{operation}:{observed_at.isoformat()}:{retry_count}"
            ),
            issued_at=observed_at,
            correlation_id=correlation_id,
        )
        await self._submit([command])

    async def _submit(self, commands: Sequence[Command]) -> None:
        try:
            results = await self.sink.submit(commands)
        except Exception:  # the sink's trouble must not kill the device link
            self.stats.sink_errors += 1
            log.exception("inverter %s: the sink refused a batch", self.inverter_id)
            return
        for result in results:
            if not result.ok:
                log.warning(
                    "inverter %s: %s rejected: %s",
                    self.inverter_id,
                    result.command_id,
                    result.reason,
                )
        self.stats.last_results = list(results)


__all__ = [
    "GatewayStats",
    "InMemoryRegisterClient",
    "ModbusFault",
    "ModbusInverterGateway",
    "PymodbusRegisterClient",
    "RegisterClient",
    "SetpointOutcome",
    "WriteRefused",
]
