// A Node.js service in the middle of a payment chain, traced with the official OpenTelemetry JavaScript SDK.
// argv: port, downstream URL, collector traces URL. W3C traceparent in, W3C traceparent out.
const http = require("node:http");
const { BasicTracerProvider, SimpleSpanProcessor } = require("@opentelemetry/sdk-trace-base");
const { resourceFromAttributes } = require("@opentelemetry/resources");
const { OTLPTraceExporter } = require("@opentelemetry/exporter-trace-otlp-proto");
const { W3CTraceContextPropagator } = require("@opentelemetry/core");
const api = require("@opentelemetry/api");

const [port, downstream, collector] = process.argv.slice(2);
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": "node-orders" }),
  spanProcessors: [new SimpleSpanProcessor(new OTLPTraceExporter({ url: collector }))],
});
const tracer = provider.getTracer("payscope-test");
const propagator = new W3CTraceContextPropagator();
const getter = { keys: (c) => Object.keys(c), get: (c, k) => c[k] };
const setter = { set: (c, k, v) => { c[k] = v; } };

http.createServer((req, res) => {
  const parent = propagator.extract(api.ROOT_CONTEXT, req.headers, getter);
  const server = tracer.startSpan(`${req.method} /orders/{order_id}`, {
    kind: api.SpanKind.SERVER,
    attributes: { "http.request.method": req.method, "http.route": "/orders/{order_id}", "url.path": req.url },
  }, parent);
  const ctx = api.trace.setSpan(parent, server);
  const client = tracer.startSpan("POST", {
    kind: api.SpanKind.CLIENT,
    attributes: { "http.request.method": "POST", "url.full": `${downstream}/charge`, "server.address": "bank" },
  }, ctx);
  const headers = { "content-type": "application/json" };
  propagator.inject(api.trace.setSpan(ctx, client), headers, setter);
  const out = http.request(`${downstream}/charge`, { method: "POST", headers }, (down) => {
    down.resume();
    down.on("end", () => {
      client.setAttribute("http.response.status_code", down.statusCode);
      client.end();
      server.setAttribute("http.response.status_code", down.statusCode);
      server.end();
      res.writeHead(down.statusCode, { "content-type": "application/json" });
      res.end(JSON.stringify({ ok: down.statusCode === 200 }));
    });
  });
  out.end("{}");
}).listen(Number(port), "127.0.0.1", () => process.stdout.write("listening\n"));

process.on("SIGTERM", () => provider.shutdown().then(() => process.exit(0)));
