"""`v2g serve`: start the whole system from its config file and keep it running.

Order of start: the log actor and every entity host (the runtime), the device
gateways and the setpoint relay (when `[devices]` is configured), one dispatcher
per `[[sites]]` entry and the coordinator that keeps them alive, and a projection
follower that keeps `<data_dir>/projections.duckdb` current. SIGINT or SIGTERM
stops them in the reverse order; the log stays, it is the system.

The follower opens the projection database for each round and closes it again,
so `v2g sql` and `v2g export` (read-only) can open the same file between rounds;
a round that finds the file held by a reader simply runs at the next poll.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb

from cluster.config import ServeConfig
from cluster.runtime import Runtime, RuntimeConfig


@dataclass
class Serving:
    """What `start` started; `stop()` takes it down again."""

    runtime: Runtime
    devices: Any = None
    dispatchers: dict[str, Any] = field(default_factory=dict)
    coordinator: Any = None
    follower: threading.Thread | None = None
    stop_follower: threading.Event = field(default_factory=threading.Event)
    projection_rounds: int = 0

    def stop(self) -> None:
        self.stop_follower.set()
        if self.follower is not None:
            self.follower.join(timeout=30)
        if self.dispatchers:
            from cluster.dispatcher import stop_all

            stop_all(self.dispatchers, self.coordinator)
        if self.devices is not None:
            self.devices.stop()
        self.runtime.stop()


def follow_projections(
    log_root: str, db_path: str, stop: threading.Event, poll_s: float, on_round: Callable[[], None]
) -> None:
    from projections.store import ProjectionStore

    while not stop.is_set():
        try:
            with ProjectionStore(db_path) as store:
                store.apply(log_root)
            on_round()
        except (duckdb.IOException, duckdb.ConnectionException, duckdb.ResourceInUseException):
            # a reader holds the file this instant (another process: IOException; this
            # process: the file is attached already); next round
            pass
        stop.wait(poll_s)


def start(config: ServeConfig, runtime_config: RuntimeConfig) -> Serving:
    runtime = Runtime(runtime_config).start()
    serving = Serving(runtime)
    try:
        if config.devices is not None:
            from cluster.gateways import DeviceServices

            serving.devices = DeviceServices(runtime_config, config.devices).start()
        commands = config.dispatcher_commands()
        if commands:
            from cluster.dispatcher import start_coordinator, start_dispatchers

            serving.dispatchers = start_dispatchers(runtime, commands)
            serving.coordinator = start_coordinator(
                serving.dispatchers, config.coordinator_period_s
            )
        if config.projections.follow:

            def counted() -> None:
                serving.projection_rounds += 1

            serving.follower = threading.Thread(
                target=follow_projections,
                args=(
                    runtime_config.log_dir,
                    os.path.join(runtime_config.data_dir, "projections.duckdb"),
                    serving.stop_follower,
                    config.projections.poll_s,
                    counted,
                ),
                name="projections",
                daemon=True,
            )
            serving.follower.start()
    except BaseException:
        serving.stop()
        raise
    return serving


def serve_forever(
    config: ServeConfig, runtime_config: RuntimeConfig, say: Callable[[str], None]
) -> int:
    runtime_config.telemetry.configure()  # this process; the actors configure themselves
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    serving = start(config, runtime_config)
    parts = [f"log + hosts ({', '.join(sorted(serving.runtime.deciders))})"]
    if serving.devices is not None:
        parts.append(f"OCPP on ports {serving.devices.ocpp_ports()}")
    if serving.dispatchers:
        parts.append(f"dispatchers for {', '.join(sorted(serving.dispatchers))}")
    if serving.follower is not None:
        parts.append("projection follower")
    say(f"serving {runtime_config.name} from {runtime_config.data_dir}: " + "; ".join(parts))
    done.wait()
    say("stopping")
    with contextlib.suppress(Exception):
        serving.stop()
    return 0
