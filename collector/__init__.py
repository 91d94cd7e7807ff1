"""Receiving and storing telemetry: OTLP receivers, file importers, redaction and the store."""
