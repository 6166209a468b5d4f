"""API keys, the admin key, open routes, CORS, and the exposure warning.

Policy under test: with keys configured, every /v1/* route needs ``Authorization: Bearer <key>``
(401 in the OpenAI envelope otherwise); /v1/bake needs the separate admin key (a user key gets
403) and is off (403 ``admin_disabled``) when no admin key is set; /health, /metrics and / stay
open for probes and scrapers. The live server takes its user keys from ``FRANKLY_API_KEYS`` plus
``--api-key-file``; the key sources and the exposure warning are checked in-process in
tests/server/test_serve_cmd.py.
"""

from __future__ import annotations

import httpx
import pytest

BASE = "qwen-demo"
ENV_KEYS = ("user-key-a", "user-key-b")
FILE_KEY = "file-key-c"
ADMIN = "admin-key-z"
ALLOWED = "http://allowed.example"
USER_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/directions"),
    ("GET", f"/v1/models/{BASE}"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
]
BODIES = {
    "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/v1/completions": {"model": BASE, "prompt": "Hi", "max_tokens": 1},
}


@pytest.fixture(scope="module")
def authed(server_factory, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text(f"# one key per line\n{FILE_KEY}\n\n")
    s = server_factory(
        "--api-key-file",
        str(keyfile),
        "--admin-key",
        ADMIN,
        "--cors-origin",
        ALLOWED,
        "--bake-dir",
        str(tmp_path_factory.mktemp("authbake")),
        env={"FRANKLY_API_KEYS": ",".join(ENV_KEYS)},
    )
    yield s
    s.stop()


def call(server, method: str, path: str, key: str | None = None, headers: dict | None = None) -> httpx.Response:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return httpx.request(method, server.url + path, json=BODIES.get(path), headers=h, timeout=120)


def assert_error(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    return err


@pytest.mark.parametrize(("method", "path"), USER_ROUTES)
def test_no_key_is_401(authed, method, path):
    r = call(authed, method, path)
    err = assert_error(r, 401, "authentication_error")
    assert err["code"] == "invalid_api_key" and "Bearer" in err["message"]
    assert r.headers.get("www-authenticate", "").startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), USER_ROUTES)
def test_wrong_key_is_401(authed, method, path):
    assert_error(call(authed, method, path, key="not-a-key"), 401, "authentication_error")


@pytest.mark.parametrize("header", ["Bearer", "Basic dXNlcjpwYXNz", f"Token {ENV_KEYS[0]}", f"Bearer {ENV_KEYS[0]}x"])
def test_malformed_authorization_is_401(authed, header):
    assert_error(call(authed, "GET", "/v1/models", headers={"Authorization": header}), 401, "authentication_error")


@pytest.mark.parametrize("key", [*ENV_KEYS, FILE_KEY, ADMIN])
def test_right_key_lists_models(authed, key):
    r = call(authed, "GET", "/v1/models", key=key)
    assert r.status_code == 200
    assert BASE in [m["id"] for m in r.json()["data"]]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_right_key_generates(authed, path):
    r = call(authed, "POST", path, key=ENV_KEYS[1])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_admin_route_with_user_key_is_403(authed):
    err = assert_error(call(authed, "GET", "/v1/bake", key=ENV_KEYS[0]), 403, "permission_error")
    assert "admin" in err["message"]
    r = httpx.post(
        authed.v1 + "/bake", json={"name": "x", "steering": {}}, headers={"Authorization": f"Bearer {FILE_KEY}"}
    )
    assert_error(r, 403, "permission_error")


def test_admin_route_without_or_with_wrong_key_is_401(authed):
    assert_error(call(authed, "GET", "/v1/bake"), 401, "authentication_error")
    assert_error(call(authed, "GET", "/v1/bake", key="guess"), 401, "authentication_error")


def test_admin_route_with_admin_key_lists_bakes(authed):
    r = call(authed, "GET", "/v1/bake", key=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "list" and isinstance(r.json()["data"], list)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/"])
def test_open_routes_need_no_key(authed, path):
    assert httpx.get(authed.url + path, timeout=10).status_code == 200


def test_default_bind_is_loopback_and_no_exposure_warning(authed):
    log = authed.log()
    assert "Uvicorn running on http://127.0.0.1:" in log
    assert "without an API key" not in log


# ---- CORS -------------------------------------------------------------------------


def preflight(server, origin: str) -> httpx.Response:
    return httpx.options(
        server.v1 + "/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )


def test_cors_preflight_allowed_origin(authed):
    r = preflight(authed, ALLOWED)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_cors_preflight_denied_origin(authed):
    r = preflight(authed, "http://evil.example")
    assert r.status_code >= 400
    assert "access-control-allow-origin" not in r.headers


def test_cors_actual_request_exposes_steering_header(authed):
    r = call(authed, "POST", "/v1/chat/completions", key=ENV_KEYS[0], headers={"Origin": ALLOWED})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "x-steering" in r.headers["access-control-expose-headers"].lower()
    r = call(authed, "GET", "/v1/models", key=ENV_KEYS[0], headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_closed_by_default(demo_server):
    r = preflight(demo_server, ALLOWED)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(demo_server.v1 + "/models", headers={"Origin": ALLOWED}, timeout=10)
    assert "access-control-allow-origin" not in r.headers
