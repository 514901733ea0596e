"""Real peers on loopback: a mosquitto broker per test (free port, generated config).

Every broker binds 127.0.0.1 only and is stopped by its fixture. Tests are skipped,
with a message saying so, only when mosquitto is not installed (CI installs it with
`scripts/install-mosquitto`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from cluster.mosquitto import Mosquitto, find_mosquitto

T = TypeVar("T")

needs_mosquitto = pytest.mark.skipif(
    find_mosquitto() is None,
    reason="mosquitto is not installed: run scripts/install-mosquitto (CI installs it)",
)


@pytest.fixture
def mosquitto(tmp_path: Any) -> Iterator[Mosquitto]:
    """An anonymous-access broker on a free loopback port, persistence on."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run scripts/install-mosquitto (CI installs it)")
    broker = Mosquitto(workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto_auth(tmp_path: Any) -> Iterator[Mosquitto]:
    """A broker that admits only user `ingest` with password `s3cret-pw`."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed: run scripts/install-mosquitto (CI installs it)")
    broker = Mosquitto(workdir=tmp_path / "mosquitto", username="ingest", password="s3cret-pw")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def arun() -> Callable[..., Any]:
    """Run one scenario coroutine to completion, failing it after `timeout_s`."""

    def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout_s):
                return await coro

        return asyncio.run(bounded())

    return run
