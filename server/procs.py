"""Stopping a child process group (the vLLM server frankly supervises, the servers the tests start)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session``), wait up to
    ``timeout`` seconds, then SIGKILL the group; returns the exit status. A process that has already
    exited is left alone."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode
