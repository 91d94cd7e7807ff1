"""Spans and log lines with card numbers in every place a span or a log record can carry one.

Run under `payscope run` (which sets up the SDK), or plainly with EMIT_COLLECTOR set (a plain
OpenTelemetry SDK exporting to that collector). argv[1]: the corpus, a JSON file.
"""

import json
import logging
import os
import sys

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

corpus = json.loads(open(sys.argv[1]).read())
plain_sdk = os.environ.get("EMIT_COLLECTOR")
if plain_sdk:
    from opentelemetry._logs import set_logger_provider
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(corpus["resource"])
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{plain_sdk}/v1/traces")))
    trace.set_tracer_provider(provider)
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{plain_sdk}/v1/logs")))
    set_logger_provider(logger_provider)
    logging.getLogger().addHandler(LoggingHandler(logger_provider=logger_provider))

log = logging.getLogger("cards")
log.setLevel(logging.INFO)
tracer = trace.get_tracer("cards")
for item in corpus["spans"]:
    with tracer.start_as_current_span(item["name"], kind=SpanKind.SERVER, attributes=item["attributes"]) as span:
        span.add_event(item["event"], item["event_attributes"])
        span.record_exception(ValueError(item["exception"]))
        span.set_status(Status(StatusCode.ERROR, item["status"]))
        log.error(item["log"], extra=item["log_attributes"])
if plain_sdk:
    provider.shutdown()
    logger_provider.shutdown()
print("emitted", len(corpus["spans"]))
