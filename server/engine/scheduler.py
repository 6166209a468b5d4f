"""The engine's inbox and waiting queue: commands from any thread, admission on the engine thread.

``submit``/``cancel``/``drain``/``stop`` may be called from any thread: they only put a
command in the inbox (and check the queue bound). The engine thread applies the commands,
expires requests past their deadline, and picks the groups to prefill next.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from server.engine.errors import EngineOverloaded, EngineStopped, RequestTimedOut
from server.engine.protocol import EngineObserver
from server.engine.rows import Row, RowOutput


class RunningRows(Protocol):
    """What the scheduler needs of an engine's running batch (the torch engine's :class:`Batch`)."""

    rows: list[Row]

    def __len__(self) -> int: ...

    def clear(self) -> None: ...


class Scheduler:
    """Inbox, waiting queue and admission of one engine; ``batch`` is its running rows."""

    def __init__(
        self,
        batch: RunningRows,
        output: RowOutput,
        observer: EngineObserver,
        max_batch_size: int,
        max_queue: int,
        prefill_token_budget: int,
        prefill_batch: int,
    ):
        self.batch, self.output, self.observer = batch, output, observer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_token_budget, self.prefill_batch = prefill_token_budget, prefill_batch
        self._inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Row] = deque()
        self._n_waiting = 0  # submitted, not yet prefilled (counted at submit, so the bound is exact)
        self._lock = threading.Lock()
        self.accepting = True
        self.stopping = False  # draining: finish what is there, then stop

    # ---- any thread -----------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    def submit(self, row: Row) -> None:
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        with self._lock:
            if self._n_waiting >= self.max_queue:
                raise EngineOverloaded(retry_after=1.0)
            self._n_waiting += 1
        self._inbox.put(("add", row))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def drain(self) -> None:
        self.accepting = False
        self._inbox.put(("drain", None))

    def stop(self) -> None:
        self._inbox.put(("stop", None))

    # ---- engine thread ----------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.batch.rows and not self.waiting

    def apply_commands(self, block: bool) -> bool:
        """Apply pending commands (waiting for one if ``block``). False when the engine must stop now."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                self.waiting.append(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "drain":
                self.stopping = True
            elif kind == "stop":
                self.end_all(EngineStopped("server shutting down"), reason="cancelled")
                return False

    def _cancel(self, request_id: str) -> None:
        for s in self.batch.rows:
            if s.request_id == request_id:
                s.cancelled = True
        for s in list(self.waiting):
            if s.request_id == request_id:
                self._leave_queue(s)
                self.output.finish(s, "cancelled")

    def end_all(self, error, reason: str = "error") -> None:
        """End every waiting and running request with ``error`` (shutdown, or the engine failing)."""
        for s in list(self.waiting):
            self._leave_queue(s)
            self.output.finish(s, reason, error=error)
        for s in self.batch.rows:
            self.output.finish(s, reason, error=error)
        self.batch.clear()

    def _leave_queue(self, row: Row) -> None:
        self.waiting.remove(row)
        with self._lock:
            self._n_waiting -= 1

    def expire(self) -> None:
        now = time.monotonic()
        for s in list(self.waiting):
            if s.deadline and now > s.deadline:
                self._leave_queue(s)
                self.output.finish(s, "error", error=RequestTimedOut("request timed out while waiting"))
        for s in self.batch.rows:
            if s.deadline and now > s.deadline and not s.done:
                self.output.finish(s, "error", error=RequestTimedOut("request timed out"))

    def admit(self, prefill: Callable[[list[Row]], None]) -> None:
        """Hand groups of waiting requests to ``prefill`` while the batch has room.

        While rows are decoding, at most ``prefill_token_budget`` prompt tokens are prefilled per
        step, so a burst of arrivals does not stall the running streams for many prefills."""
        budget = self.prefill_token_budget if self.batch.rows else None
        spent = 0
        group: list[Row] = []
        while self.waiting and len(self.batch) + len(group) < self.max_batch_size:
            if budget is not None and spent and spent + self.waiting[0].prompt_len > budget:
                break
            row = self.waiting.popleft()
            spent += row.prompt_len
            with self._lock:
                self._n_waiting -= 1
            self.observer.queue_time(time.monotonic() - row.t_arrival)
            group.append(row)
            if len(group) >= max(1, self.prefill_batch):
                prefill(group)
                group = []
        if group:
            prefill(group)
