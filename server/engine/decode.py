"""One decode step of the running batch: every row feeds its last token and samples its next."""

from __future__ import annotations

import time

import torch

from directions.hooks import SteeringHooks
from server.engine.batch import Batch
from server.engine.protocol import EngineObserver
from server.engine.rows import RowOutput
from server.engine.sampling import sample_rows


def decode_step(model, batch: Batch, hooks: SteeringHooks, output: RowOutput, observer: EngineObserver) -> None:
    """Run one forward over all rows (per-row strengths), sample, and emit each row's token."""
    rows = batch.rows
    b = len(rows)
    if batch.strength_dirty:
        hooks.set_strengths(batch.strengths())
        batch.strength_dirty = False
    mask = torch.cat([batch.mask, batch.mask.new_ones(b, 1)], dim=1)
    out = model(
        input_ids=batch.last_tok.view(b, 1),
        attention_mask=mask,
        position_ids=batch.next_pos.view(b, 1),
        cache=batch.cache,
        use_cache=True,
    )
    logits = out.logits[:, -1, :].float()
    toks = sample_rows(logits, [s.req.sampling for s in rows], [s.gen for s in rows])
    batch.advance(mask, toks)
    observer.decode_batch(b)
    now = time.monotonic()
    for i, (s, tok) in enumerate(zip(rows, toks.tolist(), strict=True)):
        if s.done:
            continue
        if s.t_last is not None:
            observer.inter_token(now - s.t_last)
        s.t_last = now
        output.accept(s, tok, logits[i])
    batch.drop_finished(lambda s: output.finish(s, "cancelled"))
