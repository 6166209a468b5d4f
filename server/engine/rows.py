"""The engine-side state of one request (a row of the running batch), and the events it emits.

:class:`RowOutput` turns sampled tokens into :class:`~server.engine.types.StepOutput` events:
detokenisation with stop strings, EOS, the length limits, logprobs, and the one finished
event every request ends with.

A row with a pending lookahead condition (metadata ``auto_lookahead``, :mod:`server.engine.condition`)
holds its first K sampled tokens back: nothing reaches the client until the condition is
decided. Quiet, the held tokens are accepted as usual (the reply is the unedited model's,
token for token); firing, the row is queued in :attr:`RowOutput.restarts` and the engine
prefills it again from its prompt with the edit on.
"""

from __future__ import annotations

import time

import torch

from directions.detection import lookahead_fires
from directions.fileformat import firing_name
from server.engine.detok import IncrementalDetokenizer
from server.engine.errors import EngineError
from server.engine.protocol import Emit, EngineObserver
from server.engine.sampling import make_generator
from server.engine.types import FinishReason, GenerationRequest, SteeringReport, StepOutput, TokenLogprob


class Row:
    """One request inside the engine: its detokenizer, sampler, strengths and progress."""

    def __init__(self, req: GenerationRequest, emit: Emit, tokenizer, device):
        self.req = req
        self.emit = emit
        self._tok, self._device = tokenizer, device
        self.detok = IncrementalDetokenizer(tokenizer, req.sampling.stop)
        self.gen = make_generator(req.sampling.seed, device)
        self.generated: list[int] = []
        self.strengths: dict[str, float] = {}  # what the hooks apply to this row (conditions decided)
        self.report: dict[str, SteeringReport] = {}
        self.looking: dict = {}  # lookahead conditions still pending (name -> DirectionSet)
        self.look_decided: dict[str, bool] = {}  # lookahead decisions (kept across the restart)
        self.held: list[tuple[int, torch.Tensor | None]] = []  # tokens held back while looking
        self.restart = False  # a lookahead fired: the engine prefills the row again
        self.cancelled = False
        self.done = False
        self.t_arrival = time.monotonic()
        self.t_last: float | None = None
        self.deadline = self.t_arrival + req.timeout_s if req.timeout_s else None
        self.sent_report = False

    def apply_decision(self, name: str, edit: str, strength: float, fired: bool, score: float | None) -> None:
        """Record a decided condition of direction ``name`` on the report; a firing one applies
        ``edit`` (the file's firing-case edit NAME@auto where it has one, else NAME) at ``strength``."""
        r = self.report[name]
        r.fired, r.score = fired, score
        r.applied = strength if fired else 0.0
        if fired:
            self.strengths[edit] = strength

    @property
    def look_tokens(self) -> int:
        """How many tokens the pending lookahead conditions read (0: none pending)."""
        return max((ds.lookahead[0] for ds in self.looking.values()), default=0)

    def reset_for_restart(self) -> None:
        """Back to the state of a fresh request (same seed), keeping the lookahead decisions."""
        self.detok = IncrementalDetokenizer(self._tok, self.req.sampling.stop)
        self.gen = make_generator(self.req.sampling.seed, self._device)
        self.generated, self.held, self.strengths = [], [], {}
        self.restart = False
        self.t_last = None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)


