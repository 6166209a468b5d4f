"""Prometheus metrics (one registry per app, no process globals).

:class:`Metrics` is the engine's observer (:class:`server.engine.protocol.EngineObserver`):
the engine thread calls it as requests progress, the HTTP layer counts outcomes, and the
queue and batch gauges read the engine's :meth:`~server.engine.protocol.Engine.stats`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.engine.protocol import Engine, EngineObserver

LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics(EngineObserver):
    """Counters and histograms fed by the engine thread and the HTTP layer."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "frankly_requests", "Finished requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.rejected = Counter(
            "frankly_requests_rejected", "Requests refused before running, by reason", ["reason"], registry=r
        )
        self.prompt_tokens = Counter("frankly_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("frankly_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "frankly_time_to_first_token_seconds", "Arrival to first token", buckets=LAT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "frankly_inter_token_latency_seconds", "Time between tokens of one request", buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "frankly_e2e_request_latency_seconds", "Arrival to last token", buckets=LAT_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "frankly_queue_time_seconds", "Arrival to start of prefill", buckets=LAT_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("frankly_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("frankly_running_batch_size", "Rows in the running batch", registry=r)
        self.batch_hist = Histogram(
            "frankly_decode_batch_size", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.prefill_hist = Histogram(
            "frankly_prefill_batch_size",
            "Requests prefilled together in one forward",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.steering = Counter(
            "frankly_steering_requests", "Requests that ran with a direction applied", ["direction"], registry=r
        )
        self.conditional = Counter(
            "frankly_conditional_decisions", "Conditional ablation decisions", ["direction", "fired"], registry=r
        )

    def bind_engine(self, engine: Engine) -> None:
        """Read the queue and batch gauges from ``engine`` at each scrape."""
        self.queue_depth.set_function(lambda: engine.stats().waiting)
        self.running.set_function(lambda: engine.stats().running)

    # engine callbacks (engine thread) -----------------------------------------
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def queue_time(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def decode_batch(self, rows: int) -> None:
        self.batch_hist.observe(rows)

    def prefill_batch(self, requests: int) -> None:
        self.prefill_hist.observe(requests)

    def steering_used(self, name: str) -> None:
        self.steering.labels(direction=name).inc()

    def condition(self, name: str, fired: bool) -> None:
        self.conditional.labels(direction=name, fired=str(bool(fired)).lower()).inc()

    def finished(self, prompt_tokens: int, completion_tokens: int, reason: str, seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.e2e.observe(seconds)

    # HTTP layer ----------------------------------------------------------------
    def request_done(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
