"""Fixtures for the HTTP layer's tests: the app around a :class:`tests.fake_engine.FakeEngine`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.settings import ModelSettings, ServerSettings
from tests.fake_engine import BASE, FakeEngine, direction


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from directions.models import locate

    return AutoTokenizer.from_pretrained(locate("demo")[0])


@pytest.fixture
def make_client(tokenizer, tmp_path):
    clients = []

    def make(
        engine: FakeEngine | None = None, max_model_len: int | None = None, **settings
    ) -> tuple[TestClient, FakeEngine]:
        engine = engine or FakeEngine()
        loaded = SimpleNamespace(
            model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096)),
            tokenizer=tokenizer,
            source="demo",
            path=str(tmp_path),
            gguf=None,
        )
        dirs = {"refusal": direction("refusal"), "slop": direction("slop"), "cond": direction("cond", conditional=True)}
        ss = ServerSettings(api_keys=[], admin_key=None, cors_origins=[], bake_dir=str(tmp_path / "baked"), **settings)
        app = build_app(loaded, dirs, ss, ModelSettings(max_model_len=max_model_len), BASE, engine=engine)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client, engine

    yield make
    for c in clients:
        c.__exit__(None, None, None)
