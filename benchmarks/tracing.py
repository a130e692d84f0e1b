"""OpenTelemetry as the benchmarks run it: the SDK's ``TracerProvider`` with a
``BatchSpanProcessor``, what a production user runs, on an exporter that only
counts the spans. A request pays for creating, filling and queueing its spans;
the export runs on the processor's own thread."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class CountingExporter(SpanExporter):
    """Exports nowhere: counts the spans, so a test can see they were made."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def counting_tracer_provider() -> tuple[TracerProvider, CountingExporter]:
    exporter = CountingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter
