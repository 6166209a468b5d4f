"""The llama.cpp engine: frankly's scheduler on llama.cpp, steering through the exported LoRA adapters.

llama.cpp (in-process, through ``llama-cpp-python``'s low-level bindings) runs the
unchanged base GGUF, quantized; each loaded direction is a rank-1 LoRA adapter whose
scale is the strength (:mod:`directions.lora`), exported on first start and cached.

Scheduling. llama.cpp's adapter scales belong to the context, not to a row, so each
decode step runs one ``llama_decode`` per *strength group*: the running rows with the
same strengths decode together (several sequences in one batch), and a step with k
different strength settings costs k passes. Prompts are prefilled one request at a time
(chunks of ``n_batch`` tokens) with that request's scales. The waiting queue, admission,
cancellation, deadlines, detokenisation, stop strings and the events are the torch
engine's own (:mod:`server.engine.scheduler`, :mod:`server.engine.rows`).

What it cannot do (its :data:`CAPABILITIES`): conditional mode (``when: auto``) needs
the detector's layer output, which this engine does not read, so the serving layer
answers 400; strength 0 runs the base graph (no adapter), but the figures are llama.cpp's
quantized arithmetic, not fp32 transformers'.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from directions.fileformat import DirectionSet
from directions.files import file_key
from directions.llamacpp import LlamaCpp
from server.engine.errors import GenerationFailed
from server.engine.protocol import EngineCapabilities, EngineObserver, EngineStats, NullObserver
from server.engine.rows import Row, RowOutput
from server.engine.sampling import sample_rows
from server.engine.scheduler import Scheduler
from server.engine.threaded import ThreadedEngine
from server.engine.types import SteeringReport

log = logging.getLogger("frankly.engine.llamacpp")

CAPABILITIES = EngineCapabilities(
    name="llama.cpp",
    supports_conditional=False,
    per_row_strengths=True,  # rows with different strengths decode in the same step, one pass per group
    logprobs=True,
    bit_identical_at_zero=True,  # strength 0 runs llama.cpp's base graph, no adapter
    quantized_weights=True,
)


@dataclass
class LlamaCppConfig:
    max_batch_size: int = 8
    max_queue: int = 64
    max_model_len: int = 4096  # per sequence; the context holds max_batch_size of them
    num_threads: int | None = None
    n_batch: int = 512  # tokens per llama_decode (prompt chunks)
    prefill_token_budget: int = 256  # prompt tokens admitted per step while other rows decode
    n_gpu_layers: int = 0


def steering_key(strengths: dict[str, float]) -> tuple:
    """Rows with equal keys run with the same adapter scales."""
    return tuple(sorted((n, float(s)) for n, s in strengths.items() if s != 0.0))


class _Slots:
    """The running rows of the llama.cpp context: each holds one KV sequence id (engine thread only)."""

    def __init__(self, n: int):
        self.rows: list[Row] = []
        self.free = list(range(n))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, row: Row) -> None:
        row.slot = self.free.pop(0)
        self.rows.append(row)

    def drop_finished(self, cancel: Callable[[Row], None], release: Callable[[int], None]) -> None:
        for r in self.rows:
            if r.cancelled and not r.done:
                cancel(r)
        for r in [r for r in self.rows if r.done]:
            release(r.slot)
            self.free.append(r.slot)
            self.rows.remove(r)

    def clear(self) -> None:
        self.free.extend(r.slot for r in self.rows)
        self.rows = []


class LlamaCppEngine(ThreadedEngine):
    """frankly's engine protocol (:class:`server.engine.protocol.Engine`) on llama.cpp."""

    capabilities = CAPABILITIES
    thread_name = "frankly-llamacpp"

    def __init__(
        self,
        gguf: str | Path,
        tokenizer,
        adapters: dict[str, Path],
        eos_ids: set[int],
        config: LlamaCppConfig,
        observer: EngineObserver | None = None,
    ):
        super().__init__(tokenizer, "cpu")
        self.gguf = str(gguf)
        self.adapters = dict(adapters)
        self.config = config
        self.observer = observer or NullObserver()
        self.running = _Slots(config.max_batch_size)
        self.output = RowOutput(tokenizer, eos_ids, config.max_model_len, self.observer)
        self.scheduler = Scheduler(
            self.running,
            self.output,
            self.observer,
            config.max_batch_size,
            config.max_queue,
            config.prefill_token_budget,
            1,
        )
        self.ll: LlamaCpp | None = None
        self._ready = threading.Event()
        self.passes = 0  # llama_decode calls of decode steps (one per strength group and step)

    def stats(self) -> EngineStats:
        return EngineStats(self.num_running, self.num_waiting, self.steps, 0)

    def start(self) -> None:
        """Load the model and adapters (on the engine thread, which owns them), then serve; load errors raise here."""
        super().start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    # ---- engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        c = self.config
        try:
            self.ll = LlamaCpp(
                self.gguf,
                n_ctx=c.max_model_len * c.max_batch_size,
                n_seq_max=c.max_batch_size,
                n_batch=c.n_batch,
                n_threads=c.num_threads,
                n_gpu_layers=c.n_gpu_layers,
            )
            for name, path in self.adapters.items():
                self.ll.load_adapter(name, path)
        except BaseException as e:
            self.error = e
            if self.ll is not None:
                self.ll.close()
            return
        finally:
            self._ready.set()
        super()._run()

    def _close(self) -> None:
        if self.ll is not None:
            self.ll.close()

    def _drop_finished(self) -> None:
        self.running.drop_finished(lambda r: self.output.finish(r, "cancelled"), self.ll.clear)

    def _start_row(self, row: Row) -> None:
        row.strengths, row.report = {}, {}
        for n, d in row.req.steering.items():
            row.report[n] = SteeringReport(strength=d.strength, when=d.when, applied=d.strength)
            if d.strength != 0:
                row.strengths[n] = d.strength
                self.observer.steering_used(n)

    def _prefill_group(self, group: list[Row]) -> None:
        for row in group:
            try:
                self._start_row(row)
                self.ll.set_scales(row.strengths)
                self.running.take(row)
                self.ll.clear(row.slot)
                logits = self.ll.prefill(row.req.prompt_ids, seq=row.slot)
            except Exception as e:
                log.exception("prefill failed for %s", row.request_id)
                self.output.finish(row, "error", error=GenerationFailed(f"prefill failed: {type(e).__name__}: {e}"))
                continue
            row.pos = row.prompt_len
            self.observer.prefill_batch(1)
            now = time.monotonic()
            self.observer.first_token(now - row.t_arrival)
            row.t_last = now
            self._sample_and_accept([row], logits[None, :])
        self._drop_finished()

    def _sample_and_accept(self, rows: list[Row], logits_np) -> None:
        logits = torch.from_numpy(logits_np)
        toks = sample_rows(logits, [r.req.sampling for r in rows], [r.gen for r in rows]).tolist()
        for i, (r, t) in enumerate(zip(rows, toks, strict=True)):
            r.last_tok = t
            self.output.accept(r, t, logits[i])

    def _step(self) -> None:
        groups: dict[tuple, list[Row]] = {}
        for r in self.running.rows:
            if not r.done:
                groups.setdefault(steering_key(r.strengths), []).append(r)
        try:
            for key, rows in groups.items():
                self.ll.set_scales(dict(key))
                logits = self.ll.decode(
                    [r.last_tok for r in rows], [r.pos for r in rows], [r.slot for r in rows], [True] * len(rows)
                )
                self.passes += 1
                self.observer.decode_batch(len(rows))
                now = time.monotonic()
                for r in rows:
                    r.pos += 1
                    self.observer.inter_token(now - r.t_last)
                    r.t_last = now
                self._sample_and_accept(rows, logits)
            self.steps += 1
        except Exception as e:
            self._end_running(e)
        self._drop_finished()


