"""The devices a fleet talks to: stations, inverters, the telemetry broker, id tokens.

One validated pydantic model, read from a JSON file (`DeviceConfig.load(path)`) or
built in code. The gateway actors (`cluster/gateways.py`) take it whole; each picks
what it serves. Secrets may be given inline (tests) or, better, as the name of an
environment variable (`password_env`), so no password lives in a file of the
repository.

Example (JSON)::

    {
      "ocpp": {"host": "0.0.0.0", "port": 8080, "gateways": 2,
               "tls_cert_path": "/etc/v2g/csms.crt", "tls_key_path": "/etc/v2g/csms.key"},
      "stations": [
        {"station_id": "CS-001", "password_env": "V2G_CS_001_PASSWORD", "site_id": "depot-a",
         "max_charge_kw": 11, "max_discharge_kw": 11, "ocpp_version": "2.1"}
      ],
      "inverters": [
        {"inverter_id": "inv-7", "site_id": "depot-a", "host": "10.0.4.17", "port": 502,
         "device_id": 1, "rated_power_kw": 11}
      ],
      "broker": {"host": "mqtt.example.net", "port": 8883, "username": "ingest",
                 "password_env": "V2G_MQTT_PASSWORD", "tls_ca_path": "/etc/v2g/ca.pem"},
      "vehicles": [{"vehicle_id": "van-1", "id_tokens": ["04A1B2C3"]}]
    }

Station `CS-001` then connects to `ws[s]://<host>:<port + gateway index>/ocpp/CS-001`;
`station_url()` says which port serves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import zlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

_ID = r"^[A-Za-z0-9_.:*+|@-]+$"
StationId = Annotated[str, Field(min_length=1, max_length=48, pattern=_ID)]
Port = Annotated[int, Field(ge=0, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConfigError(ValueError):
    """The device configuration cannot be used (a missing secret, a bad TLS file)."""


def _secret(inline: SecretStr | None, env: str | None, what: str) -> str | None:
    if inline is not None:
        return inline.get_secret_value()
    if env is None:
        return None
    value = os.environ.get(env)
    if value is None:
        raise ConfigError(f"{what}: environment variable {env!r} is not set")
    return value


class OcppSettings(_Model):
    """Where the CSMS gateway actors listen. Gateway `i` listens on `port + i`."""

    host: str = "127.0.0.1"
    port: Port = 8080  # 0: each gateway asks the OS for a free port (tests)
    gateways: int = Field(default=1, ge=1, le=64)
    tls_cert_path: Path | None = None  # both cert and key: security profile 2 (TLS)
    tls_key_path: Path | None = None
    heartbeat_interval_s: int = Field(default=60, ge=1)
    offline_grace_s: float = Field(default=30.0, ge=0)
    setpoint_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> OcppSettings:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("give both tls_cert_path and tls_key_path, or neither")
        return self

    def port_of(self, gateway: int) -> int:
        return 0 if self.port == 0 else self.port + gateway

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context (profile 2), or None for plain WebSocket (profile 1)."""
        if self.tls_cert_path is None or self.tls_key_path is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert_path, self.tls_key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the CSMS certificate/key: {exc}") from exc
        return context


class StationConfig(_Model):
    """One OCPP charging station (= one charger entity, `charger-<station_id>`)."""

    station_id: StationId
    password: SecretStr | None = None
    password_env: str | None = None
    enabled: bool = True
    site_id: str = Field(min_length=1, max_length=100)
    max_charge_kw: float = Field(gt=0, allow_inf_nan=False)
    max_discharge_kw: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    ocpp_version: Literal["2.0.1", "2.1"] = "2.1"
    evse_id: int = Field(default=1, ge=1)  # where setpoints go when no transaction says
    gateway: int | None = Field(default=None, ge=0)  # default: a stable hash of the id

    @model_validator(mode="after")
    def _checks(self) -> StationConfig:
        if (self.password is None) == (self.password_env is None):
            raise ValueError(f"station {self.station_id}: give password or password_env")
        if self.ocpp_version == "2.0.1" and self.max_discharge_kw > 0:
            raise ValueError(
                f"station {self.station_id}: OCPP 2.0.1 cannot discharge, "
                "max_discharge_kw must be 0"
            )
        return self

    def secret(self) -> str:
        value = _secret(self.password, self.password_env, f"station {self.station_id}")
        assert value is not None
        return value


class InverterConfig(_Model):
    """One Modbus TCP inverter (`inverter-<inverter_id>`); one Modbus actor per site."""

    inverter_id: str = Field(min_length=1, max_length=100, pattern=_ID)
    site_id: str = Field(min_length=1, max_length=100, pattern=_ID)
    host: str
    port: Port = 502
    device_id: int = Field(default=1, ge=0, le=255)
    rated_power_kw: float = Field(gt=0, le=3276.7, allow_inf_nan=False)
    derate_above_c: float = 65.0
    safe_state_above_c: float = 85.0
    poll_interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)


