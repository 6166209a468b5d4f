"""The llama.cpp engine: frankly's scheduler on llama.cpp, steering through the exported LoRA adapters.

llama.cpp (in-process, through ``llama-cpp-python``'s low-level bindings) runs the
unchanged base GGUF, quantized; each loaded direction is a rank-1 LoRA adapter whose
scale is the strength (:mod:`directions.lora`), exported on first start and cached.

Scheduling. llama.cpp's adapter scales belong to the context, not to a row, so each
decode step runs at least one ``llama_decode`` per *strength group*: the running rows with
the same strengths decode together (several sequences in one batch), and a step with k
different strength settings costs k passes. A group is split further where single-row
passes measured faster than one pass over the group (:mod:`server.engine.llamacpp_passes`). Requests admitted together are prefilled the
same way: one ``llama_decode`` per strength group (chunks of ``n_batch`` tokens, every
prompt its own sequence). The waiting queue, admission, cancellation, deadlines,
detokenisation, stop strings and the events are the torch engine's own
(:mod:`server.engine.scheduler`, :mod:`server.engine.rows`).

Conditional mode (``when: auto``). A request with a conditional direction is prefilled
first on a second, one-sequence *detector context* whose graph evaluation callback copies
the residual stream entering the detection layer at the last prompt token
(:class:`directions.llamacpp_probe.LayerProbe`), with the conditional directions off and
the unconditional ones on, exactly as the torch engine's probe. The score and threshold
are the direction file's (:func:`server.engine.condition.decide`). A row whose condition
stays quiet keeps that prefill: its KV cells are copied into its sequence of the main
context (``llama_state_seq_get_data``/``set_data``); a row whose condition fires is
prefilled again on the main context with the direction on. The per-node Python callback
never runs on the main context, so decoding pays nothing for it.

Greedy rows without logprobs are sampled with numpy straight from llama.cpp's logits
buffer; torch (and a copy of the 151k-float rows) only serves sampled or logprob rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from directions.fileformat import DirectionSet, base_name
from directions.files import file_key
from directions.llamacpp import Context, LlamaCpp, LlamaCppError
from server.engine.condition import decide, start_row
from server.engine.errors import GenerationFailed
from server.engine.llamacpp_passes import PassPlanner
from server.engine.protocol import EngineCapabilities, EngineObserver, EngineStats, NullObserver
from server.engine.rows import Row, RowOutput
from server.engine.sampling import sample_rows
from server.engine.scheduler import Scheduler
from server.engine.threaded import ThreadedEngine

log = logging.getLogger("frankly.engine.llamacpp")

CAPABILITIES = EngineCapabilities(
    name="llama.cpp",
    supports_conditional=True,  # a detector context reads the detection layer during the unsteered prefill
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
    num_threads: int | None = None  # one-token passes (default_threads())
    num_threads_batch: int | None = None  # passes of several tokens (default: all cores)
    n_batch: int = 512  # tokens per llama_decode (prompt chunks)
    prefill_token_budget: int = 256  # prompt tokens admitted per step while other rows decode
    prefill_batch: int = 8  # requests admitted together, prefilled one llama_decode per strength group
    n_gpu_layers: int = 0


def default_threads() -> int:
    """Half the logical cores (about the physical ones, as llama-cpp-python's own server defaults to).
    llama.cpp's threads spin at a barrier after every graph node: when one loses its core (to the HTTP
    and tokenizer threads, the client, another process) the others wait out its time slice. On the
    2-core test machine under load, 2 threads decoded at 673 ms/token and 1 thread at 77 ms/token."""
    return max(1, (os.cpu_count() or 2) // 2)


def default_threads_batch() -> int:
    """All logical cores, as llama-cpp-python's own server: a pass over several tokens (a prompt, a
    decode step of several rows) has enough work per graph node for every thread. Measured on the
    2-core build machine, demo Q4_K_M, 8 rows per step: 197 ms with 1 thread, 119 ms with 2."""
    return max(1, os.cpu_count() or 1)


def steering_key(strengths: dict[str, float]) -> tuple:
    """Rows with equal keys run with the same adapter scales."""
    return tuple(sorted((n, float(s)) for n, s in strengths.items() if s != 0.0))


def group_by_strengths(rows: list[Row]) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(steering_key(r.strengths), []).append(r)
    return groups


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
        for r in [r for r in self.rows if r.done or r.restart]:
            release(r.slot)
            self.free.append(r.slot)
            self.rows.remove(r)

    def clear(self) -> None:
        self.free.extend(r.slot for r in self.rows)
        self.rows = []


def prefill_rows(ctx: Context, rows: list[Row]) -> np.ndarray:
    """Prefill every row's prompt into its own sequence (``row.slot``) with the context's current scales,
    in as few passes of ``n_batch`` entries as fit; returns the rows' last-position logits (rows, vocab)."""
    entries = [(t, p, r.slot, p == r.prompt_len - 1) for r in rows for p, t in enumerate(r.req.prompt_ids)]
    out = []
    for i in range(0, len(entries), ctx.n_batch):
        tok, pos, seq, want = zip(*entries[i : i + ctx.n_batch], strict=True)
        logits = ctx.decode(tok, pos, seq, want, copy=False)
        if len(logits):
            out.append(logits.copy())
    return np.concatenate(out)


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
        directions: dict[str, DirectionSet] | None = None,
    ):
        super().__init__(tokenizer, "cpu")
        self.gguf = str(gguf)
        self.adapters = dict(adapters)
        self.directions = dict(directions or {})
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
            config.prefill_batch,
        )
        self.ll: LlamaCpp | None = None
        self.detector: Context | None = None  # the one-sequence context with the layer probe
        self._ready = threading.Event()
        self.passes = 0  # llama_decode calls of decode steps (at least one per strength group and step)
        self.planner = PassPlanner(config.max_batch_size)
        self.detector_prefills = 0

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
        try:
            self._load()
        except BaseException as e:
            self.error = e
            if self.ll is not None:
                self.ll.close()
            return
        finally:
            self._ready.set()
        super()._run()

    def _load(self) -> None:
        c = self.config
        self.ll = LlamaCpp(
            self.gguf,
            n_ctx=c.max_model_len * c.max_batch_size,
            n_seq_max=c.max_batch_size,
            n_batch=c.n_batch,
            n_threads=c.num_threads or default_threads(),
            n_threads_batch=c.num_threads_batch or default_threads_batch(),
            n_gpu_layers=c.n_gpu_layers,
        )
        for name, path in self.adapters.items():
            self.ll.load_adapter(name, path)
        layers = {ds.detect_layer for ds in self.directions.values() if ds.uses_probe}
        if layers:
            from directions.llamacpp_probe import LayerProbe

            self.detector = self.ll.new_context(c.max_model_len, 1, probe=LayerProbe(layers))

    def _close(self) -> None:
        if self.ll is not None:
            self.ll.close()

    def _drop_finished(self) -> None:
        self.running.drop_finished(lambda r: self.output.finish(r, "cancelled"), self.ll.clear)

    def _prefill_group(self, group: list[Row]) -> None:
        """Rows with a condition go through the detector one by one; the rest (and the conditional rows
        that fired) are prefilled one llama_decode per strength group. A failing pass ends only its rows."""
        ready: list[tuple[Row, np.ndarray]] = []
        plain: list[Row] = []
        for row in group:
            if start_row(row, self.directions):
                got = self._guard([row], lambda row=row: self._detect(row))
                if got is not None and got[0] is not None:
                    ready.append((row, got[0]))
                elif got is not None:
                    plain.append(row)  # fired: prefilled steered below
            else:
                plain.append(row)
        for key, rows in group_by_strengths(plain).items():
            got = self._guard(rows, lambda key=key, rows=rows: self._prefill_steered(key, rows))
            if got is not None:
                ready.extend(zip(rows, got, strict=True))
        if ready:
            self._join([r for r, _ in ready], np.stack([lg for _, lg in ready]))
        self._drop_finished()

    def _guard(self, rows: list[Row], fn):
        try:
            return fn()
        except Exception as e:
            log.exception("prefill failed for %s", ", ".join(r.request_id for r in rows))
            for r in rows:
                if r in self.running.rows:
                    self.ll.clear(r.slot)
                self.output.finish(r, "error", error=GenerationFailed(f"prefill failed: {type(e).__name__}: {e}"))
            self._drop_finished()
            return None

    def _prefill_steered(self, key: tuple, rows: list[Row]) -> list[np.ndarray]:
        self.ll.set_scales(dict(key))
        for r in rows:
            self.running.take(r)
            self.ll.clear(r.slot)
        return list(prefill_rows(self.ll.main, rows))

    def _detect(self, row: Row) -> list[np.ndarray | None]:
        """Prefill ``row`` on the detector (conditional directions off) and decide its conditions.
        Quiet: its KV cells move to the main context, returns [logits]. Fired: returns [None]."""
        det, probe = self.detector, self.detector.probe
        det.set_scales(row.strengths)
        det.clear(0)
        probe.reset()
        row.slot = 0
        logits = prefill_rows(det, [row])[0]
        self.detector_prefills += 1
        captured = {L: torch.from_numpy(v)[None] for L, v in probe.captured.items()}
        if decide(
            row, 0, self.directions, captured, self.observer, torch.from_numpy(np.asarray(logits)).reshape(1, -1)
        ):
            det.clear(0)
            return [None]
        self.running.take(row)
        try:
            det.copy_seq_to(self.ll.main, 0, row.slot)
        except LlamaCppError as e:  # a llama.cpp whose state layout we do not know: prefill it again
            log.warning("%s; prefilling the quiet conditional row again on the main context", e)
            self.ll.set_scales(row.strengths)
            logits = prefill_rows(self.ll.main, [row])[0]
        det.clear(0)
        return [logits]

    def _join(self, rows: list[Row], logits: np.ndarray) -> None:
        self.observer.prefill_batch(len(rows))
        now = time.monotonic()
        for r in rows:
            r.pos = r.prompt_len
            for n in {base_name(n) for n in r.strengths}:
                self.observer.steering_used(n)
            r.t_last = now
        self._sample_and_accept(rows, logits)

    def _sample_and_accept(self, rows: list[Row], logits: np.ndarray) -> None:
        """Greedy rows take numpy's argmax of llama.cpp's logits; the others (and logprobs) go through torch."""
        toks = logits.argmax(axis=1).tolist()
        special = [i for i, r in enumerate(rows) if not r.req.sampling.greedy or r.req.sampling.logprobs]
        tensors: dict[int, torch.Tensor] = {}
        if special:
            sub = torch.from_numpy(np.array(logits[special]))
            picked = sample_rows(sub, [rows[i].req.sampling for i in special], [rows[i].gen for i in special])
            for k, i in enumerate(special):
                toks[i], tensors[i] = int(picked[k]), sub[k]
        for i, (r, t) in enumerate(zip(rows, toks, strict=True)):
            r.last_tok = t
            self.output.accept(r, t, tensors.get(i))

    def _step(self) -> None:
        try:
            groups = group_by_strengths([r for r in self.running.rows if not r.done])
            # the group whose scales are active goes first: each change of scales re-reserves llama.cpp's graphs
            for key in sorted(groups, key=lambda k: k != self.ll.main.scales):
                self.ll.set_scales(dict(key))
                for rows in self.planner.split(groups[key]):
                    self._decode_pass(rows)
            self.steps += 1
        except Exception as e:
            self._end_running(e)
        self._drop_finished()

    def _decode_pass(self, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        logits = self.ll.decode(
            [r.last_tok for r in rows], [r.pos for r in rows], [r.slot for r in rows], [True] * len(rows), False
        )
        self.planner.record(len(rows), time.perf_counter() - t0)
        self.passes += 1
        self.observer.decode_batch(len(rows))
        now = time.monotonic()
        for r in rows:
            r.pos += 1
            self.observer.inter_token(now - r.t_last)
            r.t_last = now
        self._sample_and_accept(rows, logits)


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
