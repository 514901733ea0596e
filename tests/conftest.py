from __future__ import annotations

import pytest

from cluster.tracing import Telemetry, configure


@pytest.fixture(scope="session")
def telemetry() -> Telemetry:
    """In-memory traces and metrics for the whole test session.

    OpenTelemetry allows one tracer provider per process, so every test that looks
    at spans shares this one and picks its own spans out by name or trace id.
    """
    return configure("memory")
