"""Hostile and malformed requests against a live server, and the limits with their errors.

Every refusal must be a 4xx in the OpenAI envelope ``{"error": {message, type, param, code}}``
naming the offending parameter, with no traceback text; a few odd-but-valid requests must be
accepted. The limits (queue bound, request timeout) run on a second server started with tiny
bounds.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import make_direction
from tests.validation_cases import ACCEPTED as VALID_AS_OPENAI
from tests.validation_cases import REFUSED as REFUSED_AS_OPENAI

BASE = "qwen-demo"
MSGS = [{"role": "user", "content": "Hi"}]
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
# greedy counting never reaches EOS before max_tokens (a sampled chat answer may end early)
COUNTING = {"model": BASE, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "temperature": 0}


@pytest.fixture(scope="module")
def live(demo_server, server_factory, tmp_path_factory):
    """The session demo server when it has the 'refusal' direction; else one with a test direction."""
    if "refusal" in httpx.get(demo_server.url + "/health", timeout=10).json()["directions"]:
        yield demo_server
        return
    d = tmp_path_factory.mktemp("hostile")
    s = server_factory(
        "--no-default-directions", "--direction", f"refusal={make_direction(d / 'r.safetensors', 'refusal')}"
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def chat(**kw) -> dict:
    return {"model": BASE, "messages": MSGS, "max_tokens": 1, **kw}


def cmpl(**kw) -> dict:
    return {"model": BASE, "prompt": "Hi", "max_tokens": 1, **kw}


def raw_chat(fragment: str) -> bytes:
    """A chat body with a raw JSON fragment (for NaN/Infinity literals that json.dumps would refuse)."""
    return (
        '{"model": "qwen-demo", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}], ' + fragment + "}"
    ).encode()


# (id, method, path, body: dict | bytes | None, expected status, expected error.param)
HOSTILE = [
    ("malformed-json", "POST", CHAT, b'{"model": "qwen-demo", "messages": [', 400, None),
    ("json-array-body", "POST", CHAT, b"[1, 2, 3]", 400, None),
    ("json-string-body", "POST", CHAT, b'"hello"', 400, None),
    (
        "non-utf8-bytes",
        "POST",
        CHAT,
        b'{"model": "qwen-demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
    ),
    ("empty-body", "POST", CHAT, b"", 400, None),
    ("missing-model", "POST", CHAT, {"messages": MSGS}, 400, "model"),
    ("missing-messages", "POST", CHAT, {"model": BASE}, 400, "messages"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="x"), 400, "max_tokens"),
    ("messages-a-string", "POST", CHAT, chat(messages="Hi"), 400, "messages"),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("empty-messages", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("message-without-role", "POST", CHAT, chat(messages=[{"content": "Hi"}]), 400, "messages[0].role"),
    ("role-tool", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    ("role-wizard", "POST", CHAT, chat(messages=[*MSGS, {"role": "wizard", "content": "x"}]), 400, "messages[1].role"),
    ("role-oversized", "POST", CHAT, chat(messages=[{"role": "u" * 100, "content": "x"}]), 400, "messages[0].role"),
    (
        "content-image-url",
        "POST",
        CHAT,
        chat(
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}
            ]
        ),
        400,
        "messages[0].content[0]",
    ),
    ("content-a-number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("system-only", "POST", CHAT, chat(messages=[{"role": "system", "content": "x"}]), 400, "messages"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-4o"), 404, "model"),
    ("model-oversized", "POST", CHAT, chat(model="m" * 600), 400, "model"),
    ("unknown-direction-body", "POST", CHAT, chat(steering={"nope": 1}), 400, "steering.nope"),
    ("unknown-direction-suffix", "POST", CHAT, chat(model=f"{BASE}+nope"), 404, "model"),
    ("empty-suffix", "POST", CHAT, chat(model=f"{BASE}+"), 404, "model"),
    ("bad-suffix-strength", "POST", CHAT, chat(model=f"{BASE}+refusal:lots"), 400, "model"),
    ("suffix-strength-inf", "POST", CHAT, chat(model=f"{BASE}+refusal:1e999"), 400, "model"),
    ("suffix-strength-nan", "POST", CHAT, chat(model=f"{BASE}+refusal:nan"), 400, "model"),
    ("strength-NaN-literal", "POST", CHAT, raw_chat('"steering": {"refusal": NaN}'), 400, "steering.refusal"),
    ("strength-Infinity-literal", "POST", CHAT, raw_chat('"steering": {"refusal": Infinity}'), 400, "steering.refusal"),
    (
        "strength--Infinity-literal",
        "POST",
        CHAT,
        raw_chat('"steering": {"refusal": -Infinity}'),
        400,
        "steering.refusal",
    ),
    ("strength-1e9", "POST", CHAT, chat(steering={"refusal": 1e9}), 400, "steering.refusal"),
    ("strength-bool", "POST", CHAT, chat(steering={"refusal": True}), 400, "steering.refusal"),
    ("strength-string", "POST", CHAT, chat(steering={"refusal": "1"}), 400, "steering.refusal"),
    ("steering-non-json-string", "POST", CHAT, chat(steering="refusal=1"), 400, "steering"),
    ("steering-a-list", "POST", CHAT, chat(steering=["refusal"]), 400, "steering"),
    ("steering-json-string-list", "POST", CHAT, chat(steering="[1, 2]"), 400, "steering"),
    (
        "steering-nested-bad-when",
        "POST",
        CHAT,
        chat(steering={"refusal": {"strength": 1, "when": "sometimes"}}),
        400,
        "steering.refusal",
    ),
    (
        "steering-nested-unknown-key",
        "POST",
        CHAT,
        chat(steering={"refusal": {"strength": 1, "layer": 3}}),
        400,
        "steering.refusal",
    ),
    (
        "steering-nested-nan",
        "POST",
        CHAT,
        raw_chat('"steering": {"refusal": {"strength": NaN}}'),
        400,
        "steering.refusal",
    ),
    ("too-many-stop-sequences", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("oversized-stop", "POST", CHAT, chat(stop="x" * 65), 400, "stop"),
    ("stop-not-strings", "POST", CHAT, chat(stop=[1, 2]), 400, "stop"),
    ("temperature-5", "POST", CHAT, chat(temperature=5), 400, "temperature"),
    ("temperature-NaN-literal", "POST", CHAT, raw_chat('"temperature": NaN'), 400, "temperature"),
    ("top-p-0", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("negative-max-tokens", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-over-cap", "POST", CHAT, chat(max_tokens=10**9), 400, "max_tokens"),
    ("max-completion-tokens-over-cap", "POST", CHAT, chat(max_completion_tokens=10**9), 400, "max_completion_tokens"),
    ("n-too-big", "POST", CHAT, chat(n=64), 400, "n"),
    ("top-logprobs-too-big", "POST", CHAT, chat(logprobs=True, top_logprobs=1000), 400, "top_logprobs"),
    ("seed-out-of-range", "POST", CHAT, chat(seed=2**70), 400, "seed"),
    ("stream-options-string", "POST", CHAT, chat(stream_options="yes"), 400, "stream_options"),
    ("logit-bias-NaN", "POST", CHAT, raw_chat('"logit_bias": {"42": NaN}'), 400, "logit_bias[42]"),
    ("prompt-over-context", "POST", CMPL, cmpl(prompt=" hello" * 33000), 400, "prompt"),
    ("completion-empty-prompt", "POST", CMPL, cmpl(prompt=""), 400, "prompt"),
    ("completion-empty-list", "POST", CMPL, cmpl(prompt=[]), 400, "prompt"),
    ("completion-token-id-too-big", "POST", CMPL, cmpl(prompt=[1, 10**9]), 400, "prompt"),
    ("completion-token-id-negative", "POST", CMPL, cmpl(prompt=[-1]), 400, "prompt"),
    ("completion-several-prompts", "POST", CMPL, cmpl(prompt=["a", "b"]), 400, "prompt"),
    ("completion-nested-token-lists", "POST", CMPL, cmpl(prompt=[[1, 2], [3]]), 400, "prompt"),
    ("completion-suffix", "POST", CMPL, cmpl(suffix="end"), 400, "suffix"),
    ("completion-logprobs-too-big", "POST", CMPL, cmpl(logprobs=1000), 400, "logprobs"),
    (
        "oversized-body",
        "POST",
        CHAT,
        b'{"model": "qwen-demo", "messages": [{"role": "user", "content": "' + b"x" * 2_100_000 + b'"}]}',
        413,
        None,
    ),
    ("get-on-post-route", "GET", CHAT, None, 405, None),
    ("post-on-get-route", "POST", "/v1/models", {}, 405, None),
    ("unknown-route", "GET", "/v1/engines", None, 404, None),
    ("unknown-model-card", "GET", "/v1/models/gpt-4o", None, 404, "model"),
    # strict types and the OpenAI reference's cross-field rules (a 400 naming the parameter)
    *[(case, "POST", path, body, 400, param) for case, path, body, param in REFUSED_AS_OPENAI],
]


def send(client: httpx.Client, method: str, path: str, body) -> httpx.Response:
    if body is None:
        return client.request(method, path)
    if isinstance(body, bytes):
        return client.request(method, path, content=body, headers={"content-type": "application/json"})
    return client.request(method, path, json=body)


def assert_envelope(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    for leak in ("Traceback", 'File "', "site-packages", "pydantic_core"):
        assert leak not in r.text, r.text
    return err


@pytest.mark.parametrize(("case", "method", "path", "body", "status", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_refused_cleanly(client, case, method, path, body, status, param):
    r = send(client, method, path, body)
    assert r.status_code == status, (case, r.status_code, r.text[:500])
    err = assert_envelope(r)
    assert err["param"] == param, (case, err)
    if case == "prompt-over-context":
        assert err["code"] == "context_length_exceeded"
    if status == 413:
        assert err["code"] == "payload_too_large"


def test_oversized_chunked_body_is_413(client):
    body = b'{"model": "qwen-demo", "messages": [{"role": "user", "content": "' + b"x" * 2_100_000 + b'"}]}'

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    r = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert assert_envelope(r)["code"] == "payload_too_large"


ACCEPTED = [
    (
        "unknown-extra-fields",
        CHAT,
        chat(tools=[], response_format={"type": "text"}, parallel_tool_calls=False, foo={"bar": 1}),
        "none",
    ),
    ("steering-as-json-string", CHAT, chat(steering='{"refusal": 0.5}'), "refusal=0.5"),
    ("developer-role", CHAT, chat(messages=[{"role": "developer", "content": "Be brief."}, *MSGS]), "none"),
    (
        "text-content-parts",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
        "none",
    ),
    ("suffix-and-body", CHAT, chat(model=f"{BASE}+refusal:0.25", steering={"refusal": -1}), "refusal=-1"),
    ("tiny-temperature-and-top-p", CHAT, chat(temperature=5e-324, top_p=5e-324), "none"),
    ("completion-one-prompt-in-a-list", CMPL, cmpl(prompt=["Hi"], logprobs=2), "none"),
    ("completion-token-ids", CMPL, cmpl(prompt=[9707, 11]), "none"),
    *[(case, path, body, "none") for case, path, body in VALID_AS_OPENAI],
]


@pytest.mark.parametrize(("case", "path", "body", "header"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_odd_but_valid_request_is_accepted(client, case, path, body, header):
    r = client.post(path, json=body)
    assert r.status_code == 200, (case, r.text[:500])
    assert r.headers["x-steering"] == header
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_server_survived_the_table(live):
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
    assert "Traceback" not in live.log()


# ---- queue bound and request timeout, on a server with tiny bounds ------------------------


@pytest.fixture(scope="module")
def tight(server_factory):
    s = server_factory("--max-batch-size", "1", "--max-queue", "1", "--request-timeout", "3")
    yield s
    s.stop()


def test_queue_bound_answers_429_with_retry_after(tight):
    long = {**COUNTING, "max_tokens": 200}
    results: list[httpx.Response | Exception] = []
    lock = threading.Lock()

    def fire():
        try:
            r = httpx.post(tight.v1 + "/completions", json=long, timeout=60)
        except Exception as e:
            r = e
        with lock:
            results.append(r)

    threads = [threading.Thread(target=fire) for _ in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(90)
    assert all(isinstance(r, httpx.Response) for r in results), results
    statuses = sorted(r.status_code for r in results)
    # one running + one waiting fit; the rest are refused at once; the admitted ones end by the 3 s timeout
    assert statuses.count(429) >= 3, statuses
    assert set(statuses) <= {200, 408, 429}, statuses
    for r in results:
        if r.status_code == 429:
            err = assert_envelope(r)
            assert err["type"] == "rate_limit_error" and err["code"] == "server_overloaded"
            assert int(r.headers["retry-after"]) >= 1


def test_request_timeout_non_stream_is_408(tight):
    t0 = time.time()
    r = httpx.post(tight.v1 + "/completions", json={**COUNTING, "max_tokens": 2000}, timeout=60)
    assert r.status_code == 408, r.text
    err = assert_envelope(r)
    assert err["code"] == "timeout" and err["type"] == "timeout_error"
    assert time.time() - t0 < 30


def test_request_timeout_stream_ends_with_error_chunk_and_done(tight):
    body = {**COUNTING, "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", tight.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "timeout" and set(err) == {"message", "type", "param", "code"}
    assert httpx.get(tight.url + "/health", timeout=10).json()["running"] == 0
