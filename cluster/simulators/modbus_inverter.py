"""A simulated bidirectional inverter behind a real pymodbus TCP server.

It serves the map of `actors.gateways.register_map` (see `docs/modbus.md`) and runs a
small physical model, advanced lazily on every request from the elapsed time:

- active power follows the setpoint with a first-order lag (`power_tau_s`);
- temperature tends to `ambient_c + heating_c_per_kw * |power_kw|` with time
  constant `thermal_tau_s` (so it rises with |power|);
- DC voltage sags with discharge and rises with charge around `nominal_dc_v`.

A setpoint write outside ±rating is answered with Modbus exception 0x03 (illegal
data value) and changes nothing; any write outside the setpoint register, and any
read or write outside the map, gets 0x02 (illegal data address).

Example:

    sim = InverterSimulator(rated_power_kw=11.0)
    await sim.start()            # binds 127.0.0.1 on a free port
    ...                          # talk Modbus to ("127.0.0.1", sim.port)
    await sim.stop()
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from actors.gateways.register_map import (
    END_MODEL_ID,
    MODEL_ID,
    MODEL_LENGTH,
    REGISTER_COUNT,
    SUNSPEC_MARKER,
    FaultBits,
    InverterStatus,
    Reg,
    from_int16,
    to_int16,
)

_WRITE_FUNCTION_CODES = frozenset({6, 16, 22, 23})


class InverterSimulator:
    """One inverter on one loopback Modbus TCP port; `stop()`/`start()` keep its state."""

    def __init__(
        self,
        *,
        rated_power_kw: float = 11.0,
        host: str = "127.0.0.1",
        port: int = 0,
        device_id: int = 1,
        ambient_c: float = 25.0,
        heating_c_per_kw: float = 4.0,
        thermal_tau_s: float = 120.0,
        power_tau_s: float = 0.0,
        nominal_dc_v: float = 400.0,
        dc_sag_v_per_kw: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rated_power_kw <= 0 or rated_power_kw * 10 > 0x7FFF:
            raise ValueError("rated_power_kw must be in (0, 3276.7]")
        self.rated_power_kw = rated_power_kw
        self.host = host
        self.port = port
        self.device_id = device_id
        self.ambient_c = ambient_c
        self.heating_c_per_kw = heating_c_per_kw
        self.thermal_tau_s = thermal_tau_s
        self.power_tau_s = power_tau_s
        self.nominal_dc_v = nominal_dc_v
        self.dc_sag_v_per_kw = dc_sag_v_per_kw
        self._clock = clock
        self.setpoint_kw = 0.0
        self.power_kw = 0.0
        self.temperature_c = ambient_c
        self.fault_bits = FaultBits.NONE
        self.status = InverterStatus.STANDBY
        self.writes_accepted = 0
        self.writes_rejected = 0
        self.forced_exception: ExcCodes | None = None
        self._last_update = clock()
        self._server: ModbusTcpServer | None = None
        self._registers: list[int] | None = None

    # --- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen on (host, port); port 0 picks a free one, kept for later restarts."""
        if self._server is not None:
            return
        device = SimDevice(
            id=self.device_id,
            simdata=[
                SimData(
                    address=0,
                    values=[0] * REGISTER_COUNT,
                    datatype=DataType.REGISTERS,
                )
            ],
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port))
        await server.serve_forever(background=True)
        if self.port == 0:
            self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._server = server

    async def stop(self) -> None:
        """Close the listener and every client connection (the device 'goes away')."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            await asyncio.sleep(0)

    # --- test hooks ------------------------------------------------------------

    def set_temperature_c(self, temperature_c: float) -> None:
        self._advance()
        self.temperature_c = temperature_c

    def force_exception(self, code: ExcCodes | None) -> None:
        """Answer every request with `code` (None: back to normal)."""
        self.forced_exception = code

    # --- the model -------------------------------------------------------------

    def _advance(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._last_update)
        self._last_update = now
        if self.power_tau_s > 0:
            self.power_kw += (self.setpoint_kw - self.power_kw) * (
                1 - math.exp(-dt / self.power_tau_s)
            )
        else:
            self.power_kw = self.setpoint_kw
        target_c = self.ambient_c + self.heating_c_per_kw * abs(self.power_kw)
        self.temperature_c += (target_c - self.temperature_c) * (
            1 - math.exp(-dt / self.thermal_tau_s)
        )
        if abs(self.power_kw) < 0.05:
            self.status = InverterStatus.STANDBY
        else:
            self.status = InverterStatus.RUNNING
        if self.temperature_c > 85.0:
            self.fault_bits |= FaultBits.OVER_TEMPERATURE
        else:
            self.fault_bits &= ~FaultBits.OVER_TEMPERATURE
        if self.fault_bits:
            self.status = InverterStatus.FAULT

    def _render(self, registers: list[int]) -> None:
        dc_v = self.nominal_dc_v + self.dc_sag_v_per_kw * self.power_kw
        registers[Reg.SUNS] = SUNSPEC_MARKER[0]
        registers[Reg.SUNS + 1] = SUNSPEC_MARKER[1]
        registers[Reg.MODEL_ID] = MODEL_ID
        registers[Reg.MODEL_LENGTH] = MODEL_LENGTH
        registers[Reg.W_SETPOINT] = from_int16(round(self.setpoint_kw * 10))
        registers[Reg.W] = from_int16(round(self.power_kw * 10))
        registers[Reg.DCV] = max(0, min(0xFFFE, round(dc_v * 10)))
        registers[Reg.TMP] = from_int16(round(self.temperature_c * 10))
        registers[Reg.ST] = int(self.status)
        registers[Reg.EVT] = int(self.fault_bits)
        registers[Reg.W_RTG] = round(self.rated_power_kw * 10)
        registers[Reg.W_SF] = from_int16(-1)
        registers[Reg.V_SF] = from_int16(-1)
        registers[Reg.TMP_SF] = from_int16(-1)
        registers[Reg.END_ID] = END_MODEL_ID
        registers[Reg.END_LENGTH] = 0

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before every read or write; returning a code rejects it."""
        if self.forced_exception is not None:
            return self.forced_exception
        first = address - start_address
        if first < 0 or first + count > REGISTER_COUNT:
            return ExcCodes.ILLEGAL_ADDRESS
        self._advance()
        self._render(registers)
        if set_values is None:
            return None  # a read, or pymodbus reading back after a write
        values = [int(v) for v in set_values]
        if function_code not in _WRITE_FUNCTION_CODES:
            return ExcCodes.ILLEGAL_FUNCTION
        if first != Reg.W_SETPOINT or len(values) != 1:
            self.writes_rejected += 1
            return ExcCodes.ILLEGAL_ADDRESS
        setpoint_kw = to_int16(values[0]) / 10
        if abs(setpoint_kw) > self.rated_power_kw:
            self.writes_rejected += 1
            return ExcCodes.ILLEGAL_VALUE
        self.setpoint_kw = setpoint_kw
        self.writes_accepted += 1
        if self.power_tau_s <= 0:
            self.power_kw = setpoint_kw
        return None


__all__ = ["InverterSimulator"]
