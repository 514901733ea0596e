"""The Python client: the one way users talk to a running fleet.

Users never see `.remote()` or `ray.get`; Ray's errors become `FleetError`s with
a message that says what to do.

Example::

    from cluster.client import FleetClient
    from actors.vehicle import RegisterVehicle

    with FleetClient.embedded("var") as fleet:
        register = RegisterVehicle(command_id="reg-van-1", issued_at=now,
                                   vehicle_id="van-1", model="Volkswagen ID.4", site_id="depot")
        result = fleet.send(register)
        print(result.status, fleet.state("vehicle", "van-1"))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pyarrow.compute as pc
import ray
import ray.exceptions

from actors.decider import CommandResult
from cluster.runtime import Runtime, RuntimeConfig, gather
from events.base import Command, RecordedEvent
from events.log import to_recorded


class FleetError(Exception):
    """Something went wrong in the fleet system itself (not a refused command)."""


class FleetUnavailable(FleetError):
    """The fleet's actors cannot be reached (not started, or the cluster is gone)."""


class CommandRefused(FleetError):
    """Raised by `send(..., check=True)` when the command was rejected."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(f"{result.command_id} rejected: {result.reason}")
        self.result = result


def _translate(exc: BaseException) -> FleetError:
    if isinstance(exc, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnavailableError):
        return FleetUnavailable(f"a fleet actor is unavailable: {exc.__class__.__name__}; retry")
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return FleetError(f"{type(cause).__name__}: {cause}")
    if isinstance(exc, ray.exceptions.RayError):
        return FleetError(f"{type(exc).__name__}: {exc}")
    return FleetError(str(exc))


class FleetClient:
    """Send commands, read state and events; sync and async."""

    def __init__(self, runtime: Runtime, owns_ray: bool) -> None:
        self._runtime = runtime
        self._owns_ray = owns_ray

    @classmethod
    def embedded(cls, data_dir: str = "var", **config: Any) -> FleetClient:
        """Start the whole system on a local Ray, the log under `data_dir`."""
        owns = not ray.is_initialized()
        runtime = Runtime(RuntimeConfig(data_dir=data_dir, **config)).start()
        return cls(runtime, owns_ray=owns)

    @classmethod
    def connect(cls, address: str, data_dir: str = "var", **config: Any) -> FleetClient:
        """Join a running cluster (e.g. `ray://head:10001` or `auto`) and find its actors."""
        try:
            runtime = Runtime(RuntimeConfig(data_dir=data_dir, address=address, **config)).start()
        except ConnectionError as exc:
            raise FleetUnavailable(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
        return cls(runtime, owns_ray=False)

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    # ------------------------------------------------------------- commands

    def send(self, command: Command, check: bool = False) -> CommandResult:
        """Send one command; `check=True` raises `CommandRefused` if it was rejected."""
        [result] = self.send_many([command])
        if check and not result.ok:
            raise CommandRefused(result)
        return result

    def send_many(self, commands: Sequence[Command]) -> list[CommandResult]:
        """Send a batch (one Ray call per owning shard); results in the same order.

        A shard's share crosses Ray packed: as a columnar batch where its commands
        have one (readings, setpoints), else as one pickle.
        """
        if not commands:
            return []
        try:
            refs, order = self._runtime.route(commands, pack=True)
            return gather(refs, order, len(commands))
        except TypeError as exc:
            raise FleetError(str(exc)) from None
        except ray.exceptions.RayError as exc:
            raise _translate(exc) from None

    async def send_async(self, command: Command) -> CommandResult:
        [result] = await self.send_many_async([command])
        return result

    async def send_many_async(self, commands: Sequence[Command]) -> list[CommandResult]:
        if not commands:
            return []
        try:
            refs, order = self._runtime.route(commands, pack=True)
            batches = await asyncio.gather(*refs)
        except TypeError as exc:
            raise FleetError(str(exc)) from None
        except ray.exceptions.RayError as exc:
            raise _translate(exc) from None
        results: list[CommandResult | None] = [None] * len(commands)
        for indices, batch in zip(order, batches, strict=True):
            for i, result in zip(indices, batch, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    # ---------------------------------------------------------------- reads

    def state(self, kind: str, entity_id: str) -> Any:
        """The current state of one entity (e.g. `state("vehicle", "van-1")`)."""
        if kind not in self._runtime.deciders:
            raise FleetError(
                f"unknown entity kind {kind!r}; known: {sorted(self._runtime.deciders)}"
            )
        return self._call(self._runtime.host_for(kind, entity_id).state.remote(entity_id))

    def states(self, kind: str) -> dict[str, Any]:
        """Every entity of a kind, by stream id."""
        merged: dict[str, Any] = {}
        for part in self._call_many([h.states.remote() for h in self._runtime.hosts(kind)]):
            merged.update(part)
        return merged

    def events(self, stream_id: str, from_version: int = 1) -> list[RecordedEvent]:
        return to_recorded(
            self._call(self._runtime.log.read_stream.remote(stream_id, from_version))
        )

    def watermark(self) -> int:
        return int(self._call(self._runtime.log.watermark.remote()))

    async def subscribe(
        self,
        from_position: int = 1,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        poll_s: float = 1.0,
    ) -> AsyncIterator[RecordedEvent]:
        """Every event from `from_position` on, in log order, as it becomes durable.

        Args:
            types: only these event types (e.g. ["VehicleSetpointAccepted"]).
            stream_prefix: only streams starting with this (e.g. "vehicle-van-1").
            poll_s: how long one wait for new events may last before it is renewed.

        Example::

            async for event in fleet.subscribe(types=["ChargerPowerDivergenceDetected"]):
                print(event.stream_id, event.event())
        """
        log = self._runtime.log
        after = from_position - 1
        while True:
            try:
                mark, table = await log.follow.remote(
                    after, poll_s, None, None, None if types is None else list(types)
                )
                if mark <= after:
                    continue
            except ray.exceptions.RayError as exc:
                raise _translate(exc) from None
            after = mark
            if stream_prefix is not None:
                table = table.filter(pc.starts_with(table.column("stream_id"), stream_prefix))
            for event in to_recorded(table):
                yield event

    def snapshot(self) -> list[int]:
        """Snapshot every host shard now (restarts then fold only what follows)."""
        refs = [h.snapshot.remote() for hosts in self._runtime._hosts.values() for h in hosts]
        return list(self._call_many(refs))

    def _call(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise _translate(exc) from None

    def _call_many(self, refs: list[Any]) -> list[Any]:
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayError as exc:
            raise _translate(exc) from None

    # ------------------------------------------------------------- lifetime

    def close(self, stop: bool = True) -> None:
        """Stop the actors this client started (the log folder stays) and Ray if it owns it."""
        if stop:
            self._runtime.stop()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
