"""The server harness (tests, bench, soak): a free port, readiness, a clear failure, a clean stop."""

from __future__ import annotations

import socket
import sys

import pytest

from server.testing import ServerProcess, frankly_cmd, free_port


def test_free_port_is_bindable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_a_server_becomes_ready_and_stops(tmp_path):
    srv = ServerProcess(
        [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], ready_path="/", log_dir=tmp_path
    )
    with srv:
        assert srv.proc.poll() is None and srv.url.endswith(str(srv.port)) and srv.load_s > 0
    assert srv.proc.poll() is not None


def test_a_server_that_exits_fails_with_its_log(tmp_path):
    srv = ServerProcess(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log_dir=tmp_path, ready_timeout=30
    )
    with pytest.raises(RuntimeError, match="exited with 3") as e:
        srv.start()
    assert "boom" in str(e.value)


def test_frankly_cmd():
    cmd = frankly_cmd("--max-n", "2")
    assert cmd[1:4] == ["-m", "server.cli", "serve"] and "{port}" in cmd and cmd[-2:] == ["--max-n", "2"]
