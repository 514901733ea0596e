"""Dispatchers on Ray: one actor per site, and a coordinator above them.

`SiteDispatcher` is a plain class (unit-testable, and what the backtest runs in
simulated time); `start_dispatchers` makes it a Ray actor in one place, with a
background loop that follows the log, checks the watchdog and ticks the policy.
It reads state only from events (`wait_for` + `read_all(from_position)` on the log
actor) and acts only by sending commands through the runtime's hosts: it never
writes another entity's state. The vehicles' control leases (`GrantControl` with
`controller_id = "dispatch-<site_id>"`) make sure exactly one dispatcher commands a
vehicle; the vehicle decider refuses anyone else.

`Coordinator` splits a fleet-wide power target between the sites (in proportion to
their connected power) and sends each site a keep-alive every second; a site that
hears nothing for `watchdog_timeout_s` puts its vehicles into the safe state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import ray

from actors.decider import CommandResult, Decider
from actors.dispatch import DISPATCH, ConfigureDispatcher, Decision, SitePolicy
from actors.market import MARKET
from actors.tracing import continued, handed_on, traceparent_in
from actors.vehicle import VEHICLE
from cluster.client import FleetClient
from cluster.runtime import NAMESPACE, Runtime, RuntimeConfig, gather, tune_gc
from events.base import Command
from events.dispatch import KeepAliveSource

__all__ = [
    "Coordinator",
    "SiteDispatcher",
    "dispatch_deciders",
    "embedded_fleet",
    "start_coordinator",
    "start_dispatchers",
    "stop_all",
]

_FOLD_SLICE = 250  # log rows folded per hold of the policy's lock
# command_id: the policy finds in it its own vehicle commands whose decision record is lost
_ROWS = [
    "position",
    "stream_id",
    "stream_version",
    "type",
    "schema_version",
    "payload",
    "metadata",
    "command_id",
]


# Calls a site dispatcher actor runs at once, so decisions it can have in flight.
DISPATCHER_CONCURRENCY = 8


def dispatch_deciders() -> list[Decider[Any]]:
    """The entity kinds a dispatching fleet runs: vehicles, price feeds, dispatchers."""
    return [VEHICLE, MARKET, DISPATCH]


def embedded_fleet(data_dir: str, **config: Any) -> FleetClient:
    """A `FleetClient` on a local Ray whose runtime also hosts markets and dispatchers."""
    owns = not ray.is_initialized()
    runtime = Runtime(RuntimeConfig(data_dir=data_dir, **config), dispatch_deciders()).start()
    return FleetClient(runtime, owns_ray=owns)


def _now() -> datetime:
    return datetime.now(UTC)


class SiteDispatcher:
    """One site's policy, fed from the log and acting through the hosts.

    Args:
        runtime: a started `Runtime` hosting vehicle, market and dispatch kinds.
        site_id: the site.
        configure: the site's `ConfigureDispatcher` (sent once; a repeat changes nothing).
        watched: keep-alive sources whose silence trips the watchdog.
        clock: where "now" comes from (the backtest passes simulated time explicitly).
    """

    def __init__(
        self,
        runtime: Runtime,
        site_id: str,
        configure: ConfigureDispatcher | None = None,
        watched: Sequence[KeepAliveSource] = (),
        market_id: str = "nl-day-ahead",
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.runtime = runtime
        self.policy = SitePolicy(site_id, market_id=market_id, watched=watched)
        self.clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self.results: list[CommandResult] = []  # rejected ones, for operators and tests
        self._cause = ""  # traceparent of the newest traced event read
        self.sync()
        # A stream already there means a previous incarnation ran: decisions it had in
        # flight must not have their numbers reused (`SitePolicy.reserve_in_flight`).
        restarted = self.policy.stream_version > 0
        if configure is not None:
            self.send([configure])
            self.sync()
        if restarted:
            self.policy.reserve_in_flight(DISPATCHER_CONCURRENCY)
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            # A long-lived actor that allocates ~1,000 commands per frequency event:
            # with CPython's default thresholds, 100 events at 1,000 vehicles cost 791
            # collections (437 ms), full passes over the fleet's folded state up to
            # 110 ms each: the p99 of a frequency response. Not in a driver (backtest).
            tune_gc()

    # ------------------------------------------------------------------ io

    def sync(self, wait_s: float = 0.0) -> int:
        """Fold every event after our position (waiting up to `wait_s` for new ones)."""
        log = self.runtime.log
        position = self.policy.position
        if wait_s > 0:
            ray.get(log.wait_for.remote(position, wait_s))
        table = ray.get(log.read_all.remote(position + 1, None, _ROWS))
        if table.num_rows:
            rows = table.to_pylist()
            # In slices, so a frequency event waits for one slice at most (~3 ms), not
            # for the ~12 ms the 1,000 setpoint events of the last one take to fold.
            for start in range(0, len(rows), _FOLD_SLICE):
                with self._lock:  # a concurrent sync may have folded some already
                    done = self.policy.position
                    self.policy.apply_rows(
                        r for r in rows[start : start + _FOLD_SLICE] if r["position"] > done
                    )
            with self._lock:
                # the newest traced event is what the next decision answers to
                for row in reversed(rows):
                    cause = traceparent_in(row["metadata"])
                    if cause:
                        self._cause = cause
                        break
        return self.policy.position

    def send(self, commands: Sequence[Command]) -> list[CommandResult]:
        """Route commands to their hosts in one round (one Ray call per shard, packed)."""
        if not commands:
            return []
        refs, order = self.runtime.route(commands, pack=True)
        return self._answered(gather(refs, order, len(commands)))

    def _answered(self, results: list[CommandResult]) -> list[CommandResult]:
        self.results.extend(r for r in results if not r.ok)
        del self.results[:-100]
        return results

    def act(self, decision: Decision) -> list[CommandResult]:
        # Its own record and the vehicle commands travel together, one host call each
        # at once, rather than the record first: that would put a whole log round
        # (3-10 ms) in front of every frequency response. What an auditor needs holds
        # for every answer a caller gets: it comes only after each host's append is
        # acknowledged, so the measurement (GridSignalRecorded), the decision
        # (FrequencyResponseIssued) and every vehicle's answer are durable. Ids are
        # fixed by decision_seq, so a retry repeats, never doubles. A crash between the
        # appends can leave vehicle commands (`<controller>:<seq>:<vehicle>`) whose
        # decision record is lost: the restarted policy finds them as it folds the log
        # (seq above its stream's decision_seq) and records `OrphanedDecisionRecorded`
        # for that seq before its next decision, which takes seq + 1, so its new
        # commands are never answered as repeats of the old ones. Commands of a lost
        # decision that reach a host only after the restart has folded the log (in
        # flight during the crash) cannot be seen; a restart therefore never reuses
        # the next `DISPATCHER_CONCURRENCY` numbers either (`reserve_in_flight`).
        commands: list[Command] = [*decision.dispatch, *decision.vehicle]
        batches = decision.setpoints
        if self._cause and (commands or batches):  # it continues the trace of what caused it
            cause, self._cause = self._cause, ""
            with continued(cause, "dispatcher.decision", {"site_id": self.policy.site_id}) as span:
                traceparent = handed_on(span, cause)
            commands = [c.model_copy(update={"traceparent": traceparent}) for c in commands]
            batches = [b.model_copy(update={"traceparent": traceparent}) for b in batches]
        if not batches:
            return self.send(commands)
        refs, order = self.runtime.route(commands, pack=True) if commands else ([], [])
        n = len(commands)
        for batch in batches:
            batch_refs, batch_order = self.runtime.route_batch(batch)
            refs += batch_refs
            order += [[n + i for i in indices] for indices in batch_order]
            n += len(batch)
        return self._answered(gather(refs, order, n))

    # ------------------------------------------------------------------ inputs

    def tick(self, at: datetime | None = None, valid_for_s: float | None = None) -> Decision:
        self.sync()
        at = at or self.clock()
        with self._lock:
            job = self.policy.plan_job(at)
        # Solving a re-plan takes 0.1-1 s at 1,000 vehicles: outside the lock, so a
        # frequency event meanwhile is answered at once (the tick re-solves only if
        # what the plan depends on changed in between).
        solved = job.solve() if job is not None else None
        with self._lock:
            decision = self.policy.tick(at, valid_for_s, solved)
        self.act(decision)
        return decision

    def grid_signal(
        self,
        frequency_hz: float | None,
        site_load_kw: float | None = None,
        at: datetime | None = None,
        regulation_signal: float = 0.0,
    ) -> int:
        """A grid measurement; returns how many vehicle commands were accepted."""
        with self._lock:
            decision = self.policy.on_grid_signal(
                at or self.clock(), frequency_hz, regulation_signal, site_load_kw
            )
        results = self.act(decision)
        return sum(1 for r in results[len(decision.dispatch) :] if r.ok)

    def keep_alive(self, at: datetime | None = None) -> None:
        with self._lock:
            decision = self.policy.keep_alive("coordinator", at or self.clock())
        self.act(decision)

    def set_target(self, target_kw: float | None) -> None:
        with self._lock:
            self.policy.set_target(target_kw)

    def emergency_stop(self, reason: str, at: datetime | None = None) -> int:
        with self._lock:
            decision = self.policy.emergency_stop(at or self.clock(), reason)
        return sum(1 for r in self.act(decision) if r.ok)

    def clear_emergency_stop(self, reason: str, at: datetime | None = None) -> None:
        with self._lock:
            decision = self.policy.clear_emergency_stop(at or self.clock(), reason)
        self.act(decision)

    def check_watchdog(self, at: datetime | None = None) -> int:
        with self._lock:
            decision = self.policy.check_watchdog(at or self.clock())
        return sum(1 for r in self.act(decision) if r.ok)

    def connected_kw(self) -> float:
        """Nameplate discharge power of the site's controllable vehicles (for the coordinator)."""
        with self._lock:
            views = self.policy.views(self.clock())
        return sum(v.rated_discharge_kw for v in views.values() if not v.foreign)

    def status(self) -> dict[str, Any]:
        state = self.policy.state
        return {
            "site_id": self.policy.site_id,
            "position": self.policy.position,
            "decision_seq": state.decision_seq,
            "plan_seq": state.plan_seq,
            "halted": state.halted,
            "vehicles": len(self.policy.vehicles),
            "rejected": [r.reason for r in self.results[-5:]],
        }

    # ------------------------------------------------------------------ the loop

    def start(self, period_s: float = 1.0) -> None:
        """Follow the log and tick every `period_s` in a background thread."""
        if self._loop is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.sync(wait_s=period_s / 2)
                    self.tick()
                except Exception as exc:  # keep the loop alive; the log says what happened
                    self.results.append(
                        CommandResult(
                            command_id="loop",
                            stream_id=self.policy.controller_id,
                            status="rejected",
                            reason=f"{type(exc).__name__}: {exc}",
                        )
                    )
                self._stop.wait(period_s / 2)

        self._loop = threading.Thread(target=loop, name="dispatch-loop", daemon=True)
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=10)
            self._loop = None

    def ping(self) -> str:
        return "ok"


