"""Prefill: the prompts of requests waiting together in one left-padded forward.

A request arriving alone is prefilled alone (default positions), so its logits are exactly
the plain model's. Conditional directions are off in that forward; the probe reads each
row's detection score (:mod:`server.engine.condition`). Rows whose condition does not fire
keep that forward's logits and cache: exactly those of the same request without the
condition, in the same group. Rows whose condition fires are prefilled again (those rows
only, each padded as in the group) with the direction on, and their logits and cache rows
replace the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from directions.fileformat import DirectionSet
from directions.forward import pad_left
from directions.hooks import SteeringHooks
from directions.models import kv_cache_dtype
from server.engine import kvcache
from server.engine.condition import decide, start_row
from server.engine.protocol import EngineObserver
from server.engine.rows import Row
from server.engine.sampling import sample_rows


@dataclass
class Prefilled:
    """A prefilled group, ready to join the batch."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # (rows, length) left padded
    tokens: torch.Tensor  # (rows,) first sampled tokens
    logits: torch.Tensor  # (rows, vocab) float32 at the last prompt token


class Prefiller:
    def __init__(self, model, hooks: SteeringHooks, directions: dict[str, DirectionSet], observer: EngineObserver):
        self.model = model
        self.hooks = hooks
        self.directions = directions
        self.observer = observer
        self.device = next(model.parameters()).device
        self.batched = 0  # prefills of more than one request

    def run(self, group: list[Row]) -> Prefilled:
        """Prefill ``group`` in one forward (and the firing conditional rows in a second)."""
        ids, mask, pos = pad_left([s.req.prompt_ids for s in group], 0, self.device)  # pad id: masked anyway
        if len(group) == 1:
            pos = None  # alone: exactly the plain model's call (default positions)
        auto: dict[str, DirectionSet] = {}
        for s in group:
            auto |= start_row(s, self.directions)
        probe = {ds.detect_layer for ds in auto.values()}
        out, cache, captured = self._forward(ids, mask, pos, group, probe)
        if len(group) > 1:
            self.batched += 1
        logits = out.logits[:, -1, :].float()
        fired = [i for i, s in enumerate(group) if decide(s, i, self.directions, captured, self.observer, logits)]
        if fired:
            idx = torch.tensor(fired, dtype=torch.long, device=self.device)
            sub = [group[i] for i in fired]
            out2, cache2, _ = self._forward(ids[idx], mask[idx], None if pos is None else pos[idx], sub, set())
            if len(fired) == len(group):
                cache, logits = cache2, out2.logits[:, -1, :].float()
            else:
                kvcache.replace_rows(cache, cache2, idx)
                logits[idx] = out2.logits[:, -1, :].float()
        toks = sample_rows(logits, [s.req.sampling for s in group], [s.gen for s in group])
        return Prefilled(group, cache, mask, toks, logits)

    def _forward(self, ids, mask, pos, rows: list[Row], probe: set[int]):
        """One prefill forward of ``rows`` (rows of ``ids``) with their current strengths.

        Returns (output, cache, captured): ``captured[L]`` is the (rows, d_model) fp32 input of
        decoder layer ``L`` at the last prompt token, for every ``L`` in ``probe``.
        """
        names = {n for s in rows for n in s.strengths}
        self.hooks.set_strengths({n: [s.strengths.get(n, 0.0) for s in rows] for n in names})
        cache = kvcache.new_cache(kv_cache_dtype(self.model))
        with self.hooks.probe(probe) as captured:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
            )
        return out, cache, captured
