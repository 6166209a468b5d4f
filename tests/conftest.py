"""Shared fixtures: live frankly server processes on the real demo model, and the model in-process.

``server_factory(*args)`` starts ``frankly serve --model demo`` on a free loopback port with
extra flags and waits for /health (:mod:`server.testing`, the harness the benchmark and the
soak test use too); the session-wide ``demo_server`` is started once with an admin key and a
bake directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from server.testing import ServerProcess, frankly_cmd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key"


def make_direction(path, name: str) -> str:
    """A random unit direction for the demo model (24 layers x 896), saved as a direction file."""
    from transformers import AutoConfig

    from directions.fileformat import DirectionSet, save_direction
    from directions.models import locate

    g = torch.Generator().manual_seed(0)
    ds = DirectionSet(name, torch.nn.functional.normalize(torch.randn(24, 896, generator=g), dim=-1), torch.ones(24))
    save_direction(ds, path, config=AutoConfig.from_pretrained(locate("demo")[0]))
    return str(path)


class LiveServer(ServerProcess):
    """A ``frankly serve --model demo`` process (its model id is the demo's)."""

    base_id = "qwen-demo"


def start_server(tmp_dir: Path, *args: str, wait: float = 300, env: dict | None = None) -> LiveServer:
    """A live server; ``--weights float`` unless ``args`` name the weights. Most live tests check what the
    fp32 model computes (against a bake, PEFT, transformers); ``--weights auto`` would pick int8 on the CI
    machine's CPU, which ``tests/live/test_int8_live.py`` starts on purpose."""
    if "--weights" not in args:
        args = ("--weights", "float", *args)
    return LiveServer(frankly_cmd(*args), label="frankly", ready_timeout=wait, env=env, log_dir=tmp_dir).start()


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory):
    started: list[LiveServer] = []
    base = tmp_path_factory.mktemp("servers")

    def factory(*args: str, **kw) -> LiveServer:
        s = start_server(base, *args, **kw)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


ENGINES = ["torch", "llamacpp"]


@pytest.fixture(scope="session")
def demo_servers(server_factory, tmp_path_factory):
    """engine -> its shared demo server, started on first use (one per engine for the session)."""
    started: dict[str, LiveServer] = {}

    def get(engine: str) -> LiveServer:
        if engine not in started:
            bake = tmp_path_factory.mktemp("baked")
            s = server_factory("--engine", engine, "--admin-key", ADMIN_KEY, "--bake-dir", str(bake))
            s.engine = engine
            started[engine] = s
        return started[engine]

    return get


@pytest.fixture(scope="session", params=ENGINES)
def demo_server(request, demo_servers) -> LiveServer:
    """One shared server per engine on the demo model with the shipped directions, an admin key and a
    bake dir: every test that uses it runs against the torch engine and against the llama.cpp engine."""
    return demo_servers(request.param)


@pytest.fixture(scope="session")
def torch_demo_server(demo_servers) -> LiveServer:
    """The torch engine's shared demo server (for tests of what only that engine does)."""
    return demo_servers("torch")


def torch_engine_only(server, why: str) -> None:
    """Skip the llama.cpp run of a test of something only the torch engine does (``why`` says what)."""
    if getattr(server, "engine", "torch") != "torch":
        pytest.skip(f"{server.engine} engine: {why}")


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model loaded in-process (fp32 CPU)."""
    from directions.models import load_model

    return load_model("demo")
