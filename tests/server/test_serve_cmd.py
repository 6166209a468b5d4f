"""``frankly serve`` in-process: where API keys come from, admin routes off without an admin key,
and the warning when it would listen beyond loopback without a key (nothing is bound)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from server.engine.protocol import EngineCapabilities, EngineStats

BASE = "qwen-demo"
ALLOWED = "http://allowed.example"


def test_api_key_sources(monkeypatch, tmp_path):
    from server.cli import build_parser
    from server.serve_cmd import settings_from_args
    from server.settings import ServerSettings

    monkeypatch.setenv("FRANKLY_API_KEYS", "a, b,,c")
    assert ServerSettings().all_api_keys() == ["a", "b", "c"]
    f = tmp_path / "k"
    f.write_text("k1\n# comment\n\n k2 \n")
    assert ServerSettings(api_key_file=str(f)).all_api_keys() == ["a", "b", "c", "k1", "k2"]
    args = build_parser().parse_args(["serve", "--api-key", "x", "--api-key", "y", "--cors-origin", ALLOWED])
    _, ss = settings_from_args(args)
    assert ss.all_api_keys() == ["x", "y"]  # flags win over the environment
    assert ss.cors_origins == [ALLOWED]
    monkeypatch.delenv("FRANKLY_API_KEYS")
    assert ServerSettings().all_api_keys() == [] and ServerSettings().host == "127.0.0.1"
    assert ServerSettings().cors_origins == []


class _IdleEngine:
    capabilities = EngineCapabilities(name="idle")
    num_running = num_waiting = 0
    alive = True

    def stats(self):
        return EngineStats(running=0, waiting=0)

    def start(self): ...
    def shutdown(self, timeout: float = 0): ...
    def cancel(self, request_id: str): ...


def test_admin_routes_off_without_admin_key(tmp_path):
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import ModelSettings, ServerSettings

    loaded = SimpleNamespace(
        model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64)),
        tokenizer=None,
        source="demo",
        path=str(tmp_path),
        gguf=None,
    )
    for keys in ([], ["user"]):
        ss = ServerSettings(api_keys=keys, admin_key=None, bake_dir=str(tmp_path / "b"))
        with TestClient(build_app(loaded, {}, ss, ModelSettings(), BASE, engine=_IdleEngine())) as c:
            for key in (None, "user", "anything"):
                h = {"Authorization": f"Bearer {key}"} if key else {}
                for r in (
                    c.get("/v1/bake", headers=h),
                    c.post("/v1/bake", json={"name": "x", "steering": {"a": 1}}, headers=h),
                ):
                    assert r.status_code == 403, r.text
                    assert r.json()["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", [], True),
        ("::", [], True),
        ("192.0.2.10", [], True),
        ("0.0.0.0", ["k"], False),
        ("127.0.0.1", [], False),
        ("localhost", [], False),
        ("::1", [], False),
    ],
)
def test_exposure_warning(monkeypatch, caplog, host, keys, warned):
    """``serve`` warns when it listens beyond loopback without a key (run without binding anything)."""
    import server.app
    import server.serve_cmd as sc
    import server.startup
    from server.cli import build_parser

    ran = []
    loaded = SimpleNamespace(model=SimpleNamespace(config=None))
    monkeypatch.setattr(server.startup, "load_served", lambda *a, **k: (loaded, {}))
    monkeypatch.setattr(
        server.app,
        "build_app",
        lambda *a, **k: SimpleNamespace(state=SimpleNamespace(frankly=SimpleNamespace(engine=None))),
    )
    monkeypatch.setattr(sc, "_draining_server", lambda *a, **k: SimpleNamespace(run=lambda: ran.append(1)))
    monkeypatch.delenv("FRANKLY_API_KEYS", raising=False)
    argv = ["serve", "--host", host, "--no-default-directions"] + [x for k in keys for x in ("--api-key", k)]
    with caplog.at_level(logging.WARNING, logger="frankly.serve"):
        assert sc.run(build_parser().parse_args(argv)) == 0
    assert ran == [1]
    assert any("without an API key" in r.getMessage() for r in caplog.records) is warned


def test_flag_help_comes_from_the_settings_descriptions():
    """One help text per setting: the serve flags show the settings' descriptions (and defaults)."""
    import argparse

    from server.serve_cmd import MODEL_FLAGS, SERVER_FLAGS, add_arguments
    from server.settings import ModelSettings, ServerSettings

    p = argparse.ArgumentParser()
    add_arguments(p)
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings}
    for cls, flags in ((ModelSettings, MODEL_FLAGS), (ServerSettings, SERVER_FLAGS)):
        for flag, field, _ in flags:
            desc = cls.model_fields[field].description
            assert desc and actions[flag].help.replace("%%", "%").startswith(desc), flag
    assert actions["--max-n"].type is int and actions["--max-abs-strength"].type is float
    assert actions["--direction"].__class__.__name__ == "_AppendAction"
    assert actions["--packed-weights"].nargs == 0  # store_true


def test_the_readme_flag_table_uses_the_settings_descriptions():
    import re

    from server.serve_cmd import MODEL_FLAGS, SERVER_FLAGS
    from server.settings import ModelSettings, ServerSettings
    from tests.conftest import ROOT

    rows = dict(
        re.findall(
            r"^\| `(--[a-z0-9-]+)` \| `FRANKLY_\w+` \| [^|]* \| (.+) \|$", (ROOT / "README.md").read_text(), re.M
        )
    )
    for cls, flags in ((ModelSettings, MODEL_FLAGS), (ServerSettings, SERVER_FLAGS)):
        for flag, field, _ in flags:
            desc = cls.model_fields[field].description.replace("|", "\\|")
            assert flag in rows, f"README's flag table (## `frankly serve` flags) has no row for {flag}"
            assert rows[flag].startswith(desc), (flag, rows[flag], desc)


def test_a_literal_setting_becomes_a_choice_flag():
    from typing import Literal

    from pydantic import Field
    from pydantic_settings import BaseSettings

    from server.serve_cmd import flag_kwargs

    class S(BaseSettings):
        mode: Literal["a", "b"] = Field("a", description="which mode")

    kw = flag_kwargs(S, "mode", "--mode", {})
    assert kw["choices"] == ["a", "b"] and kw["help"] == "which mode (default: a)"
