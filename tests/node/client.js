// Exports one checkout trace with the official OpenTelemetry JavaScript SDK to the URL in argv[2].
// argv[3] is "json" (exporter-trace-otlp-http) or "proto" (exporter-trace-otlp-proto).
const { BasicTracerProvider, SimpleSpanProcessor } = require("@opentelemetry/sdk-trace-base");
const { resourceFromAttributes } = require("@opentelemetry/resources");
const { SpanKind, SpanStatusCode } = require("@opentelemetry/api");

const url = process.argv[2];
const flavour = process.argv[3] || "json";
const { OTLPTraceExporter } = require(
  flavour === "proto" ? "@opentelemetry/exporter-trace-otlp-proto" : "@opentelemetry/exporter-trace-otlp-http");

const exporter = new OTLPTraceExporter({ url });
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": "node-payments" }),
  spanProcessors: [new SimpleSpanProcessor(exporter)],
});
const tracer = provider.getTracer("payscope-test");

const server = tracer.startSpan("POST /pay/{order_id}", {
  kind: SpanKind.SERVER,
  attributes: { "http.request.method": "POST", "http.route": "/pay/{order_id}", "url.path": "/pay/77" },
});
const { trace, context } = require("@opentelemetry/api");
const ctx = trace.setSpan(context.active(), server);
const client = tracer.startSpan("POST", {
  kind: SpanKind.CLIENT,
  attributes: { "http.request.method": "POST", "server.address": "psp", "url.full": "http://psp/charges" },
}, ctx);
client.recordException({ name: "Error", message: "ETIMEDOUT" });
client.setStatus({ code: SpanStatusCode.ERROR, message: "ETIMEDOUT" });
client.end();
server.setStatus({ code: SpanStatusCode.ERROR });
server.end();
provider.forceFlush().then(() => provider.shutdown()).then(() => {
  process.stdout.write(server.spanContext().traceId + "\n");
}, (err) => { process.stderr.write(String(err) + "\n"); process.exit(1); });
