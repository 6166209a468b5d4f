"""/metrics on a live server: real Prometheus text, parsed and checked after real traffic."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_real_traffic(demo_server):
    before = _samples(demo_server.url)
    body = {
        "model": demo_server.base_id,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "temperature": 0,
        "steering": {"refusal": 1.0},
    }
    r = httpx.post(demo_server.v1 + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    r = httpx.post(demo_server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=120)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    after = _samples(demo_server.url)

    assert (
        _get(after, "frankly_requests_total", endpoint="chat", outcome="ok")
        - _get(before, "frankly_requests_total", endpoint="chat", outcome="ok")
        == 2
    )
    assert (
        _get(after, "frankly_steering_requests_total", direction="refusal")
        - _get(before, "frankly_steering_requests_total", direction="refusal")
        == 2
    )
    gen = _get(after, "frankly_generation_tokens_total") - _get(before, "frankly_generation_tokens_total")
    assert 2 <= gen <= 6
    assert _get(after, "frankly_prompt_tokens_total") > _get(before, "frankly_prompt_tokens_total")
    assert (
        _get(after, "frankly_time_to_first_token_seconds_count")
        - _get(before, "frankly_time_to_first_token_seconds_count")
        == 2
    )
    assert (
        _get(after, "frankly_e2e_request_latency_seconds_count")
        - _get(before, "frankly_e2e_request_latency_seconds_count")
        == 2
    )
    assert _get(after, "frankly_inter_token_latency_seconds_count") > _get(
        before, "frankly_inter_token_latency_seconds_count"
    )
    assert (
        _get(after, "frankly_prefill_batch_size_count") - _get(before, "frankly_prefill_batch_size_count") == 2
    )  # two requests sent one after the other: two prefills
    assert ("frankly_queue_depth", ()) in after and ("frankly_running_batch_size", ()) in after
    assert _get(after, "frankly_running_batch_size") == 0
