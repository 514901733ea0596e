"""The one seam between gateways and the entity hosts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from actors.decider import CommandResult
from events.base import Command


class CommandSink(Protocol):
    """Where a gateway sends the commands it derived from device messages.

    The runtime's implementation routes each command to the host shard that owns
    its stream; tests of pure gateway logic use `RecordingSink`.
    """

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]: ...


class RecordingSink:
    """Unit-test fake: records commands and answers `recorded` (or a scripted answer)."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self._seen: dict[str, CommandResult] = {}

    async def submit(self, commands: Sequence[Command]) -> list[CommandResult]:
        results = []
        for command in commands:
            if command.command_id in self._seen:
                first = self._seen[command.command_id]
                results.append(replace(first, duplicate=True))
                continue
            self.commands.append(command)
            result = CommandResult(
                command_id=command.command_id,
                stream_id=command.stream_id,
                status="recorded",
                event_types=(type(command).__name__,),
            )
            self._seen[command.command_id] = result
            results.append(result)
        return results
