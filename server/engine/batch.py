"""The running batch: its rows, their KV cache (left padded), mask, positions and last tokens.

Rows join after their prefill (caches concatenated with left padding) and leave when done
(index-selected out), the design of the early Python text-generation-inference server.
Engine thread only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from server.engine import kvcache
from server.engine.rows import Row


class Batch:
    def __init__(self, device):
        self.device = device
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, length), 1 on real positions
        self.next_pos: torch.Tensor | None = None  # (rows,) position id of each row's next token
        self.last_tok: torch.Tensor | None = None  # (rows,) the token each row feeds next
        # the hooks hold another pass's strengths (a prefill ran, or rows joined or left)
        self.strength_dirty = True

    def __len__(self) -> int:
        return len(self.rows)

    def strengths(self) -> dict[str, list[float]]:
        """Per-row strengths of every direction some row uses (0 for the rows that do not)."""
        names = {n for s in self.rows for n in s.strengths}
        return {n: [s.strengths.get(n, 0.0) for s in self.rows] for n in names}

    def join(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, toks: torch.Tensor) -> None:
        """Append freshly prefilled rows (their cache, left-padded ``mask``, first sampled tokens)."""
        next_pos = mask.sum(-1)  # each row's prompt length
        self.cache, self.mask = kvcache.merge(self.cache, self.mask, cache, mask)
        fresh = self.next_pos is None or not self.rows
        self.next_pos = next_pos if fresh else torch.cat([self.next_pos, next_pos])
        self.last_tok = toks if fresh else torch.cat([self.last_tok, toks])
        self.rows.extend(rows)
        self.strength_dirty = True

    def advance(self, mask: torch.Tensor, toks: torch.Tensor) -> None:
        """After a decode step: the extended mask, the next positions and the sampled tokens."""
        self.mask = mask
        self.next_pos = self.next_pos + 1
        self.last_tok = toks

    def drop_finished(self, cancel: Callable[[Row], None]) -> None:
        """Remove done rows (``cancel`` ends the cancelled ones first) and their cache rows; rows
        whose lookahead fired leave too (the engine prefills them again)."""
        for s in self.rows:
            if s.cancelled and not s.done:
                cancel(s)
        keep = [i for i, s in enumerate(self.rows) if not s.done and not s.restart]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
        else:
            self.cache, self.mask = kvcache.select(self.cache, self.mask, keep)
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.next_pos = self.next_pos.index_select(0, idx)
            self.last_tok = self.last_tok.index_select(0, idx)
            self.rows = [self.rows[i] for i in keep]
        self.strength_dirty = True

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.next_pos, self.last_tok = [], None, None, None, None
        self.strength_dirty = True
