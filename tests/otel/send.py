"""Send one of each OpenTelemetry signal to Sluice with the real OpenTelemetry Python SDK.

Used by the Rust end-to-end test `otel_sdk` (tests/e2e/otel_sdk.rs), which starts Sluice
and its stores, runs this script once per exporter, and reads every value back:

    python tests/otel/send.py --protocol grpc|http-protobuf|http-json \\
        --grpc 127.0.0.1:50051 --http http://127.0.0.1:8080 --service NAME

It prints one JSON object on stdout: the ids the SDK made up (trace, span ids in hex) and
the times it used, so the test can look for exactly those values. Any export that fails
makes the script exit non-zero (the SDK only logs failures, so each exporter is wrapped).
"""

from __future__ import annotations

import argparse
import json
import sys

from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

LINK_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
LINK_SPAN = 0x00F067AA0BA902B7
# 2026-12-01T10:00:00Z, and steps from it.
T0 = 1_796_119_200_000_000_000

failures: list[str] = []


def exporters(protocol: str, grpc: str, http: str):
    """The (span, log, metric) exporters of one protocol, as an application would set them up."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from grpc import Compression

        kw = dict(endpoint=grpc, insecure=True, compression=Compression.Gzip)
        return OTLPSpanExporter(**kw), OTLPLogExporter(**kw), OTLPMetricExporter(
            **kw, preferred_temporality=temporality())
    if protocol == "http-protobuf":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        kw = dict(compression=Compression.Gzip)
    elif protocol == "http-json":
        from opentelemetry.exporter.otlp.json.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter

        kw = {}
    else:
        raise SystemExit(f"unknown protocol {protocol}")
    return (
        OTLPSpanExporter(endpoint=f"{http}/v1/traces", **kw),
        OTLPLogExporter(endpoint=f"{http}/v1/logs", **kw),
        OTLPMetricExporter(endpoint=f"{http}/v1/metrics", preferred_temporality=temporality(),
                           **kw),
    )


def temporality():
    """Counters cumulative (the default), histograms delta: both temporalities are sent."""
    from opentelemetry.sdk.metrics import Counter, Histogram, UpDownCounter

    return {Counter: AggregationTemporality.CUMULATIVE,
            UpDownCounter: AggregationTemporality.CUMULATIVE,
            Histogram: AggregationTemporality.DELTA}


def checked(exporter, what):
    """Wrap `exporter.export` so that a failed export is remembered, not only logged."""
    inner = exporter.export

    def export(*args, **kwargs):
        result = inner(*args, **kwargs)
        if getattr(result, "name", result) != "SUCCESS":
            failures.append(f"{what} export failed: {result}")
        return result

    exporter.export = export
    return exporter


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--http", required=True)
    ap.add_argument("--service", required=True)
    args = ap.parse_args()

    span_exp, log_exp, metric_exp = exporters(args.protocol, args.grpc, args.http)
    for exporter, what in ((span_exp, "span"), (log_exp, "log"), (metric_exp, "metric")):
        checked(exporter, what)
    resource = Resource.create({"service.name": args.service, "host.name": "sdk-host",
                                "deployment.environment": "test"})

    # Metrics: every instrument kind, exported once at shutdown (set up first: the
    # histogram is recorded inside the server span, so its exemplars carry the trace).
    reader = PeriodicExportingMetricReader(metric_exp, export_interval_millis=3_600_000)
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[reader],
        views=[View(instrument_name="payload.size",
                    aggregation=ExponentialBucketHistogramAggregation(max_size=20))])
    meter = meter_provider.get_meter("sdk.meter", "3.0")
    histogram = meter.create_histogram("latency", unit="ms")

    # Traces: a server span with an event, a link and an error status; a client child.
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exp))
    tracer = tracer_provider.get_tracer("sdk.tracer", "1.0")
    link = Link(SpanContext(LINK_TRACE, LINK_SPAN, is_remote=True,
                            trace_flags=TraceFlags(TraceFlags.SAMPLED)),
                attributes={"link.reason": "retry"})

    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(log_exp))
    logger = logger_provider.get_logger("sdk.logger", "2.0")

    with tracer.start_as_current_span("GET /cart", kind=SpanKind.SERVER, links=[link],
                                      start_time=T0, end_on_exit=False,
                                      attributes={"http.route": "/cart", "retries": 2}) as parent:
        parent.add_event("cache.miss", {"key": "cart:42", "size": 3}, timestamp=T0 + 1_000_000)
        with tracer.start_as_current_span("SELECT carts", kind=SpanKind.CLIENT,
                                          start_time=T0 + 2_000_000,
                                          end_on_exit=False) as child:
            child.end(end_time=T0 + 5_000_000)
        # Logs inside the server span carry its trace context.
        logger.emit(timestamp=T0 + 3_000_000, severity_number=SeverityNumber.WARN,
                    severity_text="WARN", body={"msg": "slow cart", "ms": 1500},
                    attributes={"user": "u1", "attempt": 3, "ratio": 0.5, "ok": False})
        logger.emit(timestamp=T0 + 4_000_000, severity_number=SeverityNumber.ERROR,
                    body="card declined", attributes={"user": "u2"})
        for v in (3, 7, 7, 120):
            histogram.record(v, {"route": "/cart"})
        parent.set_status(Status(StatusCode.ERROR, "payment failed"))
        parent.end(end_time=T0 + 10_000_000)
        ids = {
            "trace_id": f"{parent.get_span_context().trace_id:032x}",
            "parent_span_id": f"{parent.get_span_context().span_id:016x}",
            "child_span_id": f"{child.get_span_context().span_id:016x}",
            "trace_flags": int(parent.get_span_context().trace_flags),
            "link_trace_id": f"{LINK_TRACE:032x}",
            "link_span_id": f"{LINK_SPAN:016x}",
        }
    tracer_provider.force_flush()
    logger_provider.force_flush()

    counter = meter.create_counter("orders", unit="{order}")
    counter.add(5, {"region": "eu"})
    counter.add(2, {"region": "eu"})
    counter.add(1, {"region": "us"})
    updown = meter.create_up_down_counter("queue.depth")
    updown.add(10)
    updown.add(-3)
    gauge = meter.create_gauge("temperature", unit="Cel")
    gauge.set(21.5, {"room": "a"})
    exp = meter.create_histogram("payload.size", unit="By")
    for v in (1, 2, 4, 1000):
        exp.record(v)
    meter_provider.shutdown()
    tracer_provider.shutdown()
    logger_provider.shutdown()

    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(json.dumps(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
