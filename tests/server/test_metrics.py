"""Prometheus metrics: the engine observer's callbacks, the HTTP outcomes, gauges read from stats()."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server.engine.protocol import EngineObserver, EngineStats
from server.metrics import Metrics


def _samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class _Engine:
    def stats(self) -> EngineStats:
        return EngineStats(running=3, waiting=5)


def test_observer_callbacks_and_gauges():
    m = Metrics()
    assert isinstance(m, EngineObserver)
    m.bind_engine(_Engine())
    m.finished(prompt_tokens=7, completion_tokens=4, reason="stop", seconds=0.5)
    m.steering_used("refusal")
    m.condition("refusal", True)
    m.decode_batch(2)
    m.prefill_batch(3)
    m.request_done("chat", "ok")
    s = _samples(m)
    assert s[("frankly_prompt_tokens_total", ())] == 7
    assert s[("frankly_generation_tokens_total", ())] == 4
    assert s[("frankly_steering_requests_total", (("direction", "refusal"),))] == 1
    assert s[("frankly_conditional_decisions_total", (("direction", "refusal"), ("fired", "true")))] == 1
    assert s[("frankly_requests_total", (("endpoint", "chat"), ("outcome", "ok")))] == 1
    assert s[("frankly_running_batch_size", ())] == 3 and s[("frankly_queue_depth", ())] == 5
    assert s[("frankly_decode_batch_size_count", ())] == 1 and s[("frankly_prefill_batch_size_sum", ())] == 3


def test_registries_are_per_app():
    a, b = Metrics(), Metrics()
    a.request_done("chat", "ok")
    assert ("frankly_requests_total", (("endpoint", "chat"), ("outcome", "ok"))) not in _samples(b)