class Coordinator:
    """Splits a fleet-wide target between site dispatchers and keeps them alive."""

    def __init__(self, dispatchers: dict[str, Any], period_s: float = 1.0) -> None:
        self.dispatchers = dispatchers  # site id -> SiteDispatcher actor handle
        self.period_s = period_s
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="keep-alive", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            if not self._paused.is_set():
                ray.get([d.keep_alive.remote() for d in self.dispatchers.values()])
            self._stop.wait(self.period_s)

    def split(self, target_kw: float | None) -> dict[str, float | None]:
        """Share a fleet target (> 0 import) between sites by their connected power."""
        if target_kw is None:
            ray.get([d.set_target.remote(None) for d in self.dispatchers.values()])
            return dict.fromkeys(self.dispatchers)
        sites = sorted(self.dispatchers)
        power = ray.get([self.dispatchers[s].connected_kw.remote() for s in sites])
        total = sum(power)
        shares = {
            s: target_kw * (p / total if total > 0 else 1 / len(sites))
            for s, p in zip(sites, power, strict=True)
        }
        ray.get([self.dispatchers[s].set_target.remote(shares[s]) for s in sites])
        return dict(shares)

    def pause_keep_alive(self) -> None:
        self._paused.set()

    def resume_keep_alive(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_dispatchers(
    runtime: Runtime,
    configs: Sequence[ConfigureDispatcher],
    watched: Sequence[KeepAliveSource] = ("coordinator",),
    loop_period_s: float | None = 1.0,
    dispatcher_class: type[SiteDispatcher] = SiteDispatcher,
) -> dict[str, Any]:
    """One named Ray actor per site (`v2g-<name>-dispatch-<site>`); returns site -> handle.

    `dispatcher_class` lets a benchmark host an instrumented subclass the same way.
    """
    handles = {}
    for config in configs:
        handles[config.site_id] = (
            ray.remote(dispatcher_class)
            .options(
                name=f"v2g-{runtime.config.name}-dispatch-{config.site_id}",
                namespace=NAMESPACE,
                get_if_exists=True,
                max_concurrency=DISPATCHER_CONCURRENCY,
                max_restarts=-1,
                max_task_retries=-1,
                num_cpus=0,
            )
            .remote(runtime, config.site_id, config, tuple(watched))
        )
    ray.get([h.ping.remote() for h in handles.values()])
    if loop_period_s is not None:
        ray.get([h.start.remote(loop_period_s) for h in handles.values()])
    return handles


def start_coordinator(dispatchers: dict[str, Any], period_s: float = 1.0) -> Any:
    handle = (
        ray.remote(Coordinator)
        .options(max_concurrency=4, num_cpus=0, max_restarts=-1)
        .remote(dispatchers, period_s)
    )
    return handle


def stop_all(dispatchers: dict[str, Any], coordinator: Any = None) -> None:
    """Stop the loops and kill the actors (their decisions stay in the log)."""
    if coordinator is not None:
        ray.get(coordinator.stop.remote())
        ray.kill(coordinator, no_restart=True)
    ray.get([d.stop.remote() for d in dispatchers.values()])
    for d in dispatchers.values():
        ray.kill(d, no_restart=True)
