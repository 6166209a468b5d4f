"""The torch engine: continuous batching on top of a transformers model, with per-row steering.

One inference thread owns the model. Requests arrive through the scheduler's inbox;
requests waiting together are prefilled together (:mod:`server.engine.prefill`: one
left-padded forward, conditional rows decided there) and then join the running batch
(:mod:`server.engine.batch`) at the next decode step (:mod:`server.engine.decode`).
Finished and cancelled rows leave the batch at the next step. Every row carries its own
sampling parameters, stop strings and steering strengths; the hooks read a per-row strength
tensor set for each pass, and with every strength of a pass at zero no hook runs at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from directions.fileformat import DirectionSet, base_name, edit_sets
from directions.hooks import SteeringHooks
from server.engine.batch import Batch
from server.engine.decode import decode_step
from server.engine.errors import GenerationFailed
from server.engine.prefill import Prefilled, Prefiller
from server.engine.protocol import EngineCapabilities, EngineObserver, EngineStats, NullObserver
from server.engine.rows import Row, RowOutput
from server.engine.scheduler import Scheduler
from server.engine.threaded import ThreadedEngine

log = logging.getLogger("frankly.engine")

CAPABILITIES = EngineCapabilities(
    name="torch",
    supports_conditional=True,
    per_row_strengths=True,
    logprobs=True,
    bit_identical_at_zero=True,
    quantized_weights=False,
)


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    max_queue: int = 64  # waiting requests beyond the running batch
    max_model_len: int = 4096
    num_threads: int | None = None  # torch intra-op threads; None = torch default
    prefill_token_budget: int = 256  # prompt tokens prefilled per step while other rows decode
    prefill_batch: int = 8  # waiting requests prefilled together in one left-padded forward (1 = one by one)


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a generation: the generation config's EOS ids and the tokenizer's."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif e:
        ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class TorchEngine(ThreadedEngine):
    """The reference engine (implements :class:`server.engine.protocol.Engine`).

    Create, ``start()``, then ``generate()`` from asyncio or ``submit()`` from any thread."""

    capabilities = CAPABILITIES

    def __init__(
        self,
        model,
        tokenizer,
        directions: dict[str, DirectionSet],
        config: EngineConfig,
        observer: EngineObserver | None = None,
    ):
        super().__init__(tokenizer, next(model.parameters()).device)
        self.model = model
        self.directions = directions
        self.config = config
        self.observer = observer or NullObserver()
        self.hooks = SteeringHooks(model, edit_sets(directions))  # with the NAME@auto firing-case edits
        self.eos_ids = eos_ids(model, tokenizer)
        self.batch = self.running = Batch(self.device)
        self.output = RowOutput(tokenizer, self.eos_ids, config.max_model_len, self.observer)
        self.prefiller = Prefiller(model, self.hooks, directions, self.observer)
        self.scheduler = Scheduler(
            self.batch,
            self.output,
            self.observer,
            config.max_batch_size,
            config.max_queue,
            config.prefill_token_budget,
            config.prefill_batch,
        )

    @property
    def batched_prefills(self) -> int:
        """Left-padded prefills of more than one request so far."""
        return self.prefiller.batched

    def stats(self) -> EngineStats:
        return EngineStats(self.num_running, self.num_waiting, self.steps, self.batched_prefills)

    # ---- engine thread -----------------------------------------------------------------
    def _serve(self) -> None:
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        with torch.inference_mode():
            super()._serve()

    def _close(self) -> None:
        self.hooks.remove()

    def _step(self) -> None:
        try:
            decode_step(self.model, self.batch, self.hooks, self.output, self.observer)
            self.steps += 1
        except Exception as e:  # one bad step must not take the engine down
            self._end_running(e)
            self._drop_finished()

    def _drop_finished(self) -> None:
        self.batch.drop_finished(lambda s: self.output.finish(s, "cancelled"))

    def _prefill_group(self, group: list[Row]) -> None:
        """Prefill ``group`` together and join the batch; if that fails, each request alone
        (a bad request must not take the engine down)."""
        try:
            p = self.prefiller.run(group)
        except Exception as e:
            self.batch.strength_dirty = True
            if len(group) > 1:
                log.exception("batched prefill of %d requests failed; prefilling them one by one", len(group))
                for row in group:
                    if not row.done and row not in self.batch.rows:
                        self._prefill_group([row])
            else:
                log.exception("prefill failed for %s", group[0].request_id)
                err = GenerationFailed(f"prefill failed: {type(e).__name__}: {e}")
                self.output.finish(group[0], "error", error=err)
            return
        self.batch.strength_dirty = True  # the prefill set its own rows' strengths on the hooks
        self._join(p)

    def _join(self, p: Prefilled) -> None:
        """Append freshly prefilled rows to the running batch; emit their first tokens."""
        self.observer.prefill_batch(len(p.rows))
        for s in p.rows:
            for n in {base_name(n) for n in s.strengths}:
                self.observer.steering_used(n)
        self.batch.join(p.rows, p.cache, p.mask, p.tokens)
        now = time.monotonic()
        for i, (s, tok) in enumerate(zip(p.rows, p.tokens.tolist(), strict=True)):
            s.t_last = now
            self.output.accept(s, tok, p.logits[i])
        self._drop_finished()