# --- adapters: exported on first start, cached -----------------------------------------------------


def adapter_cache_dir(gguf: Path, directions: dict[str, DirectionSet], root: Path) -> Path:
    """One cache entry per (base GGUF file, direction contents)."""
    h = hashlib.sha256(file_key(gguf).encode())
    for name in sorted(directions):
        ds = directions[name]
        h.update(name.encode())
        h.update(ds.directions.numpy().tobytes())
        h.update(ds.writer_weights().numpy().tobytes())
    return root / "lora" / f"{gguf.stem}-{h.hexdigest()[:16]}"


def ensure_adapters(gguf: Path, directions: dict[str, DirectionSet], root: Path) -> tuple[Path, dict[str, Path]]:
    """(base GGUF to load, name -> adapter file), exporting the adapters once.

    A base whose LM head is tied to ``token_embd`` gets an untied copy beside the adapters
    (llama.cpp would otherwise apply the embedding adapter to the head; see
    :mod:`directions.lora_export`), so the adapters are the full edit.
    """
    import json

    from directions.lora_export import MANIFEST, UNTIED_BASE, export_lora

    out = adapter_cache_dir(gguf, directions, root)
    if not (out / MANIFEST).is_file() and directions:
        log.info("exporting %d direction(s) as llama.cpp LoRA adapters into %s (one-time)", len(directions), out)
        out.parent.mkdir(parents=True, exist_ok=True)
        export_lora(str(gguf), directions, out, formats=["gguf"], gguf_embedding="untie", overwrite=True)
    if not directions:
        return gguf, {}
    man = json.loads((out / MANIFEST).read_text())
    base = out / UNTIED_BASE if man.get("gguf_base") == UNTIED_BASE else gguf
    return base, {n: out / f"{n}.gguf" for n in directions}
