"""The scheduler and row events without a model: queue bound, cancel, expiry, admission budget,
EOS / stop / length, and exactly one finished event per request."""

from __future__ import annotations

import time

import pytest
import torch

from directions.strengths import DirectionRequest
from server.engine.errors import EngineOverloaded, EngineStopped, RequestTimedOut
from server.engine.protocol import NullObserver
from server.engine.rows import Row, RowOutput
from server.engine.scheduler import Scheduler
from server.engine.types import GenerationRequest, SamplingParams


class CharTok:
    eos_token_id = 1

    def decode(self, ids, **kw):
        return "".join(chr(96 + i) for i in ids)


class Rows:
    def __init__(self):
        self.rows = []

    def __len__(self):
        return len(self.rows)

    def clear(self):
        self.rows = []


def _row(rid, events, n=5, prompt=(1, 2, 3), stop=(), timeout=None, steering=None):
    sp = SamplingParams(max_tokens=n, temperature=0, stop=list(stop))
    return Row(
        GenerationRequest(rid, list(prompt), sp, steering or {}, timeout_s=timeout), events.append, CharTok(), "cpu"
    )


def _sched(max_queue=4, budget=4, batch=8):
    out = RowOutput(CharTok(), {1}, max_model_len=16, observer=NullObserver())
    return Scheduler(Rows(), out, NullObserver(), 2, max_queue, budget, batch), out


def test_queue_bound_counts_at_submit_and_drain_refuses():
    sched, _ = _sched(max_queue=1)
    sched.submit(_row("a", []))
    with pytest.raises(EngineOverloaded):
        sched.submit(_row("b", []))
    sched.drain()
    with pytest.raises(EngineStopped):
        sched.submit(_row("c", []))


def test_cancel_in_the_queue_ends_it_once():
    sched, _ = _sched()
    ev = []
    sched.submit(_row("a", ev))
    sched.cancel("a")
    assert sched.apply_commands(block=False)
    assert [e.finish_reason for e in ev] == ["cancelled"] and sched.num_waiting == 0 and not sched.waiting


def test_expiry_and_stop():
    sched, _ = _sched()
    late, ev = _row("late", [], timeout=0.01), []
    late.emit = ev.append
    sched.submit(late)
    sched.apply_commands(block=False)
    time.sleep(0.02)
    sched.expire()
    assert isinstance(ev[-1].error, RequestTimedOut) and ev[-1].finish_reason == "error"
    ev2 = []
    sched.submit(_row("x", ev2))
    sched.stop()
    assert not sched.apply_commands(block=False)
    assert isinstance(ev2[-1].error, EngineStopped) and ev2[-1].finish_reason == "cancelled"


def test_admission_respects_batch_room_and_prefill_budget():
    sched, _ = _sched(budget=4, batch=8)
    for i in range(3):
        sched.submit(_row(f"r{i}", [], prompt=(2, 3, 4)))
    sched.apply_commands(block=False)
    groups = []
    sched.admit(groups.append)
    assert [[r.request_id for r in g] for g in groups] == [["r0", "r1"]]  # batch of 2
    sched.batch.rows = groups[0]
    groups.clear()
    sched.admit(groups.append)
    assert groups == []  # no room
    sched.batch.rows = []
    sched.admit(groups.append)
    assert [[r.request_id for r in g] for g in groups] == [["r2"]] and sched.num_waiting == 0


def test_row_events_eos_stop_length_and_the_report_first():
    out = RowOutput(CharTok(), {1}, max_model_len=16, observer=NullObserver())
    logits = torch.zeros(30)
    ev = []
    row = _row("s", ev, n=10, stop=["cd"], steering={"d": DirectionRequest(0.5)})
    row.report = {"d": "report"}
    for t in (2, 3, 4):
        out.accept(row, t, logits)
    assert ev[0].steering == {"d": "report"} and all(e.steering is None for e in ev[1:])
    assert "".join(e.text for e in ev) == "b" and ev[-1].finish_reason == "stop"
    ev = []
    row = _row("l", ev, n=2)
    out.accept(row, 5, logits)
    out.accept(row, 6, logits)
    assert ev[-1].finish_reason == "length" and "".join(e.text for e in ev) == "ef"
    out.finish(row, "cancelled")  # already done: nothing more
    assert len(ev) == 2
    ev = []
    row = _row("e", ev)
    out.accept(row, 1, logits)
    assert ev[-1].finish_reason == "stop" and ev[-1].token_ids == [] and ev[-1].completion_tokens == 0
