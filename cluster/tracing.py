"""Configure OpenTelemetry for a v2gfleet process: traces and metrics, and where they go.

`configure("console" | "otlp" | "prometheus" | "memory" | "none")`. Each Ray actor
is its own process, so each calls this at start (the runtime passes the choice
on); with "none" the spans in `actors.tracing` cost nothing.

The instruments themselves live in `actors.tracing` (API only, so hosts and
dispatchers record without knowing where the numbers go).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

Exporter = Literal["console", "otlp", "prometheus", "memory", "none"]


@dataclass
class Telemetry:
    """What `configure` set up; tests read `spans` and `metric_reader`."""

    exporter: Exporter
    spans: InMemorySpanExporter | None = None
    metric_reader: MetricReader | None = None


def configure(
    exporter: Exporter = "none",
    service_name: str = "v2gfleet",
    otlp_endpoint: str | None = None,
    prometheus_port: int = 9464,
) -> Telemetry:
    """Install a tracer and a meter provider for this process.

    Args:
        exporter: where spans and metrics go. "otlp" sends both to an OpenTelemetry
            collector (`otlp_endpoint`, default http://localhost:4318); "prometheus"
            serves metrics on `prometheus_port` (spans go to the console);
            "memory" keeps both in memory for tests.
    """
    if exporter == "none":
        return Telemetry(exporter)
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource)
    telemetry = Telemetry(exporter)
    reader: MetricReader
    if exporter == "memory":
        telemetry.spans = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(telemetry.spans))
        reader = InMemoryMetricReader()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = (otlp_endpoint or "http://localhost:4318").rstrip("/")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(f"{base}/v1/metrics"))
    elif exporter == "prometheus":
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(prometheus_port)
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        reader = PrometheusMetricReader()
    else:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    telemetry.metric_reader = reader
    return telemetry