class RowOutput:
    """Accepts sampled tokens for rows and emits their events (engine thread only)."""

    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int, observer: EngineObserver):
        self.tok = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.observer = observer
        self.restarts: list[Row] = []  # rows whose lookahead fired, for the engine to prefill again

    def accept(self, row: Row, tok: int, logits: torch.Tensor | None) -> None:
        """Record one sampled token for a row; emit text; finish on EOS/stop/length/cancel.
        While a lookahead condition is pending the token is held back instead."""
        if row.cancelled:
            self.finish(row, "cancelled")
            return
        if row.looking:
            self._hold(row, tok, logits)
            return
        self._accept(row, tok, logits)

    def _hold(self, row: Row, tok: int, logits: torch.Tensor | None) -> None:
        sp = row.req.sampling
        row.held.append((tok, logits.clone() if sp.logprobs and logits is not None else None))
        n = len(row.held)
        end = tok in self.eos_ids and not sp.ignore_eos
        # K tokens even when max_tokens is smaller (the reply is cut at max_tokens when they go
        # out): the decision must not depend on the length the client asked for
        if not (end or n >= row.look_tokens or row.prompt_len + n >= self.max_model_len):
            return
        if self._decide_lookahead(row):
            row.restart = True
            self.restarts.append(row)
            return
        held, row.held = row.held, []
        for t, lg in held:
            if row.done:
                break
            self._accept(row, t, lg)

    def _decide_lookahead(self, row: Row) -> bool:
        """Decide ``row``'s pending lookahead conditions from its held tokens; True if any fires
        (the row must then restart from its prompt)."""
        ids = [t for t, _ in row.held]
        any_fired = False
        for n, ds in row.looking.items():
            fired = lookahead_fires(ds, self.tok, ids)
            row.look_decided[n] = fired
            row.apply_decision(n, firing_name(n, ds), row.req.steering[n].strength, fired, None)
            self.observer.condition(n, fired)
            any_fired |= fired
        row.looking = {}
        return any_fired

    def take_restarts(self) -> list[Row]:
        """The rows to prefill again (their state reset), in the order their lookahead fired."""
        rows, pending = [], self.restarts
        self.restarts = []
        for r in pending:
            if r.done:
                continue
            if r.cancelled:
                self.finish(r, "cancelled")
                continue
            r.reset_for_restart()
            rows.append(r)
        return rows

    def _accept(self, row: Row, tok: int, logits: torch.Tensor | None) -> None:
        sp = row.req.sampling
        if not row.sent_report:  # the first token the client sees
            self.observer.first_token(time.monotonic() - row.t_arrival)
        is_eos = tok in self.eos_ids and not sp.ignore_eos
        lp = None
        if not is_eos:
            row.generated.append(tok)
            text = row.detok.add(tok)
            if sp.logprobs:
                lp = [self._logprob(tok, logits, sp.top_logprobs)]
        else:
            text = ""
        finish: FinishReason | None = None
        if is_eos or row.detok.stopped:
            finish = "stop"
        elif len(row.generated) >= sp.max_tokens or row.prompt_len + len(row.generated) >= self.max_model_len:
            finish = "length"
        if finish:
            text += row.detok.flush()
            row.done = True
            self.observer.finished(row.prompt_len, len(row.generated), finish, time.monotonic() - row.t_arrival)
        out = StepOutput(
            request_id=row.request_id,
            text=text,
            token_ids=[] if is_eos else [tok],
            logprobs=lp,
            finish_reason=finish,
            prompt_tokens=row.prompt_len,
            completion_tokens=len(row.generated),
        )
        self._emit(row, out)

    def finish(self, row: Row, reason: FinishReason, error: EngineError | None = None) -> None:
        """End ``row`` with ``reason`` (no new text); a second call does nothing."""
        if row.done:
            return
        row.done = True
        out = StepOutput(
            request_id=row.request_id,
            finish_reason=reason,
            prompt_tokens=row.prompt_len,
            completion_tokens=len(row.generated),
            error=error,
        )
        self.observer.finished(row.prompt_len, len(row.generated), reason, time.monotonic() - row.t_arrival)
        self._emit(row, out)

    @staticmethod
    def _emit(row: Row, out: StepOutput) -> None:
        if not row.sent_report:  # the steering report rides on the first event
            out.steering = row.report
            row.sent_report = True
        row.emit(out)

    def _logprob(self, tok: int, logits: torch.Tensor, top: int) -> TokenLogprob:
        lsm = torch.log_softmax(logits.float(), dim=-1)
        entry = TokenLogprob(token=self.tok.decode([tok]), token_id=tok, logprob=float(lsm[tok]))
        if top:
            v, i = torch.topk(lsm, top)
            entry.top = [(self.tok.decode([int(t)]), int(t), float(x)) for x, t in zip(v, i, strict=True)]
        return entry
