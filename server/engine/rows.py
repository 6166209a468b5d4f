"""The engine-side state of one request (a row of the running batch), and the events it emits.

:class:`RowOutput` turns sampled tokens into :class:`~server.engine.types.StepOutput` events:
detokenisation with stop strings, EOS, the length limits, logprobs, and the one finished
event every request ends with.
"""

from __future__ import annotations

import time

import torch

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
        self.detok = IncrementalDetokenizer(tokenizer, req.sampling.stop)
        self.gen = make_generator(req.sampling.seed, device)
        self.generated: list[int] = []
        self.strengths: dict[str, float] = {}  # what the hooks apply to this row (conditions decided)
        self.report: dict[str, SteeringReport] = {}
        self.cancelled = False
        self.done = False
        self.t_arrival = time.monotonic()
        self.t_last: float | None = None
        self.deadline = self.t_arrival + req.timeout_s if req.timeout_s else None
        self.sent_report = False

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

    def accept(self, row: Row, tok: int, logits: torch.Tensor) -> None:
        """Record one sampled token for a row; emit text; finish on EOS/stop/length/cancel."""
        if row.cancelled:
            self.finish(row, "cancelled")
            return
        sp = row.req.sampling
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
