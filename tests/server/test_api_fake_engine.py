"""The HTTP layer against a scripted FakeEngine: exact SSE framing, errors, steering resolution.

No model runs here: ``build_app(..., engine=FakeEngine())`` with a tiny fake ``loaded``
(the real demo tokenizer, which loads in well under a second), so these run in milliseconds.
The fixtures are in tests/server/conftest.py, the engine in tests/fake_engine.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from server.engine.errors import EngineOverloaded, EngineStopped
from server.engine.types import StepOutput, TokenLogprob
from tests.fake_engine import BASE, ERRORS, MSGS, FakeEngine, hello_script


def sse_events(raw: str) -> list[str]:
    """Split an SSE body into its data payloads, checking the framing on the way."""
    assert raw.endswith("\n\n"), repr(raw[-40:])
    frames = raw[:-2].split("\n\n")
    out = []
    for f in frames:
        assert f.startswith("data: "), repr(f)
        assert "\n" not in f, repr(f)  # one data line per event
        out.append(f[len("data: ") :])
    return out


def stream(client: TestClient, path: str, body: dict):
    with client.stream("POST", path, json=body) as r:
        raw = "".join(r.iter_text())
        return r, raw


# ---- SSE framing ----------------------------------------------------------------


def test_chat_stream_exact_framing(make_client):
    client, engine = make_client()
    r, raw = stream(
        client,
        "/v1/chat/completions",
        {
            "model": f"{BASE}+refusal",
            "messages": MSGS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-steering"] == "refusal=1"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    role, c1, c2, fin, usage = chunks
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == f"{BASE}+refusal"
        assert c["id"] == chunks[0]["id"] == r.headers["x-request-id"]
        assert c["created"] == chunks[0]["created"]
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert c1["choices"] == [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}]
    assert c2["choices"][0]["delta"] == {"content": " world"}
    assert fin["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert fin["steering"] == {"refusal": {"strength": 1.0, "applied": 1.0}}
    n_prompt = len(engine.requests[0].prompt_ids)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2, "total_tokens": n_prompt + 2}
    assert usage["steering"] == {"refusal": {"strength": 1.0, "applied": 1.0}}


def test_completion_stream_framing_without_usage(make_client):
    client, _ = make_client()
    r, raw = stream(client, "/v1/completions", {"model": BASE, "prompt": "Say hi", "stream": True})
    assert r.status_code == 200
    assert r.headers["x-steering"] == "none"
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 3  # no role chunk, no usage chunk
    assert [c["choices"][0]["text"] for c in chunks] == ["Hello", " world", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert all("usage" not in c for c in chunks)


def test_stream_text_on_the_finish_event_is_not_lost(make_client):
    def script(req):
        n = len(req.prompt_ids)
        return [
            StepOutput(req.request_id, text="Hi", prompt_tokens=n, completion_tokens=1, steering={}),
            StepOutput(req.request_id, text=" there", finish_reason="length", prompt_tokens=n, completion_tokens=2),
        ]

    client, _ = make_client(FakeEngine(script))
    _, raw = stream(client, "/v1/chat/completions", {"model": BASE, "messages": MSGS, "stream": True})
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {"content": " there"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hi there"


@pytest.mark.parametrize(
    ("error", "code"), [("generation failed: boom", "engine_error"), ("request timed out", "timeout")]
)
def test_stream_error_chunk_framing(make_client, error, code):
    def script(req):
        n = len(req.prompt_ids)
        return [
            StepOutput(req.request_id, text="Par", prompt_tokens=n, completion_tokens=1, steering={}),
            StepOutput(
                req.request_id,
                text="tial",
                finish_reason="error",
                error=ERRORS[code](error),
                prompt_tokens=n,
                completion_tokens=2,
            ),
        ]

    client, _ = make_client(FakeEngine(script))
    r, raw = stream(
        client,
        "/v1/chat/completions",
        {
            "model": BASE,
            "messages": MSGS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200  # headers were sent before the failure
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    # role, "Par", the text that came with the failing event, then the error chunk, then usage
    assert [b["choices"][0]["delta"].get("content") for b in bodies[1:3]] == ["Par", "tial"]
    assert bodies[3] == {"error": {"message": error, "type": "server_error", "param": None, "code": code}}
    assert bodies[4]["choices"] == [] and bodies[4]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("reason", "error", "status", "code"),
    [
        ("error", "generation failed: boom", 500, "engine_error"),
        ("error", "request timed out", 408, "timeout"),
        ("cancelled", "server shutting down", 503, "unavailable"),
    ],
)
def test_non_stream_engine_failures_map_to_the_envelope(make_client, reason, error, status, code):
    def script(req):
        ecode = {"engine_error": "engine_error", "timeout": "timeout", "unavailable": "shutdown"}[code]
        return [
            StepOutput(
                req.request_id,
                finish_reason=reason,
                error=ERRORS[ecode](error),
                prompt_tokens=len(req.prompt_ids),
                steering={},
            )
        ]

    client, _ = make_client(FakeEngine(script))
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": MSGS})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"] == error


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (EngineOverloaded(retry_after=3.0), 429, "3"),
        (EngineStopped("the server is shutting down"), 503, "5"),
    ],
)
def test_engine_refusal_is_an_http_error_with_retry_after(make_client, exc, status, retry_after):
    client, engine = make_client()
    engine.raise_on_submit = exc
    for s in (False, True):
        r = client.post("/v1/chat/completions", json={"model": BASE, "messages": MSGS, "stream": s})
        assert r.status_code == status
        assert r.headers["retry-after"] == retry_after
        assert r.json()["error"]["type"] in ("rate_limit_error", "server_error")


# ---- non-streaming shapes ---------------------------------------------------------


def test_chat_non_stream_shape_and_usage(make_client):
    client, engine = make_client()
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": MSGS, "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    n_prompt = len(engine.requests[0].prompt_ids)
    assert body["object"] == "chat.completion" and body["id"] == r.headers["x-request-id"]
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2, "total_tokens": n_prompt + 2}
    assert body["steering"] == {}
    assert engine.requests[0].sampling.max_tokens == 5


def test_n2_gives_two_choices_with_consecutive_seeds(make_client):
    client, engine = make_client()
    r = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": MSGS, "n": 2, "seed": 7, "temperature": 0.5}
    )
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert all(c["message"]["content"] == "Hello world" for c in r.json()["choices"])
    assert r.json()["usage"]["completion_tokens"] == 4
    assert sorted(q.sampling.seed for q in engine.requests) == [7, 8]
    assert {q.sampling.temperature for q in engine.requests} == {0.5}
    assert len({q.request_id for q in engine.requests}) == 2


def test_n2_stream_has_both_indexes_and_two_finish_chunks(make_client):
    client, _ = make_client()
    _, raw = stream(client, "/v1/chat/completions", {"model": BASE, "messages": MSGS, "n": 2, "stream": True})
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert [c["index"] for c in chunks[0]["choices"]] == [0, 1]  # one role chunk for all choices
    finishes = [c["choices"][0]["index"] for c in chunks[1:] if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    for i in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:] if c["choices"][0]["index"] == i)
        assert text == "Hello world"


def test_chat_logprobs_shape(make_client):
    def script(req):
        lp = TokenLogprob(token="Hi", token_id=1, logprob=-0.5, top=[("Hi", 1, -0.5), ("Yo", 2, -1.5)])
        return [
            StepOutput(req.request_id, text="Hi", logprobs=[lp], finish_reason="stop", completion_tokens=1, steering={})
        ]

    client, engine = make_client(FakeEngine(script))
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": MSGS, "logprobs": True, "top_logprobs": 2})
    assert engine.requests[0].sampling.logprobs and engine.requests[0].sampling.top_logprobs == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content == [
        {
            "token": "Hi",
            "logprob": -0.5,
            "bytes": [72, 105],
            "top_logprobs": [
                {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]},
            ],
        }
    ]


# ---- steering resolution ------------------------------------------------------------


def _steer(engine: FakeEngine) -> dict[str, tuple[float, str]]:
    return {n: (d.strength, d.when) for n, d in engine.requests[-1].steering.items()}


@pytest.mark.parametrize(
    ("model", "body", "expected", "header"),
    [
        (BASE, None, {}, "none"),
        (f"{BASE}+refusal", None, {"refusal": (1.0, "always")}, "refusal=1"),
        (f"{BASE}+refusal:0.5+slop", None, {"refusal": (0.5, "always"), "slop": (1.0, "always")}, "refusal=0.5,slop=1"),
        (BASE, {"slop": 0.25}, {"slop": (0.25, "always")}, "slop=0.25"),
        # the body wins per direction; suffix directions the body does not name stay
        (
            f"{BASE}+refusal:0.5+slop",
            {"refusal": 2},
            {"refusal": (2.0, "always"), "slop": (1.0, "always")},
            "refusal=2,slop=1",
        ),
        (f"{BASE}+refusal", {"refusal": 0}, {"refusal": (0.0, "always")}, "none"),
        (f"{BASE}+refusal", '{"refusal": -1.5}', {"refusal": (-1.5, "always")}, "refusal=-1.5"),  # JSON-string form
        (BASE, {"cond": {"strength": 0.8, "when": "auto"}}, {"cond": (0.8, "auto")}, "cond=0.8@auto"),
        (f"{BASE}+cond@auto", None, {"cond": (1.0, "auto")}, "cond=1@auto"),
        (BASE, "", {}, "none"),
    ],
)
def test_steering_resolution_and_header(make_client, model, body, expected, header):
    client, engine = make_client()
    payload = {"model": model, "messages": MSGS}
    if body is not None:
        payload["steering"] = body
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    assert _steer(engine) == expected
    assert r.headers["x-steering"] == header
    assert r.json()["model"] == model
    assert r.json()["steering"] == {
        n: (
            {"strength": s, "applied": s}
            if w == "always"
            else {"strength": s, "applied": s, "when": w, "fired": None, "score": None}
        )
        for n, (s, w) in expected.items()
    }


def test_steering_limits_name_the_parameter(make_client):
    client, _ = make_client(max_directions_per_request=1, max_abs_strength=2.0)
    cases = [
        ({"model": f"{BASE}+refusal+slop"}, "steering"),
        ({"model": BASE, "steering": {"refusal": 1, "slop": 1}}, "steering"),
        ({"model": BASE, "steering": {"refusal": 2.5}}, "steering.refusal"),
        ({"model": f"{BASE}+refusal:-3"}, "model"),
        ({"model": BASE, "steering": {"refusal": {"strength": 1, "when": "auto"}}}, "steering.refusal"),
        ({"model": BASE, "steering": {"refusal": {"strength": 1, "bogus": 1}}}, "steering.refusal"),
    ]
    for extra, param in cases:
        r = client.post("/v1/chat/completions", json={"messages": MSGS, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())


# ---- sampling pass-through and limits ---------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (None, []),
        ("###", ["###"]),
        (["###", "END"], ["###", "END"]),
        (["", "x"], ["x"]),
    ],
)
def test_stop_is_passed_to_the_engine(make_client, stop, expected):
    client, engine = make_client()
    body = {"model": BASE, "prompt": "x", "max_tokens": 3}
    if stop is not None:
        body["stop"] = stop
    assert client.post("/v1/completions", json=body).status_code == 200
    assert engine.requests[0].sampling.stop == expected


def test_sampling_fields_and_defaults_reach_the_engine(make_client):
    client, engine = make_client(default_max_tokens=7, request_timeout_s=12.0)
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": BASE,
            "messages": MSGS,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "some_unknown_field": {"x": 1},
        },
    )
    assert r.status_code == 200
    sp = engine.requests[0].sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.seed) == (7, 0.0, 0.5, 3)
    assert engine.requests[0].timeout_s == 12.0


def test_max_tokens_is_clamped_to_the_context_room_and_prompt_checked(make_client):
    client, engine = make_client(max_model_len=64)
    r = client.post("/v1/completions", json={"model": BASE, "prompt": [1] * 60, "max_tokens": 100})
    assert r.status_code == 200
    assert engine.requests[0].sampling.max_tokens == 4
    r = client.post("/v1/completions", json={"model": BASE, "prompt": [1] * 64, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 9}, "max_tokens"),
        ({"max_completion_tokens": 9}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ({"stop": ["a", "b", "c"]}, "stop"),
        ({"stop": "x" * 9}, "stop"),
    ],
)
def test_configured_caps_name_the_parameter(make_client, body, param):
    client, engine = make_client(max_tokens_cap=8, max_n=2, max_logprobs=2, max_stop=2, max_stop_len=8)
    r = client.post("/v1/chat/completions", json={"model": BASE, "messages": MSGS, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not engine.requests


def test_completion_logprobs_cap_names_logprobs(make_client):
    client, _ = make_client(max_logprobs=2)
    r = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "logprobs": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_body_limit_applies_to_chunked_bodies_too(make_client):
    client, _ = make_client(max_body_bytes=4096)
    body = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x" * 8000}]}).encode()

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    for content in (body, chunks()):
        r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "payload_too_large"


def test_missing_body_message_is_clear(make_client):
    client, _ = make_client()
    r = client.post("/v1/chat/completions")
    assert r.status_code == 400
    assert "None" not in r.json()["error"]["message"]


def test_405_keeps_allow_header(make_client):
    client, _ = make_client()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "")
    assert r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("temperature", "top_p", "expected"),
    [
        (5e-324, 5e-324, (0.0, 1e-6)),  # both would make fp32 sampling divide by zero
        (1e-6, 1.0, (0.0, 1.0)),
        (0.7, 0.9, (0.7, 0.9)),
    ],
)
def test_degenerate_sampling_values_are_made_safe(make_client, temperature, top_p, expected):
    client, engine = make_client()
    r = client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": MSGS, "temperature": temperature, "top_p": top_p}
    )
    assert r.status_code == 200
    sp = engine.requests[0].sampling
    assert (sp.temperature, sp.top_p) == expected


def test_openapi_documents_what_the_server_answers(make_client):
    client, _ = make_client()
    doc = client.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat  # validation errors are 400s in the OpenAI envelope
    for status in ("400", "401", "404", "413", "429", "503"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert doc["components"]["schemas"]["ErrorResponse"]["properties"]["error"]["required"] == [
        "message",
        "type",
        "param",
        "code",
    ]
    # and a real 400 matches the documented envelope
    err = client.post("/v1/chat/completions", json={"model": BASE, "messages": "x"}).json()
    assert set(err["error"]) == {"message", "type", "param", "code"}


class _GoneClient:
    """Stands in for the Starlette request of a client that has hung up."""

    async def is_disconnected(self) -> bool:
        return True


@pytest.mark.parametrize("n", [1, 2])
async def test_gone_client_is_cancelled_while_its_request_waits(make_client, n):
    """A queued request whose client left is cancelled in the queue, not prefilled for nobody."""
    from server.errors import ClientDisconnected
    from server.protocol import ChatCompletionRequest

    def slow_start(req):
        return hello_script(req)

    engine = FakeEngine(slow_start, delay=30.0)  # the first event would come only after 30 s
    client, _ = make_client(engine)
    serving = client.app.state.frankly.chat
    for stream in (False, True):
        prepared = serving.prepare(ChatCompletionRequest(model=BASE, messages=MSGS, n=n, stream=stream))
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ClientDisconnected):
            await serving.respond(prepared, _GoneClient())
        assert asyncio.get_running_loop().time() - t0 < 5
        ids = {f"{prepared.request_id}-{i}" for i in range(n)}
        assert ids <= set(engine.cancelled), (ids, engine.cancelled)
    assert engine.num_running == 0


def test_models_and_directions_lists(make_client):
    client, _ = make_client()
    st = client.app.state.frankly
    st.directions["refusal"].metadata = {"name": "refusal", "method": "mean-diff single", "eval": '{"refusal": 0.1}'}
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [BASE, f"{BASE}+refusal", f"{BASE}+slop", f"{BASE}+cond", f"{BASE}+cond@auto"]
    assert client.get(f"/v1/models/{BASE}+slop:0.5").json() == {
        "id": f"{BASE}+slop:0.5",
        "object": "model",
        "created": int(st.started),
        "owned_by": "frankly",
    }
    data = {d["name"]: d for d in client.get("/v1/directions").json()["data"]}
    assert set(data) == {"refusal", "slop", "cond"}
    assert data["refusal"]["object"] == "direction" and data["refusal"]["eval"] == {"refusal": 0.1}
    assert data["cond"]["conditional"] is True and data["cond"]["detect_layer"] == 1
