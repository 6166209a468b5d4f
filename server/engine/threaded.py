"""The engine-neutral half of an engine that owns its model on one thread.

:class:`ThreadedEngine` is the protocol's thread-safe side (submit, cancel, shutdown, alive,
num_waiting) over a :class:`~server.engine.scheduler.Scheduler`, and the engine thread's
loop: apply commands, expire, admit waiting requests into prefill, run a decode step; a
crash ends every request with an error event instead of leaving them waiting. An engine
subclasses it and writes its prefill, its decode step and its batch (the torch engine;
a llama.cpp engine the same way).
"""

from __future__ import annotations

import logging
import threading

from server.engine.errors import GenerationFailed
from server.engine.protocol import AsyncBridge, Emit
from server.engine.rows import Row, RowOutput
from server.engine.scheduler import RunningRows, Scheduler
from server.engine.types import GenerationRequest

log = logging.getLogger("frankly.engine")


class ThreadedEngine(AsyncBridge):
    """Subclasses set ``scheduler`` and ``running`` (its batch) and implement the engine-thread hooks."""

    thread_name = "frankly-engine"
    scheduler: Scheduler
    running: RunningRows
    output: RowOutput

    def __init__(self, tokenizer, device):
        self.tok = tokenizer
        self.device = device
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run
        self.error: BaseException | None = None  # what crashed the engine thread, if it did

    # ---- the protocol, any thread ------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        """Queue a request; ``emit`` is called from the engine thread with each event."""
        self.scheduler.submit(Row(req, emit, self.tok, self.device))

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let running and waiting requests finish (up to ``timeout``), then cancel the rest."""
        self.scheduler.drain()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.scheduler.stop()
                self._thread.join(10)

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._close()

    def _serve(self) -> None:
        """The loop, until drained or stopped; a crash ends every request with an error."""
        sched = self.scheduler
        try:
            while sched.apply_commands(block=sched.idle):
                if sched.stopping and sched.idle:
                    break
                sched.expire()
                self._drop_finished()
                sched.admit(self._admit_group)
                if self.running.rows:
                    self._step()
                    self._restart()
        except BaseException as e:  # the engine must never die silently
            log.exception("engine thread crashed")
            self.error = e
            sched.end_all(GenerationFailed(f"engine failure: {type(e).__name__}"))

    def _admit_group(self, group: list[Row]) -> None:
        self._prefill_group(group)
        self._restart()

    def _restart(self) -> None:
        """Prefill again, edit on, the rows whose lookahead condition fired (right away: they
        leave the running batch and take their places back before anything else is admitted)."""
        while self.output.restarts:
            self._drop_finished()  # takes the restarting rows out of the running batch
            rows = self.output.take_restarts()
            if rows:
                self._prefill_group(rows)

    def _end_running(self, e: Exception) -> None:
        """A decode step failed: end the running rows with an error (one bad step must not take the engine down)."""
        log.exception("decode step failed; ending the %d running rows", len(self.running))
        for r in self.running.rows:
            self.output.finish(r, "error", error=GenerationFailed(f"generation failed: {type(e).__name__}"))

    def _prefill_group(self, group: list[Row]) -> None:
        """Prefill ``group`` (taken off the waiting queue) and add it to the running batch."""
        raise NotImplementedError

    def _step(self) -> None:
        """One decode step of the running rows (an error inside it ends only those rows)."""
        raise NotImplementedError

    def _drop_finished(self) -> None:
        """Remove done rows from the running batch (ending cancelled ones first)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the engine thread holds (hooks, a native context) when the loop ends."""
