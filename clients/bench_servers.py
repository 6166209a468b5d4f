"""Servers that ``clients/bench.py --serve`` starts, and what it samples of the machine while it
measures: the servers' resident memory and how busy the other processes were (needs psutil)."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import time

from server.testing import ServerProcess


class RssSampler:
    """Samples the resident set size of a process and its children in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil  # optional dependency; only needed when measuring memory

        self._proc = psutil.Process(pid)
        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except self._psutil.Error:
            return self.last
        for p in procs:
            with contextlib.suppress(self._psutil.Error):
                total += p.memory_info().rss
        self.last = total
        self.peak = max(self.peak, total)
        return total

    def reset(self) -> None:
        self.peak = self.sample()

    def start(self) -> RssSampler:
        self.reset()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)


class CpuNoise:
    """How busy the rest of the machine was during a run, so numbers from a shared machine can be read.

    ``other_cores``: CPU time used by processes other than ``pids`` (and their children) and this one,
    per second of wall time; ``steal_cores``: hypervisor steal time per second. Both 0 on a quiet machine.
    """

    def __init__(self, pids: list[int] | None = None):
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(p) for p in (pids or [])] + [psutil.Process()]

    def _ours(self) -> float:
        total = 0.0
        seen = set()
        for p in self._procs:
            try:
                for q in [p, *p.children(recursive=True)]:
                    if q.pid in seen:
                        continue
                    seen.add(q.pid)
                    t = q.cpu_times()
                    total += t.user + t.system
            except self._psutil.Error:
                pass
        # children that already exited and were waited for (e.g. a subprocess.run) are no longer listed
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ru.ru_utime + ru.ru_stime

    def _system(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        busy = (
            sum(t)
            - t.idle
            - getattr(t, "iowait", 0.0)
            - getattr(t, "steal", 0.0)
            - getattr(t, "guest", 0.0)
            - getattr(t, "guest_nice", 0.0)
        )
        return busy, getattr(t, "steal", 0.0)

    def start(self) -> CpuNoise:
        self._t0 = time.perf_counter()
        self._sys0, self._steal0 = self._system()
        self._ours0 = self._ours()
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        busy, steal = self._system()
        ours = self._ours() - self._ours0
        other = max(0.0, busy - self._sys0 - ours)
        return {
            "other_cores": round(other / wall, 2),
            "steal_cores": round((steal - self._steal0) / wall, 2),
            "ours_cores": round(ours / wall, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


class BenchServer(ServerProcess):
    """A server started for the benchmark (``cmd`` may contain ``{port}``), ready when ``/v1/models``
    answers 200 (any OpenAI-compatible server has it); samples its memory once ready."""

    def __init__(self, label: str, cmd: list[str] | str, **kw):
        kw.setdefault("ready_timeout", 900)
        kw.setdefault("cwd", None)
        super().__init__(cmd, label=label, ready_path="/v1/models", **kw)
        self.rss: RssSampler | None = None
        self.idle_rss: int | None = None

    def start(self) -> BenchServer:
        super().start()
        try:
            self.rss = RssSampler(self.proc.pid).start()
            self.idle_rss = self.rss.sample()
        except ImportError:  # psutil is optional
            self.rss = None
        return self

    def stop(self, *args, **kw):
        if self.rss:
            self.rss.stop()
        return super().stop(*args, **kw)


def cpu_noise(pids: list[int]) -> CpuNoise | None:
    """A started CpuNoise when psutil is installed, else None."""
    try:
        return CpuNoise(pids).start()
    except ImportError:
        return None