class BrokerConfig(_Model):
    """The MQTT broker that carries vehicle telemetry, and how many actors ingest it."""

    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    tls_ca_path: Path | None = None  # TLS on when given (port 8883 by convention)
    tls_cert_path: Path | None = None  # client certificate, for mutual TLS
    tls_key_path: Path | None = None
    site_id: str = "+"  # `+`: every site
    shared_group: str = Field(default="v2g", min_length=1, pattern=r"^[^/+#$]+$")
    ingest_actors: int = Field(default=1, ge=1, le=32)
    session_expiry_s: int = Field(default=3600, ge=0)
    max_batch: int = Field(default=500, ge=1)

    @model_validator(mode="after")
    def _checks(self) -> BrokerConfig:
        if self.password is not None and self.password_env is not None:
            raise ValueError("broker: give password or password_env, not both")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("broker: give both tls_cert_path and tls_key_path, or neither")
        if self.tls_cert_path is not None and self.tls_ca_path is None:
            raise ValueError("broker: a client certificate needs tls_ca_path (TLS)")
        return self

    def secret(self) -> str | None:
        return _secret(self.password, self.password_env, "broker")

    def tls_context(self) -> ssl.SSLContext | None:
        if self.tls_ca_path is None:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.tls_ca_path))
            if self.tls_cert_path is not None and self.tls_key_path is not None:
                context.load_cert_chain(self.tls_cert_path, self.tls_key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the broker TLS files: {exc}") from exc
        return context


class VehicleBinding(_Model):
    """The id tokens (RFID card, ISO 15118 contract) by which a station names a vehicle."""

    vehicle_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
    id_tokens: tuple[str, ...] = Field(min_length=1)


class DeviceConfig(_Model):
    ocpp: OcppSettings = OcppSettings()
    stations: tuple[StationConfig, ...] = ()
    inverters: tuple[InverterConfig, ...] = ()
    broker: BrokerConfig | None = None
    vehicles: tuple[VehicleBinding, ...] = ()
    #: how long a zero setpoint (safe state, unplug) stays on a station
    zero_hold_s: float = Field(default=86_400.0, gt=0)

    _stations: dict[str, StationConfig] = PrivateAttr(default_factory=dict)
    _token_vehicle: dict[str, str] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: object, /) -> None:
        self._stations = {s.station_id: s for s in self.stations}
        self._token_vehicle = {t: v.vehicle_id for v in self.vehicles for t in v.id_tokens}

    @model_validator(mode="after")
    def _consistent(self) -> DeviceConfig:
        _unique("station_id", [s.station_id for s in self.stations])
        _unique("inverter_id", [i.inverter_id for i in self.inverters])
        _unique("vehicle_id", [v.vehicle_id for v in self.vehicles])
        _unique("id token", [t for v in self.vehicles for t in v.id_tokens])
        _unique("inverter address", [f"{i.host}:{i.port}/{i.device_id}" for i in self.inverters])
        for station in self.stations:
            if station.gateway is not None and station.gateway >= self.ocpp.gateways:
                raise ValueError(
                    f"station {station.station_id}: gateway {station.gateway} does not exist "
                    f"(ocpp.gateways = {self.ocpp.gateways})"
                )
        return self

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceConfig:
        """Read and validate a JSON file.

        Raises:
            pydantic.ValidationError: a field is missing, out of range or inconsistent.
        """
        return cls.model_validate_json(Path(path).read_text())

    # --- lookups the actors use ---------------------------------------------------

    def gateway_of(self, station_id: str) -> int:
        """Which CSMS gateway actor serves a station (explicit, else a stable hash)."""
        station = self._stations.get(station_id)
        if station is not None and station.gateway is not None:
            return station.gateway
        return zlib.crc32(station_id.encode()) % self.ocpp.gateways

    def stations_of(self, gateway: int) -> list[StationConfig]:
        return [s for s in self.stations if self.gateway_of(s.station_id) == gateway]

    def station(self, station_id: str) -> StationConfig | None:
        return self._stations.get(station_id)

    def inverter(self, inverter_id: str) -> InverterConfig | None:
        return next((i for i in self.inverters if i.inverter_id == inverter_id), None)

    def inverter_sites(self) -> list[str]:
        return sorted({i.site_id for i in self.inverters})

    def inverters_of(self, site_id: str) -> list[InverterConfig]:
        return [i for i in self.inverters if i.site_id == site_id]

    def vehicle_of_token(self, id_token: str) -> str | None:
        return self._token_vehicle.get(id_token)

    def tokens_of(self, vehicle_id: str) -> tuple[str, ...]:
        for binding in self.vehicles:
            if binding.vehicle_id == vehicle_id:
                return binding.id_tokens
        return ()

    def station_url(self, station_id: str, port: int | None = None, path: str = "/ocpp") -> str:
        """The URL (without the station id) a station is configured with."""
        scheme = "wss" if self.ocpp.tls_cert_path else "ws"
        host = "127.0.0.1" if self.ocpp.host in ("0.0.0.0", "") else self.ocpp.host
        port = self.ocpp.port_of(self.gateway_of(station_id)) if port is None else port
        return f"{scheme}://{host}:{port}{path}"


def fingerprint(*parts: object) -> str:
    """A short stable digest of settings, for idempotent registration command ids."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


__all__ = [
    "BrokerConfig",
    "ConfigError",
    "DeviceConfig",
    "InverterConfig",
    "OcppSettings",
    "StationConfig",
    "VehicleBinding",
    "fingerprint",
]
