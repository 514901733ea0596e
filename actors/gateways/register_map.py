"""The inverter's Modbus holding-register map (SunSpec in spirit) and its write allow-list.

Addresses are PDU addresses (what goes on the wire); the documentation number is
`40001 + address` (40001 = PDU 0). `docs/modbus.md` has the same table for people.

    PDU  Doc    Name      Type    Scale       Unit  Access
    0    40001  SunS      UINT32  -           -     R    0x53756E53 ("SunS")
    2    40003  ID        UINT16  -           -     R    model id 64901 (vendor range)
    3    40004  L         UINT16  -           -     R    model length: 10 registers
    4    40005  WSetpt    INT16   W_SF        kW    RW   active-power setpoint, < 0 discharges
    5    40006  W         INT16   W_SF        kW    R    measured active power, < 0 exports
    6    40007  DCV       UINT16  V_SF        V     R    DC (battery) voltage
    7    40008  Tmp       INT16   Tmp_SF      °C    R    heat-sink temperature
    8    40009  St        ENUM16  -           -     R    operating state (`InverterStatus`)
    9    40010  Evt       BITF16  -           -     R    fault code bits (`FaultBits`)
    10   40011  WRtg      UINT16  W_SF        kW    R    rated active power
    11   40012  W_SF      SUNSSF  -           -     R    power scale factor (-1: 0.1 kW)
    12   40013  V_SF      SUNSSF  -           -     R    voltage scale factor (-1: 0.1 V)
    13   40014  Tmp_SF    SUNSSF  -           -     R    temperature scale factor (-1)
    14   40015  end ID    UINT16  -           -     R    0xFFFF (SunSpec end model)
    15   40016  end L     UINT16  -           -     R    0

An engineering value is `raw * 10 ** sf`. INT16 0x8000 and UINT16 0xFFFF mean
"not implemented" as in SunSpec and decode to `None`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

SUNSPEC_MARKER = (0x5375, 0x6E53)  # "SunS"
MODEL_ID = 64901
MODEL_LENGTH = 10
END_MODEL_ID = 0xFFFF
INT16_NOT_IMPLEMENTED = -0x8000
UINT16_NOT_IMPLEMENTED = 0xFFFF


class Reg(enum.IntEnum):
    """PDU addresses of the holding registers (documentation number = 40001 + value)."""

    SUNS = 0
    MODEL_ID = 2
    MODEL_LENGTH = 3
    W_SETPOINT = 4
    W = 5
    DCV = 6
    TMP = 7
    ST = 8
    EVT = 9
    W_RTG = 10
    W_SF = 11
    V_SF = 12
    TMP_SF = 13
    END_ID = 14
    END_LENGTH = 15


BLOCK_START = Reg.W_SETPOINT
BLOCK_COUNT = MODEL_LENGTH  # WSetpt .. Tmp_SF, read in one request
REGISTER_COUNT = 16


class InverterStatus(enum.IntEnum):
    """SunSpec inverter operating states (model 101..103 `St`)."""

    OFF = 1
    SLEEPING = 2
    STARTING = 3
    RUNNING = 4
    THROTTLED = 5
    SHUTTING_DOWN = 6
    FAULT = 7
    STANDBY = 8


class FaultBits(enum.IntFlag):
    NONE = 0
    OVER_TEMPERATURE = 1 << 0
    DC_OVER_VOLTAGE = 1 << 1
    DC_UNDER_VOLTAGE = 1 << 2
    GRID_LOST = 1 << 3


def to_int16(raw: int) -> int:
    """A register (0..65535) read as two's-complement INT16."""
    return raw - 0x10000 if raw & 0x8000 else raw


def from_int16(value: int) -> int:
    """A signed INT16 as the unsigned register value the wire carries."""
    if not -0x8000 <= value <= 0x7FFF:
        raise ValueError(f"{value} does not fit INT16")
    return value & 0xFFFF


def scale(raw: int | None, sf: int) -> float | None:
    """`raw * 10 ** sf`, dividing for negative factors so 3 * 0.1 reads 0.3."""
    if raw is None:
        return None
    return float(raw * 10**sf) if sf >= 0 else raw / 10 ** (-sf)


