"""Clients that go away free their rows; SIGTERM drains in-flight requests and exits 0.

Disconnects run on the shared demo server; the shutdown test starts (and stops) its own.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

BASE = "qwen-demo"
LONG = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
# greedy counting never reaches EOS before max_tokens (a sampled chat answer may end early)
COUNTING = {"model": BASE, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "temperature": 0}
FREE_WITHIN_S = 5.0


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def running_metric(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(r"^frankly_running_batch_size (\S+)$", text, re.M)
    assert m, text[:2000]
    return float(m.group(1))


def wait_for(pred, timeout: float, every: float = 0.05) -> float:
    """Seconds until ``pred()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def idle(demo_server):
    wait_for(lambda: health(demo_server)["running"] == 0 and health(demo_server)["waiting"] == 0, 120, 0.2)
    return demo_server


def test_stream_disconnect_frees_the_row(idle):
    before = health(idle)["running"]
    log_at = len(idle.log())
    body = {**COUNTING, "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", idle.v1 + "/completions", json=body) as r:
        assert r.status_code == 200
        # keep the iterator referenced: a dropped line iterator closes the connection at once
        lines, n = r.iter_lines(), 0
        while n < 2:  # two tokens out: generation is under way
            n += next(lines).startswith("data: ")
        assert health(idle)["running"] == before + 1
    # leaving the block closes the connection mid-stream
    took = wait_for(lambda: health(idle)["running"] == before, FREE_WITHIN_S)
    assert running_metric(idle) == before
    assert took < FREE_WITHIN_S
    assert "Traceback" not in idle.log()[log_at:], idle.log()[log_at:][-3000:]


def test_non_stream_client_timeout_frees_the_row(idle):
    before = health(idle)["running"]
    log_at = len(idle.log())
    seen_running = threading.Event()

    def watch():
        try:
            wait_for(lambda: health(idle)["running"] > before, 60)
            seen_running.set()
        except AssertionError:
            pass

    w = threading.Thread(target=watch)
    w.start()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(idle.v1 + "/completions", json={**COUNTING, "max_tokens": 400}, timeout=httpx.Timeout(10, read=4))
    w.join()
    assert seen_running.is_set(), "the request never ran"
    wait_for(lambda: health(idle)["running"] == before, FREE_WITHIN_S)
    assert running_metric(idle) == before
    time.sleep(0.6)  # the disconnect is noticed within one 0.5 s poll
    assert "Traceback" not in idle.log()[log_at:], idle.log()[log_at:][-3000:]  # a hang-up is not a crash


def test_many_disconnects_leave_nothing_behind(idle):
    """Several streams dropped at different points (before and after their first token)."""
    log_at = len(idle.log())

    def drop(after_events: int, n: int = 1):
        body = {**COUNTING, "max_tokens": 300, "stream": True, "n": n}
        with httpx.Client(timeout=120) as c, c.stream("POST", idle.v1 + "/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= after_events:
                    break

    threads = [threading.Thread(target=drop, args=a) for a in ((0,), (1,), (5,), (3, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wait_for(lambda: health(idle)["running"] == 0 and health(idle)["waiting"] == 0, FREE_WITHIN_S + 5)
    r = httpx.post(idle.v1 + "/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in idle.log()[log_at:], idle.log()[log_at:][-3000:]


# ---- SIGTERM --------------------------------------------------------------------------------

GRACE = 6


def read_stream(server, path: str, body: dict, out: dict, started: threading.Event) -> None:
    events: list[str] = []
    try:
        with httpx.Client(timeout=120) as c, c.stream("POST", server.v1 + path, json=body) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    if len(events) >= 2:
                        started.set()
    except httpx.HTTPError as e:
        out["exc"] = repr(e)
    out["events"] = events
    started.set()


def test_sigterm_drains_streams_refuses_new_work_and_exits_0(server_factory):
    s = server_factory("--shutdown-grace", str(GRACE))
    short = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    long = {**COUNTING, "max_tokens": 2000, "stream": True, "stream_options": {"include_usage": True}}
    res_long, res_short = {}, {}
    started_long, started_short = threading.Event(), threading.Event()
    t_long = threading.Thread(target=read_stream, args=(s, "/completions", long, res_long, started_long))
    t_long.start()
    assert started_long.wait(120), "the long stream never started"
    # a keep-alive connection opened before the signal, to send a request during the drain
    keepalive = httpx.Client(base_url=s.url, timeout=30)
    assert keepalive.get("/health").status_code == 200
    t_short = threading.Thread(target=read_stream, args=(s, "/chat/completions", short, res_short, started_short))
    t_short.start()
    assert started_short.wait(120)

    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # new work during the drain: refused (503 on a kept-alive connection, or the connection refused)
    try:
        r = keepalive.post("/v1/chat/completions", json={"model": BASE, "messages": LONG, "max_tokens": 1})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable" and "retry-after" in r.headers
    except httpx.TransportError:
        pass
    with pytest.raises(httpx.TransportError):
        httpx.post(s.v1 + "/chat/completions", json={"model": BASE, "messages": LONG, "max_tokens": 1}, timeout=10)
    keepalive.close()

    rc = s.proc.wait(GRACE + 30)
    took = time.monotonic() - t0
    t_long.join(30)
    t_short.join(30)
    assert rc == 0, s.log()[-3000:]
    assert took < GRACE + 20, took

    # the short stream finished normally: finish chunk, then [DONE]
    assert "exc" not in res_short, res_short
    ev = res_short["events"]
    assert ev[-1] == "[DONE]", ev
    assert json.loads(ev[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    # the long one outlived the grace period: an error chunk, then usage, then [DONE]
    assert "exc" not in res_long, res_long
    ev = res_long["events"]
    assert ev[-1] == "[DONE]", ev[-3:]
    err = [json.loads(e)["error"] for e in ev[:-1] if '"error"' in e and e.startswith('{"error"')]
    assert len(err) == 1 and set(err[0]) == {"message", "type", "param", "code"}, ev[-3:]
    assert "shutting down" in err[0]["message"]
    assert "usage" in json.loads(ev[-2])
    assert "Traceback" not in s.log()
