"""Shared fixtures: live frankly server processes on the real demo model.

``frankly_server(*args)`` starts ``frankly serve --model demo`` on a free
loopback port with extra flags and waits for /health; the session-wide
``demo_server`` is started once with an admin key and a bake directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_direction(path, name: str) -> str:
    """A random unit direction for the demo model (24 layers x 896), saved as a direction file."""
    from transformers import AutoConfig

    from directions.fileformat import DirectionSet, save_direction
    from directions.models import locate

    g = torch.Generator().manual_seed(0)
    ds = DirectionSet(name, torch.nn.functional.normalize(torch.randn(24, 896, generator=g), dim=-1), torch.ones(24))
    save_direction(ds, path, config=AutoConfig.from_pretrained(locate("demo")[0]))
    return str(path)


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log_path: Path
    base_id: str = "qwen-demo"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(tmp_dir: Path, *args: str, wait: float = 300, env: dict | None = None) -> LiveServer:
    port = free_port()
    log_path = Path(tmp_dir) / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", "demo", "--port", str(port), *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as f:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + wait
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return LiveServer(url, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become healthy:\n{log_path.read_text(errors='replace')[-4000:]}")


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


@pytest.fixture(scope="session")
def demo_server(server_factory, tmp_path_factory) -> LiveServer:
    """One shared server on the demo model with the shipped directions, an admin key and a bake dir."""
    bake = tmp_path_factory.mktemp("baked")
    return server_factory("--admin-key", ADMIN_KEY, "--bake-dir", str(bake))


@pytest.fixture(scope="session")
def demo_model():
    """The real demo model loaded in-process (fp32 CPU)."""
    from directions.models import load_model

    return load_model("demo")
