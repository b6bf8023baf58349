"""Prometheus metrics of the server (`GET /metrics`, text exposition format), through prometheus_client.

    distrinews_requests_total{route, status}      requests answered, by route and HTTP status
    distrinews_request_seconds{route}            latency histogram, seconds, from the first byte in to the response
    distrinews_queue_texts                       texts waiting for a forward pass now
    distrinews_queue_seconds                     time a request waited in the batching queue
    distrinews_batch_texts                       texts per forward pass
    distrinews_batch_tokens                      padded tokens per forward pass (texts x longest text)
    distrinews_inference_seconds                 seconds per forward pass (tokens to probabilities)

Each app has its own registry, so several apps (the tests make many) never share counters.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = {"/", "/docs", "/openapi.json", "/health", "/ready", "/info", "/metrics", "/predict", "/predict/batch"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's counters and histograms, and an ASGI middleware that counts every request."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("distrinews_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "distrinews_request_seconds", "request latency, seconds", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Gauge("distrinews_queue_texts", "texts waiting for a forward pass", registry=r)
        self.queue_seconds = Histogram(
            "distrinews_queue_seconds", "seconds a request waited to be batched", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_texts = Histogram(
            "distrinews_batch_texts", "texts per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_tokens = Histogram(
            "distrinews_batch_tokens",
            "padded tokens per forward pass",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768),
            registry=r,
        )
        self.inference = Histogram(
            "distrinews_inference_seconds", "seconds per forward pass", buckets=LATENCY_BUCKETS, registry=r
        )

    # the batcher's interface (batcher.py)
    def observe_batch(self, texts: int, tokens: int, seconds: float) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.inference.observe(seconds)

    def set_queue(self, texts: int) -> None:
        self.queue.set(texts)

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware(self, app):
        """Wrap the ASGI `app`: count every HTTP request by route (unknown paths: "other") and status."""

        async def wrapped(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            route = scope["path"] if scope["path"] in ROUTES or scope["path"].startswith("/docs/") else "other"
            route = "/docs/static" if route.startswith("/docs/") else route
            start, status = time.perf_counter(), [500]

            async def counting_send(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, counting_send)
            finally:
                self.requests.labels(route, str(status[0])).inc()
                self.latency.labels(route).observe(time.perf_counter() - start)

        return wrapped
