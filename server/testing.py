"""Starting servers for tests, benchmarks and soak runs: free ports, a process, readiness, a clean stop.

One harness for ``tests/live`` (``frankly serve`` on the demo model), ``clients/bench.py``
(any OpenAI-compatible server command) and ``scripts/soak.py``. It only uses the standard
library and httpx.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.procs import stop_group

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frankly_cmd(*args: str, model: str = "demo") -> list[str]:
    """``frankly serve --model MODEL --port {port} ARGS`` with this interpreter (``{port}`` is filled in)."""
    return [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", "{port}", *args]


class ServerProcess:
    """A server process on a free loopback port, ready once ``ready_path`` answers 200.

    ``cmd`` (a list or a shell-style string) may contain ``{port}``. The process runs in its own
    session, so :meth:`stop` signals its whole process group and nothing else. Its output goes to
    ``log_path``."""

    def __init__(
        self,
        cmd: list[str] | str,
        *,
        label: str = "server",
        ready_path: str = "/health",
        ready_timeout: float = 300,
        env: dict | None = None,
        log_dir: str | Path | None = None,
        cwd: str | Path | None = ROOT,
    ):
        self.label = label
        self.port = free_port()
        cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.log_path = Path(log_dir or ".") / f"server-{label}-{self.port}.log"
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None  # seconds from start to ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ServerProcess:
        """Start the process and wait until it is ready; RuntimeError (with the log's tail) if it exits or times out."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
            )
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label!r} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    self.load_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server {self.label!r} not ready after {self.ready_timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the process group, wait up to ``timeout`` (then kill it); the exit status."""
        if self.proc is None:
            return None
        return stop_group(self.proc, sig, timeout)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
