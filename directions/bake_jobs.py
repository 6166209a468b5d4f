"""Background bake jobs for the server: one at a time, with progress and a bounded history."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from directions.bake import (
    BakeBusyError,
    BakeError,
    BakeExistsError,
    _check_strengths,
    bake_to_dir,
    validate_name,
)
from directions.fileformat import DirectionSet
from directions.lora_export import export_lora

log = logging.getLogger("frankly.bake")


@dataclass
class BakeJob:
    """One bake request and where it stands (a snapshot when returned by :class:`BakeJobs`)."""

    id: str
    name: str
    strengths: dict[str, float]
    format: str = "weights"  # weights | lora (see BakeJobs.start)
    state: str = "queued"  # queued | running | done | failed
    progress: float = 0.0  # 0..1
    message: str = "queued"
    output: str | None = None  # final directory once done
    error: str | None = None
    error_code: str | None = None  # BakeError.code of the failure
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class BakeJobs:
    """Bakes for the server, run one at a time by a background thread.

    API (what ``POST /v1/bake`` and a status endpoint call)::

        jobs = BakeJobs(loaded_model, directions, bake_root)  # once, at startup
        job = jobs.start("qwen-norefusal", {"refusal": 1.0})   # validates now, returns at once
        jobs.get(job.id)  # -> BakeJob snapshot, or None for an unknown id
        jobs.list()       # -> snapshots, oldest first (the last ``keep`` jobs)

    ``start`` raises a :class:`BakeError` synchronously for a bad request:
    :class:`BakeNameError` (param ``name``: not matching :data:`NAME_RE` or
    escaping the root), :class:`BakeExistsError` (param ``name``: the target
    exists or a job of that name is pending; ``overwrite=True`` replaces a
    finished one), :class:`UnknownDirection` / :class:`BakeStrengthError`
    (param ``steering``), :class:`BakeBusyError` (``max_queued`` jobs
    waiting). Errors during the bake (disk full, permission, source gone) do
    not raise: the job ends ``failed`` with ``error`` and ``error_code``.
    Jobs go ``queued`` -> ``running`` -> ``done`` | ``failed``; ``progress``
    runs 0..1 with a human ``message``; ``output`` is the directory once
    done. The bake reloads the model from its directory on the CPU, so the
    served model is never edited, but it shares the CPU cores (and about one
    model's size of memory) with inference while it runs.
    """

    def __init__(
        self,
        source,
        directions: dict[str, DirectionSet],
        bake_root: str | Path,
        *,
        write_gguf: bool = True,
        gguf_dtype: str = "q8_0",
        max_queued: int = 4,
        keep: int = 50,
    ):
        self.source = source
        self.directions = directions
        self.bake_root = Path(bake_root)
        self.write_gguf, self.gguf_dtype = write_gguf, gguf_dtype
        self.max_queued, self.keep = max_queued, keep
        self._jobs: dict[str, BakeJob] = {}
        self._overwrite: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(
        self, name: str, strengths: dict[str, float], *, overwrite: bool = False, format: str = "weights"
    ) -> BakeJob:
        """Validate and queue a bake; returns the queued job's snapshot.

        ``format="lora"`` exports the named directions as LoRA adapters instead
        (:func:`directions.lora_export.export_lora`): one scalable adapter per
        direction, and one with its strength folded in (``<name>-<strength>``).
        """
        if format not in ("weights", "lora"):
            raise BakeError(f"format must be 'weights' or 'lora', not {format!r}", param="format")
        final = validate_name(name, self.bake_root)
        strengths = _check_strengths(self.directions, strengths)
        with self._lock:
            pending = [j for j in self._jobs.values() if j.state in ("queued", "running")]
            if any(j.name == name for j in pending):
                raise BakeExistsError(f"a bake named {name!r} is already queued or running")
            if final.exists() and not overwrite:
                raise BakeExistsError(f"a bake named {name!r} already exists (pass overwrite to replace it)")
            if sum(j.state == "queued" for j in pending) >= self.max_queued:
                raise BakeBusyError(f"{self.max_queued} bakes are already waiting; try again later")
            job = BakeJob(id=f"bake-{uuid.uuid4().hex[:12]}", name=name, strengths=strengths, format=format)
            self._jobs[job.id] = job
            self._overwrite[job.id] = overwrite
            self._prune()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="frankly-bake", daemon=True)
                self._thread.start()
            self._queue.put(job.id)
            return BakeJob(**job.to_dict())

    def get(self, job_id: str) -> BakeJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return BakeJob(**job.to_dict()) if job else None

    def list(self) -> list[BakeJob]:
        with self._lock:
            return [BakeJob(**j.to_dict()) for j in self._jobs.values()]

    def wait(self, job_id: str, timeout: float | None = None) -> BakeJob | None:
        """Block until the job is done or failed (tests, CLI); returns its snapshot."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job is None or job.state in ("done", "failed"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                return job
            time.sleep(0.05)

    def _prune(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state in ("done", "failed")]
        for jid in finished[: max(0, len(self._jobs) - self.keep)]:
            self._jobs.pop(jid, None)
            self._overwrite.pop(jid, None)

    def _update(self, job: BakeJob, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(job, k, v)

    def _worker(self) -> None:
        while True:
            job = self._jobs.get(self._queue.get())
            if job is not None:
                self._run(job)

    def _run(self, job: BakeJob) -> None:
        self._update(job, state="running", started=time.time(), message="starting")
        progress = lambda f, m: self._update(job, progress=round(min(max(f, 0.0), 1.0), 4), message=m)  # noqa: E731
        try:
            if job.format == "lora":
                out = export_lora(
                    self.source,
                    self.directions,
                    job.name,
                    names=list(job.strengths),
                    strengths={n: [s] for n, s in job.strengths.items()},
                    formats=("peft", "gguf") if (self.write_gguf and getattr(self.source, "gguf", None)) else ("peft",),
                    bake_root=self.bake_root,
                    overwrite=self._overwrite.get(job.id, False),
                    progress=progress,
                )
                self._update(job, state="done", progress=1.0, message="done", output=str(out), finished=time.time())
                return
            out = bake_to_dir(
                self.source,
                self.directions,
                job.strengths,
                job.name,
                bake_root=self.bake_root,
                overwrite=self._overwrite.get(job.id, False),
                write_gguf=self.write_gguf,
                gguf_dtype=self.gguf_dtype,
                progress=progress,
            )
            self._update(job, state="done", progress=1.0, message="done", output=str(out), finished=time.time())
        except BakeError as e:
            self._update(job, state="failed", message="failed", error=str(e), error_code=e.code, finished=time.time())
        except Exception as e:  # a bake must never take the worker thread down
            logging.getLogger("frankly.bake").exception("bake %s failed", job.id)
            self._update(
                job,
                state="failed",
                message="failed",
                error=f"internal error: {e}",
                error_code=BakeError.code,
                finished=time.time(),
            )
