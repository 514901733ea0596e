"""The one configuration file of a running system (`v2g serve --config FILE`), validated.

TOML, with every value overridable from the environment as
`V2G__<SECTION>__<KEY>=value` (double underscores separate the path; the value is
read as a TOML value when it parses as one, else as a string), e.g.
`V2G__SYSTEM__DATA_DIR=/mnt/v2g` or `V2G__TELEMETRY__EXPORTER=otlp`.

```toml
[system]
name = "fleet"           # several systems can share one Ray cluster
data_dir = "var"         # the log, snapshots and projections live here
[system.shards]
vehicle = 2

[telemetry]
exporter = "none"        # none | console | otlp | prometheus | file

[projections]
follow = true            # keep <data_dir>/projections.duckdb current

[devices]                # stations, inverters, broker: see docs/ocpp.md, modbus.md, mqtt.md
[[sites]]                # one dispatcher per site: see actors/dispatch.py ConfigureDispatcher
site_id = "depot-a"
transformers = [{transformer_id = "t1", import_kw = 400, export_kw = 250}]
```

A bad value fails with the file, the dotted key and the reason, before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster.device_config import DeviceConfig
from cluster.runtime import RuntimeConfig
from cluster.tracing import TelemetrySettings

ENV_PREFIX = "V2G__"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SystemSection(_Section):
    name: str = Field(default="fleet", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    data_dir: str = "var"
    partitions: int = Field(default=4, ge=1, le=256)
    seal_events: int = Field(default=100_000, ge=1_000)
    shards: dict[str, int] = Field(default_factory=lambda: {"vehicle": 2})
    num_cpus: int | None = Field(default=None, ge=1)
    log_resources: dict[str, float] = Field(default_factory=dict)


class TelemetrySection(_Section):
    exporter: Literal["none", "console", "otlp", "prometheus", "file"] = "none"
    otlp_endpoint: str | None = None
    prometheus_port: int = Field(default=9464, ge=1, le=65535)
    file_dir: str | None = None  # "file": default <data_dir>/traces


class ProjectionsSection(_Section):
    follow: bool = True
    poll_s: float = Field(default=0.5, gt=0, le=60)


class ServeConfig(_Section):
    system: SystemSection = SystemSection()
    telemetry: TelemetrySection = TelemetrySection()
    projections: ProjectionsSection = ProjectionsSection()
    devices: DeviceConfig | None = None
    sites: tuple[dict[str, Any], ...] = ()
    coordinator_period_s: float = Field(default=1.0, gt=0, le=5)

    def runtime(self, data_dir: str | None = None, address: str | None = None) -> RuntimeConfig:
        s = self.system
        return RuntimeConfig(
            name=s.name,
            data_dir=data_dir or s.data_dir,
            partitions=s.partitions,
            seal_events=s.seal_events,
            shards=dict(s.shards),
            num_cpus=s.num_cpus,
            address=address,
            log_resources=dict(s.log_resources),
            telemetry=TelemetrySettings(
                **self.telemetry.model_dump(exclude={"file_dir"}),
                file_dir=self.telemetry.file_dir or os.path.join(data_dir or s.data_dir, "traces"),
            ),
        )

    def dispatcher_commands(self) -> list[Any]:
        """Each site's `ConfigureDispatcher`, with an id that changes only with its content."""
        from actors.dispatch import ConfigureDispatcher

        commands = []
        for site in self.sites:
            digest = hashlib.sha256(json.dumps(site, sort_keys=True).encode()).hexdigest()[:12]
            site_id = site.get("site_id", "?")
            try:
                commands.append(
                    ConfigureDispatcher(
                        command_id=f"configure-{site_id}-{digest}",
                        issued_at=datetime.now(UTC),
                        **site,
                    )
                )
            except ValidationError as exc:
                raise ConfigError(_explain(exc, prefix=f"sites[{site_id}]")) from None
        return commands


def _explain(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        key = f"{prefix}.{key}" if prefix and key else prefix or key
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" = {value!r}"
        lines.append(f"{key}{shown}: {err['msg']}")
    return "; ".join(lines)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(doc: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay `V2G__A__B=value` variables on the parsed file (a new dict)."""
    merged = json.loads(json.dumps(doc))
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} does not name a table")
            node = child
        node[path[-1]] = _env_value(text)
    return merged


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> ServeConfig:
    """Read, overlay the environment, validate. `path=None`: defaults plus the environment."""
    doc: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    doc = apply_env(doc, os.environ if env is None else env)
    try:
        config = ServeConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_explain(exc)}") from None
    config.dispatcher_commands()  # site settings are validated now, not at start
    return config