class WriteRefused(ValueError):
    """A register write the allow-list forbids; nothing went on the wire."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class WritableRegister:
    """One allow-listed register and the engineering bounds of what may be written."""

    name: str
    address: int
    unit: str
    sf: int
    signed: bool
    minimum: float
    maximum: float

    def encode(self, value: float) -> int:
        """The raw register value for `value`, or `WriteRefused` with the reason.

        Raises:
            WriteRefused: not a finite number, outside [minimum, maximum], or not
                representable in the register.
        """
        if not math.isfinite(value):
            raise WriteRefused(f"{self.name}: {value!r} is not a finite number")
        if not self.minimum <= value <= self.maximum:
            raise WriteRefused(
                f"{self.name} = {value} {self.unit} is outside the allowed range "
                f"[{self.minimum}, {self.maximum}] {self.unit}; nothing was written"
            )
        raw = round(value * 10 ** (-self.sf)) if self.sf <= 0 else round(value / 10**self.sf)
        low, high = (-0x7FFF, 0x7FFF) if self.signed else (0, 0xFFFE)
        if not low <= raw <= high:
            raise WriteRefused(f"{self.name} = {value} {self.unit} does not fit the register")
        return from_int16(raw) if self.signed else raw

    def value_of(self, register: int) -> float:
        """The engineering value of a register, without the not-implemented check."""
        raw = to_int16(register) if self.signed else register
        value = scale(raw, self.sf)
        assert value is not None
        return value

    def decode(self, register: int) -> float | None:
        raw: int | None
        if self.signed:
            raw = to_int16(register)
            raw = None if raw == INT16_NOT_IMPLEMENTED else raw
        else:
            raw = None if register == UINT16_NOT_IMPLEMENTED else register
        return scale(raw, self.sf)


@dataclass(frozen=True)
class InverterRegisterMap:
    """The map one gateway talks to: scale factors and the write allow-list.

    The allow-list is the only way the gateway writes: a register not in it cannot
    be written, a value outside its bounds is refused before the wire.
    """

    rated_power_kw: float
    w_sf: int = -1
    v_sf: int = -1
    tmp_sf: int = -1

    @property
    def setpoint(self) -> WritableRegister:
        return WritableRegister(
            name="WSetpt",
            address=Reg.W_SETPOINT,
            unit="kW",
            sf=self.w_sf,
            signed=True,
            minimum=-self.rated_power_kw,
            maximum=self.rated_power_kw,
        )

    @property
    def writable(self) -> dict[int, WritableRegister]:
        return {Reg.W_SETPOINT: self.setpoint}

    def check_write(self, address: int, value: float) -> int:
        """The raw value to write at `address`, after the allow-list said yes.

        Raises:
            WriteRefused: `address` is not writable or `value` is out of bounds.
        """
        register = self.writable.get(address)
        if register is None:
            raise WriteRefused(
                f"register {address} (doc {40001 + address}) is not in the write allow-list"
            )
        return register.encode(value)


@dataclass(frozen=True)
class InverterReading:
    """One decoded read of the model block (`BLOCK_START`, `BLOCK_COUNT` registers)."""

    setpoint_kw: float | None
    active_power_kw: float | None
    dc_voltage_v: float | None
    temperature_c: float | None
    status: int
    fault_code: int
    rated_power_kw: float | None


def decode_block(registers: list[int]) -> InverterReading:
    """Decode the registers read from `BLOCK_START` using the scale factors they carry."""
    if len(registers) != BLOCK_COUNT:
        raise ValueError(f"expected {BLOCK_COUNT} registers, got {len(registers)}")

    def at(reg: Reg) -> int:
        return registers[reg - BLOCK_START]

    w_sf = to_int16(at(Reg.W_SF))
    v_sf = to_int16(at(Reg.V_SF))
    tmp_sf = to_int16(at(Reg.TMP_SF))

    def signed(reg: Reg, sf: int) -> float | None:
        raw = to_int16(at(reg))
        return None if raw == INT16_NOT_IMPLEMENTED else scale(raw, sf)

    def unsigned(reg: Reg, sf: int) -> float | None:
        raw = at(reg)
        return None if raw == UINT16_NOT_IMPLEMENTED else scale(raw, sf)

    return InverterReading(
        setpoint_kw=signed(Reg.W_SETPOINT, w_sf),
        active_power_kw=signed(Reg.W, w_sf),
        dc_voltage_v=unsigned(Reg.DCV, v_sf),
        temperature_c=signed(Reg.TMP, tmp_sf),
        status=at(Reg.ST),
        fault_code=at(Reg.EVT),
        rated_power_kw=unsigned(Reg.W_RTG, w_sf),
    )


__all__ = [
    "BLOCK_COUNT",
    "BLOCK_START",
    "MODEL_ID",
    "MODEL_LENGTH",
    "REGISTER_COUNT",
    "SUNSPEC_MARKER",
    "FaultBits",
    "InverterReading",
    "InverterRegisterMap",
    "InverterStatus",
    "Reg",
    "WritableRegister",
    "WriteRefused",
    "decode_block",
    "from_int16",
    "to_int16",
]
