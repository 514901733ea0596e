"""Car-model presets: battery and power limits of V2G-capable cars (2024).

The numbers come from `data/ev_specs_v2g_enabled2024.json`, manufacturer data as
compiled by ev2gym 2.0.0 (see `data/SOURCES.md`). The file is read once per
process, on first use.

A preset fills `RegisterVehicle` with the AC values: bidirectional AC wallboxes are
what depots and homes install, and the connected charger's own limits cap the
power further. For a DC charger pass the `dc_*` values explicitly. The data gives
charging efficiency only; the preset assumes the same efficiency when discharging
(a symmetric converter) — pass `discharge_efficiency` where it is measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

SPECS_FILE = "ev_specs_v2g_enabled2024.json"

# A car whose AC charger is at most this is single-phase (7.4 kW = 230 V x 32 A).
_SINGLE_PHASE_MAX_KW = 7.4


class UnknownPreset(ValueError):
    """No car model of that name in the shipped specifications."""


@dataclass(frozen=True)
class CarPreset:
    name: str
    battery_capacity_kwh: float
    ac_max_charge_kw: float
    ac_max_discharge_kw: float
    dc_max_charge_kw: float
    dc_max_discharge_kw: float
    charge_efficiency: float


def _rated_efficiency(spec: Mapping[str, Any]) -> float:
    # The efficiency curves are per charging current; take the value at the highest
    # current the car supports on its AC phase count (its rated operating point).
    single_phase = float(spec["max_ac_charge_power"]) <= _SINGLE_PHASE_MAX_KW
    curve = spec["1ph_ch_efficiency" if single_phase else "3ph_ch_efficiency"]
    supported = [value for value in curve if value > 0]
    return float(supported[-1]) / 100.0


def _preset(name: str, spec: Mapping[str, Any]) -> CarPreset:
    return CarPreset(
        name=name,
        battery_capacity_kwh=float(spec["battery_capacity"]),
        ac_max_charge_kw=float(spec["max_ac_charge_power"]),
        ac_max_discharge_kw=float(spec["max_ac_discharge_power"]),
        dc_max_charge_kw=float(spec["max_dc_charge_power"]),
        dc_max_discharge_kw=float(spec["max_dc_discharge_power"]),
        charge_efficiency=_rated_efficiency(spec),
    )


@cache
def presets() -> Mapping[str, CarPreset]:
    """Every shipped preset by model name (read once, then cached)."""
    # Next to this module rather than importlib.resources: an editable install
    # exposes `actors` as a namespace path, which importlib.resources cannot read.
    text = (Path(__file__).parent / "data" / SPECS_FILE).read_text(encoding="utf-8")
    specs: dict[str, Mapping[str, Any]] = json.loads(text)
    return MappingProxyType({name: _preset(name, spec) for name, spec in specs.items()})


def preset(name: str) -> CarPreset:
    """The preset for a model name, e.g. `preset("Tesla Model 3")`.

    Raises:
        UnknownPreset: no such model; the message lists the known ones.
    """
    try:
        return presets()[name]
    except KeyError:
        known = ", ".join(sorted(presets()))
        raise UnknownPreset(f"unknown car model {name!r}; known models: {known}") from None


__all__ = ["SPECS_FILE", "CarPreset", "UnknownPreset", "preset", "presets"]
