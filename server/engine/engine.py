"""Continuous batching on top of a transformers model.

One inference thread owns the model. Requests arrive through an inbox
queue; requests waiting together are prefilled together (one left-padded
forward; a request arriving alone is prefilled alone, so its logits are
exactly the plain model's) and then join the running batch at the next
decode step. Conditional requests share that forward: it runs with their
conditional directions off and reads each row's detection score; the rows
whose condition fires are prefilled again, with the group's padding, with
the direction on. Finished and cancelled rows leave the batch at the next
step. Every row carries its own sampling parameters, stop strings and
steering strengths; the hooks read a per-row strength tensor set for each
pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from directions.fileformat import DirectionSet
from directions.metrics import pad_left
from server.engine import kvcache
from server.engine.detok import IncrementalDetokenizer
from server.engine.sampling import make_generator, sample_rows
from server.engine.types import (
    EngineOverloaded,
    EngineStopped,
    GenerationRequest,
    SteeringReport,
    StepOutput,
    TokenLogprob,
)
from server.hooks import SteeringHooks

log = logging.getLogger("frankly.engine")


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests beyond the running batch
    max_model_len: int = 4096
    num_threads: int | None = None  # torch intra-op threads; None = torch default
    prefill_token_budget: int = 256  # prompt tokens prefilled per step while other rows decode
    prefill_batch: int = 8  # waiting requests prefilled together in one left-padded forward (1 = one by one)


class _NullMetrics:
    def __getattr__(self, name):
        return lambda *a, **k: None


class _Seq:
    """Engine-side state of one request."""

    def __init__(self, req: GenerationRequest, emit: Callable[[StepOutput], None], tokenizer, device):
        self.req = req
        self.emit = emit
        self.detok = IncrementalDetokenizer(tokenizer, req.sampling.stop)
        self.gen = make_generator(req.sampling.seed, device)
        self.generated: list[int] = []
        self.strengths: dict[str, float] = {}
        self.report: dict[str, SteeringReport] = {}
        self.cancelled = False
        self.done = False
        self.t_arrival = time.monotonic()
        self.t_last: float | None = None
        self.deadline = self.t_arrival + req.timeout_s if req.timeout_s else None
        self.sent_report = False


class Engine:
    """The inference engine. Create, ``start()``, then ``generate()`` from asyncio."""

    def __init__(self, model, tokenizer, directions: dict[str, DirectionSet], config: EngineConfig, metrics=None):
        self.model = model
        self.tok = tokenizer
        self.directions = directions
        self.config = config
        self.metrics = metrics or _NullMetrics()
        self.device = next(model.parameters()).device
        self.hooks = SteeringHooks(model, directions)
        self.eos_ids = self._eos_ids()
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Seq] = deque()
        self._n_waiting = 0
        self._lock = threading.Lock()
        self.rows: list[_Seq] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None
        self._last_tok: torch.Tensor | None = None
        self._strength_dirty = True
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.batched_prefills = 0  # left-padded prefills of more than one request
        self.error: BaseException | None = None

    # ---- public, any thread -------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="frankly-engine", daemon=True)
        self._thread.start()

    def submit(self, req: GenerationRequest, emit: Callable[[StepOutput], None]) -> None:
        """Queue a request; ``emit`` is called from the engine thread with each event."""
        if not self._accepting:
            raise EngineStopped("the server is shutting down")
        with self._lock:
            if self._n_waiting >= self.config.max_queue:
                raise EngineOverloaded(retry_after=1.0)
            self._n_waiting += 1
        self._inbox.put(("add", _Seq(req, emit, self.tok, self.device)))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; let running and waiting requests finish (up to ``timeout``), then cancel the rest."""
        self._accepting = False
        self._inbox.put(("drain", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._inbox.put(("stop", None))
                self._thread.join(10)

    async def generate(self, req: GenerationRequest) -> AsyncIterator[StepOutput]:
        """Stream the events of one request. Cancels the request if the consumer stops early."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StepOutput] = asyncio.Queue()

        def emit(out: StepOutput) -> None:
            loop.call_soon_threadsafe(q.put_nowait, out)

        self.submit(req, emit)
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(req.request_id)

    def generate_blocking(self, reqs: list[GenerationRequest], progress: Callable[[], None] | None = None) -> list[str]:
        """Run requests to completion from a plain thread; return their texts in order (for eval/extract)."""
        texts = {r.request_id: [] for r in reqs}
        done = threading.Semaphore(0)
        errors: list[str] = []

        def make_emit(rid):
            def emit(out: StepOutput):
                texts[rid].append(out.text)
                if out.finished:
                    if out.error:
                        errors.append(out.error)
                    if progress:
                        progress()
                    done.release()

            return emit

        pending = list(reqs)
        inflight = 0
        while pending or inflight:
            while pending and self._n_waiting < self.config.max_queue:
                r = pending.pop(0)
                self.submit(r, make_emit(r.request_id))
                inflight += 1
            done.acquire()
            inflight -= 1
        if errors:
            raise RuntimeError(errors[0])
        return ["".join(texts[r.request_id]) for r in reqs]

    # ---- engine thread ------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(int(x) for x in e)
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        return ids

    def _run(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        try:
            with torch.inference_mode():
                while True:
                    if not self._drain_inbox(block=not self.rows and not self._waiting):
                        break
                    if self._stopping and not self.rows and not self._waiting:
                        break
                    self._expire()
                    self._admit()
                    if self.rows:
                        try:
                            self._decode_step()
                        except Exception as e:  # one bad step must not take the engine down
                            log.exception("decode step failed; ending the %d running rows", len(self.rows))
                            for s in self.rows:
                                self._finish(
                                    s, "error", error=f"generation failed: {type(e).__name__}", code="engine_error"
                                )
                            self._drop_finished()
        except BaseException as e:  # the engine must never die silently
            log.exception("engine thread crashed")
            self.error = e
            for s in list(self.rows) + list(self._waiting):
                self._finish(s, "error", error=f"engine failure: {type(e).__name__}", code="engine_error")
            self.rows = []
        finally:
            self.hooks.remove()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply pending commands. Returns False when the engine must stop now."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if kind == "add":
                self._waiting.append(arg)
            elif kind == "cancel":
                for s in self.rows:
                    if s.req.request_id == arg:
                        s.cancelled = True
                for s in list(self._waiting):
                    if s.req.request_id == arg:
                        self._waiting.remove(s)
                        self._dec_waiting()
                        self._finish(s, "cancelled")
            elif kind == "drain":
                self._stopping = True
            elif kind == "stop":
                for s in list(self._waiting):
                    self._dec_waiting()
                    self._finish(s, "cancelled", error="server shutting down", code="shutdown")
                self._waiting.clear()
                for s in self.rows:
                    self._finish(s, "cancelled", error="server shutting down", code="shutdown")
                self.rows = []
                return False

    def _dec_waiting(self) -> None:
        with self._lock:
            self._n_waiting -= 1

    def _expire(self) -> None:
        now = time.monotonic()
        for s in list(self._waiting):
            if s.deadline and now > s.deadline:
                self._waiting.remove(s)
                self._dec_waiting()
                self._finish(s, "error", error="request timed out while waiting", code="timeout")
        for s in self.rows:
            if s.deadline and now > s.deadline and not s.done:
                self._finish(s, "error", error="request timed out", code="timeout")
        self._drop_finished()

    # prefill ---------------------------------------------------------------
    def _admit(self) -> None:
        # While rows are decoding, prefill at most ``prefill_token_budget`` prompt tokens per
        # step, so a burst of arrivals does not stall the running streams for many prefills.
        budget = self.config.prefill_token_budget if self.rows else None
        spent = 0
        group: list[_Seq] = []
        while self._waiting and len(self.rows) + len(group) < self.config.max_batch_size:
            if budget is not None and spent and spent + len(self._waiting[0].req.prompt_ids) > budget:
                break
            seq = self._waiting.popleft()
            spent += len(seq.req.prompt_ids)
            self._dec_waiting()
            self.metrics.queue_time(time.monotonic() - seq.t_arrival)
            group.append(seq)
            if len(group) >= max(1, self.config.prefill_batch):
                self._prefill_group(group)
                group = []
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[_Seq]) -> None:
        """Prefill ``group`` together; if that fails, each request alone (a bad request must not take the engine down)."""
        try:
            self._prefill(group)
        except Exception as e:
            self._strength_dirty = True
            if len(group) > 1:
                log.exception("batched prefill of %d requests failed; prefilling them one by one", len(group))
                for seq in group:
                    if not seq.done and seq not in self.rows:
                        self._prefill_group([seq])
            else:
                log.exception("prefill failed for %s", group[0].req.request_id)
                self._finish(group[0], "error", error=f"prefill failed: {type(e).__name__}: {e}", code="engine_error")

    def _prefill(self, group: list[_Seq]) -> None:
        """Prefill ``group`` in one forward (left-padded when more than one request) and join the batch.

        Conditional directions are off in that forward; a probe on each detection layer reads
        every row's last prompt token. Rows whose condition does not fire keep that forward's
        logits and cache: exactly those of the same request without the condition, in the same
        group. Rows whose condition fires are prefilled again (those rows only, each padded as in
        the group) with the direction on, and their logits and cache rows replace the first ones.
        """
        ids, mask, pos = pad_left([s.req.prompt_ids for s in group], 0, self.device)  # pad id: masked anyway
        if len(group) == 1:
            pos = None  # alone: exactly the plain model's call (default positions)
        auto: dict[str, DirectionSet] = {}
        for s in group:
            self._start_report(s)
            s.strengths = {n: d.strength for n, d in s.req.steering.items() if d.when != "auto" and d.strength != 0}
            auto |= {n: self.directions[n] for n, d in s.req.steering.items() if d.when == "auto" and d.strength != 0}
        out, cache, captured = self._forward_prefill(ids, mask, pos, group, {ds.detect_layer for ds in auto.values()})
        if len(group) > 1:
            self.batched_prefills += 1
        logits = out.logits[:, -1, :].float()
        fired = [i for i, s in enumerate(group) if self._decide(s, captured, i)]
        if fired:
            idx = torch.tensor(fired, dtype=torch.long, device=self.device)
            sub = [group[i] for i in fired]
            out2, cache2, _ = self._forward_prefill(ids[idx], mask[idx], None if pos is None else pos[idx], sub, set())
            if len(fired) == len(group):
                cache, logits = cache2, out2.logits[:, -1, :].float()
            else:
                kvcache.replace_rows(cache, cache2, idx)
                logits[idx] = out2.logits[:, -1, :].float()
        toks = sample_rows(logits, [s.req.sampling for s in group], [s.gen for s in group])
        self._join(group, cache, mask, toks, logits)

    @staticmethod
    def _start_report(seq: _Seq) -> None:
        """What each requested direction does before any condition is measured."""
        for n, d in seq.req.steering.items():
            auto = d.when == "auto"
            seq.report[n] = SteeringReport(strength=d.strength, when=d.when, applied=0.0 if auto else d.strength)
            if auto and d.strength == 0:
                seq.report[n].fired = False

    def _decide(self, seq: _Seq, captured: dict[int, torch.Tensor], row: int) -> bool:
        """Decide ``seq``'s conditional directions from its row of the probe; True if any fires."""
        any_fired = False
        for n, d in seq.req.steering.items():
            if d.when != "auto" or d.strength == 0:
                continue
            ds = self.directions[n]
            h = captured.get(ds.detect_layer)
            score = float(h[row] @ ds.detect_vector.to(h.device, h.dtype)) if h is not None else float("nan")
            f = score > ds.detect_threshold
            r = seq.report[n]
            r.fired, r.score = f, round(score, 4)
            r.applied = r.strength if f else 0.0
            self.metrics.condition(n, f)
            if f:
                seq.strengths[n] = d.strength
                any_fired = True
        return any_fired

    def hooks_layers(self):
        from directions.writers import decoder_layers

        return decoder_layers(self.model)

    def _forward_prefill(self, ids, mask, pos, seqs: list[_Seq], probe: set[int]):
        """One prefill forward of ``seqs`` (rows of ``ids``) with their current strengths.

        Returns (output, cache, captured): ``captured[L]`` is the (rows, d_model) fp32 input of
        decoder layer ``L`` at the last position (the last prompt token: rows are left-padded),
        for every ``L`` in ``probe``.
        """
        names = {n for s in seqs for n in s.strengths}
        self.hooks.set_strengths({n: [s.strengths.get(n, 0.0) for s in seqs] for n in names})
        self._strength_dirty = True
        captured: dict[int, torch.Tensor] = {}
        handles = []
        layers = self.hooks_layers() if probe else []
        for L in probe:
            if len(layers) <= L:  # no such decoder layer: the score is NaN, the condition never fires
                continue

            def pre(module, args, kwargs, L=L):
                h = args[0] if args else kwargs["hidden_states"]
                captured[L] = h[:, -1].float().clone()

            handles.append(layers[L].register_forward_pre_hook(pre, with_kwargs=True))
        cache = kvcache.new_cache()
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
            )
        finally:
            for h in handles:
                h.remove()
        return out, cache, captured

    def _join(self, seqs: list[_Seq], cache, mask: torch.Tensor, toks, logits) -> None:
        """Append freshly prefilled rows (left-padded ``mask``) to the running batch; emit their first tokens."""
        self.metrics.prefill_batch(len(seqs))
        for s in seqs:
            for n in s.strengths:
                self.metrics.steering_used(n)
        next_pos = mask.sum(-1)  # each row's prompt length
        self._cache, self._mask = kvcache.merge(self._cache, self._mask, cache, mask)
        fresh = self._next_pos is None or not self.rows
        self._next_pos = next_pos if fresh else torch.cat([self._next_pos, next_pos])
        self._last_tok = toks if fresh else torch.cat([self._last_tok, toks])
        self.rows.extend(seqs)
        self._strength_dirty = True
        now = time.monotonic()
        tl = toks.tolist()
        for i, seq in enumerate(seqs):
            self.metrics.first_token(now - seq.t_arrival)
            seq.t_last = now
            self._accept(seq, tl[i], logits[i])
        self._drop_finished()

    # decode ------------------------------------------------------------------
    def _row_strengths(self) -> dict[str, list[float]]:
        names = {n for s in self.rows for n in s.strengths}
        return {n: [s.strengths.get(n, 0.0) for s in self.rows] for n in names}

    def _decode_step(self) -> None:
        rows = self.rows
        b = len(rows)
        if self._strength_dirty:
            self.hooks.set_strengths(self._row_strengths())
            self._strength_dirty = False
        mask = torch.cat([self._mask, self._mask.new_ones(b, 1)], dim=1)
        out = self.model(
            input_ids=self._last_tok.view(b, 1),
            attention_mask=mask,
            position_ids=self._next_pos.view(b, 1),
            cache=self._cache,
            use_cache=True,
        )
        self._mask = mask
        self._next_pos = self._next_pos + 1
        logits = out.logits[:, -1, :].float()
        toks = sample_rows(logits, [s.req.sampling for s in rows], [s.gen for s in rows])
        self._last_tok = toks
        self.steps += 1
        self.metrics.batch_size(b)
        now = time.monotonic()
        tl = toks.tolist()
        for i, s in enumerate(rows):
            if s.done:
                continue
            if s.t_last is not None:
                self.metrics.inter_token(now - s.t_last)
            s.t_last = now
            self._accept(s, tl[i], logits[i])
        self._drop_finished()

    def _accept(self, seq: _Seq, tok: int, logits: torch.Tensor) -> None:
        """Record one sampled token for a row; emit text; finish on EOS/stop/length/cancel."""
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        sp = seq.req.sampling
        is_eos = tok in self.eos_ids and not sp.ignore_eos
        lp = None
        if not is_eos:
            seq.generated.append(tok)
            text = seq.detok.add(tok)
            if sp.logprobs:
                lp = [self._logprob(tok, logits, sp.top_logprobs)]
        else:
            text = ""
        finish = None
        if is_eos or seq.detok.stopped:
            finish = "stop"
        elif (
            len(seq.generated) >= sp.max_tokens
            or len(seq.req.prompt_ids) + len(seq.generated) >= self.config.max_model_len
        ):
            finish = "length"
        if finish:
            text += seq.detok.flush()
        out = StepOutput(
            request_id=seq.req.request_id,
            text=text,
            token_ids=[] if is_eos else [tok],
            logprobs=lp,
            finish_reason=finish,
            prompt_tokens=len(seq.req.prompt_ids),
            completion_tokens=len(seq.generated),
        )
        if not seq.sent_report:
            out.steering = seq.report
            seq.sent_report = True
        if finish:
            seq.done = True
            self.metrics.finished(seq, finish, time.monotonic() - seq.t_arrival)
        seq.emit(out)

    def _logprob(self, tok: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        lsm = torch.log_softmax(logits.float(), dim=-1)
        entry = TokenLogprob(token=self.tok.decode([tok]), token_id=tok, logprob=float(lsm[tok]))
        if top:
            v, i = torch.topk(lsm, top)
            entry.top = [(self.tok.decode([int(t)]), int(t), float(x)) for x, t in zip(v, i, strict=True)]
        return entry

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, code: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        out = StepOutput(
            request_id=seq.req.request_id,
            finish_reason=reason,
            prompt_tokens=len(seq.req.prompt_ids),
            completion_tokens=len(seq.generated),
            error=error,
            error_code=code or ("engine_error" if error else None),
        )
        if not seq.sent_report:
            out.steering = seq.report
            seq.sent_report = True
        self.metrics.finished(seq, reason, time.monotonic() - seq.t_arrival)
        seq.emit(out)

    def _drop_finished(self) -> None:
        for s in self.rows:
            if s.cancelled and not s.done:
                self._finish(s, "cancelled")
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self._cache, self._mask, self._next_pos, self._last_tok = [], None, None, None, None
        else:
            self._cache, self._mask = kvcache.select(self._cache, self._mask, keep)
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._next_pos = self._next_pos.index_select(0, idx)
            self._last_tok = self._last_tok.index_select(0, idx)
            self.rows = [self.rows[i] for i in keep]
        self._strength_dirty = True
