"""Configure OpenTelemetry for a v2gfleet process: traces and metrics, and where they go.

`configure("console" | "otlp" | "prometheus" | "file" | "memory" | "none")` sets
up the process it runs in. Each Ray actor is its own process, so the runtime
hands a `TelemetrySettings` to every actor process of its job:
`TelemetrySettings.runtime_env()` is the `runtime_env` for `ray.init` (the
settings in an environment variable and `configure_worker` as Ray's
`worker_process_setup_hook`), so the log actor, the hosts, the gateways, the
relay and the dispatchers add their spans to the same trace. With "none" the
spans in `actors.tracing` cost nothing.

"file" writes one JSON-lines file of finished spans per process
(`spans-<host>-<pid>.jsonl`, each line `ReadableSpan.to_json`) into a folder;
`load_spans` reads them back. It is how the tests follow one trace across
processes (the SDK's in-memory exporter keeps spans inside its own process), and
an operator can ship the files with any log collector.

The instruments themselves live in `actors.tracing` (API only, so hosts and
dispatchers record without knowing where the numbers go).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

LOGGER = logging.getLogger(__name__)

Exporter = Literal["console", "otlp", "prometheus", "file", "memory", "none"]

#: The environment variable that carries `TelemetrySettings` (JSON) into actor processes.
ENV_VAR = "V2G_TELEMETRY"


@dataclass
class Telemetry:
    """What `configure` set up; tests read `spans` and `metric_reader`."""

    exporter: Exporter
    spans: InMemorySpanExporter | None = None
    metric_reader: MetricReader | None = None
    files: list[IO[str]] = field(default_factory=list)


@dataclass(frozen=True)
class TelemetrySettings:
    """Where every process of a running system sends its spans and metrics.

    Args:
        exporter: see `configure`.
        otlp_endpoint: the collector for "otlp" (default http://localhost:4318).
        prometheus_port: where the starting process serves metrics for "prometheus".
        file_dir: the folder for "file" (made absolute when handed to the actors).
    """

    exporter: Exporter = "none"
    otlp_endpoint: str | None = None
    prometheus_port: int = 9464
    file_dir: str | None = None

    def __post_init__(self) -> None:
        if self.exporter == "file" and not self.file_dir:
            raise ValueError("telemetry exporter 'file' needs file_dir")

    def runtime_env(self) -> dict[str, Any]:
        """Ray's `runtime_env` that configures these settings in every worker process.

        Empty for "none". Refuses "memory": spans kept in memory stay in each
        actor's process, where no one reads them (use "file" across processes).
        """
        if self.exporter == "none":
            return {}
        if self.exporter == "memory":
            raise ValueError("'memory' telemetry cannot leave an actor's process; use 'file'")
        settings = asdict(self)
        if self.file_dir:
            settings["file_dir"] = os.path.abspath(self.file_dir)  # workers have their own cwd
        return {
            "env_vars": {ENV_VAR: json.dumps(settings)},
            "worker_process_setup_hook": "cluster.tracing.configure_worker",
        }

    def configure(self, serve_metrics: bool = True) -> Telemetry:
        """`configure` this process with these settings."""
        return configure(
            self.exporter,
            otlp_endpoint=self.otlp_endpoint,
            prometheus_port=self.prometheus_port,
            file_dir=self.file_dir,
            serve_metrics=serve_metrics,
        )


def configure_worker() -> None:
    """Ray's `worker_process_setup_hook`: configure this actor process from `V2G_TELEMETRY`.

    A worker does not serve Prometheus metrics: every actor on a node would ask
    for the same port. Its spans still go where the settings say.
    """
    text = os.environ.get(ENV_VAR)
    if not text:
        return
    TelemetrySettings(**json.loads(text)).configure(serve_metrics=False)


def configure(
    exporter: Exporter = "none",
    service_name: str = "v2gfleet",
    otlp_endpoint: str | None = None,
    prometheus_port: int = 9464,
    file_dir: str | None = None,
    serve_metrics: bool = True,
) -> Telemetry:
    """Install a tracer and a meter provider for this process.

    Args:
        exporter: where spans and metrics go. "otlp" sends both to an OpenTelemetry
            collector (`otlp_endpoint`, default http://localhost:4318); "prometheus"
            serves metrics on `prometheus_port` (spans go to the console);
            "file" appends spans (as each ends) and metrics as JSON lines to files
            of this process in `file_dir`; "memory" keeps both in memory for tests.
        serve_metrics: False: "prometheus" starts no HTTP server here (actor processes).

    Raises:
        ValueError: "file" without `file_dir`.
    """
    if exporter == "none":
        return Telemetry(exporter)
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
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

    resource = Resource.create({"service.name": service_name, "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource)
    telemetry = Telemetry(exporter)
    reader: MetricReader | None
    if exporter == "memory":
        telemetry.spans = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(telemetry.spans))
        reader = InMemoryMetricReader()
    elif exporter == "file":
        if not file_dir:
            raise ValueError("telemetry exporter 'file' needs file_dir")
        spans_out, metrics_out = _process_files(file_dir)
        telemetry.files += [spans_out, metrics_out]
        # one line per span as it ends: a trace is readable while the system runs
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=spans_out, formatter=_span_line))
        )
        reader = PeriodicExportingMetricReader(
            ConsoleMetricExporter(out=metrics_out, formatter=_metrics_line)
        )
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = (otlp_endpoint or "http://localhost:4318").rstrip("/")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(f"{base}/v1/metrics"))
    elif exporter == "prometheus":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        reader = None
        if serve_metrics:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            start_http_server(prometheus_port)
            reader = PrometheusMetricReader()
    else:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
    trace.set_tracer_provider(provider)
    if reader is not None:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    telemetry.metric_reader = reader
    return telemetry


def _process_files(file_dir: str) -> tuple[IO[str], IO[str]]:
    os.makedirs(file_dir, exist_ok=True)
    name = f"{socket.gethostname()}-{os.getpid()}.jsonl"
    # line-buffered appends: each record reaches the file whole, at once
    spans = open(os.path.join(file_dir, f"spans-{name}"), "a", buffering=1)  # noqa: SIM115
    metrics = open(os.path.join(file_dir, f"metrics-{name}"), "a", buffering=1)  # noqa: SIM115
    return spans, metrics


def _span_line(span: Any) -> str:
    return str(span.to_json(indent=None)) + "\n"


def _metrics_line(data: Any) -> str:
    return str(data.to_json(indent=None)) + "\n"


def load_spans(file_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every span the "file" exporter wrote into `file_dir`, from all processes.

    Each is `ReadableSpan.to_json` as a dict (`name`, `context.trace_id`,
    `context.span_id`, `parent_id`, `links`, `attributes`, `resource`), ids as
    "0x..." hex. A line still being written is skipped.
    """
    spans = []
    for path in sorted(Path(file_dir).glob("spans-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                spans.append(json.loads(line))
            except ValueError:
                continue
    return spans
