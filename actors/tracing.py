"""Trace context that travels with commands and events (W3C `traceparent`).

Also the metric instruments every part records into (`events_appended`,
`command_latency_ms`, `dispatch_latency_ms`, `soc_headroom_kwh`, `alarms`).

A gateway that hears a device starts a span and puts its `traceparent` on the
command; the host continues it around decide and writes the decide span's
context into the event's metadata; a dispatcher that reacts to the event
continues from there, and so on down to the device call. Without a configured
tracer provider (see `cluster.tracing`) every span here is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("v2gfleet")

_meter = metrics.get_meter("v2gfleet")
events_appended = _meter.create_counter("v2g.events.appended", unit="{event}")
commands_handled = _meter.create_counter("v2g.commands", unit="{command}")
command_latency_ms = _meter.create_histogram("v2g.command.latency", unit="ms")
dispatch_latency_ms = _meter.create_histogram("v2g.dispatch.latency", unit="ms")
soc_headroom_kwh = _meter.create_histogram("v2g.soc.headroom", unit="kWh")
alarms = _meter.create_counter("v2g.alarms", unit="{alarm}")


def traceparent_of(span: trace.Span) -> str:
    """The W3C `traceparent` of a span ("" when it is not recording)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def handed_on(span: trace.Span, incoming: str) -> str:
    """What to hand on: this span's context, or (no tracer configured in this
    process) the incoming one unchanged, so the trace id still travels."""
    return traceparent_of(span) or incoming


def current_traceparent() -> str:
    return traceparent_of(trace.get_current_span())


@contextmanager
def continued(
    traceparent: str, name: str, attributes: Mapping[str, Any] | None = None
) -> Iterator[trace.Span]:
    """A span whose parent is `traceparent` (a new trace when it is empty)."""
    context = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
    with tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
        yield span


def traceparent_in(metadata: str) -> str:
    """The `traceparent` an event's metadata JSON carries, or ""."""
    if not metadata or metadata == "{}":
        return ""
    try:
        value = json.loads(metadata).get("traceparent", "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
