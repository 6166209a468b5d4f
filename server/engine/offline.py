"""Running generations to completion outside the server (``frankly eval``, ``frankly extract``).

:func:`engine_generate` is the :class:`directions.generation.Generate` the library's
measurements take: each call runs its generations through a fresh :class:`TorchEngine`
(continuous batching, the server's hooks and conditions), so what is measured is what the
server serves, and shuts it down before returning (the engine leaves its hooks installed
while idle, and forward-pass measurements run on the same model between calls).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from directions.fileformat import DirectionSet
from directions.generation import Generate, Generation, GenResult
from server.engine.protocol import Engine
from server.engine.torch_engine import EngineConfig, TorchEngine
from server.engine.types import GenerationRequest, SamplingParams, StepOutput


class _Collector:
    """Gathers the events of one generation; ``done`` is released when it finishes."""

    def __init__(self, done: threading.Semaphore, bar, errors: list[str]):
        self.text: list[str] = []
        self.ids: list[int] = []
        self.fired: dict[str, bool | None] = {}
        self.result: GenResult | None = None
        self._done, self._bar, self._errors = done, bar, errors

    def __call__(self, out: StepOutput) -> None:
        self.text.append(out.text)
        self.ids.extend(out.token_ids)
        if out.steering:
            self.fired.update({n: r.fired for n, r in out.steering.items()})
        if out.finished:
            if out.error is not None:
                self._errors.append(str(out.error))
            self.result = GenResult("".join(self.text), list(self.ids), dict(self.fired))
            self._bar.update(1)
            self._done.release()


def run_generations(
    engine: Engine, generations: Sequence[Generation], max_waiting: int, desc: str | None = None
) -> list[GenResult]:
    """Greedy generations through a started ``engine``, at most ``max_waiting`` queued at a time.

    Returns texts, token ids and, for ``when="auto"`` directions, whether the engine's
    condition fired for that row. Raises RuntimeError if any generation failed."""
    done = threading.Semaphore(0)
    errors: list[str] = []
    bar = tqdm(total=len(generations), desc=desc, disable=desc is None, leave=False)
    collectors = [_Collector(done, bar, errors) for _ in generations]
    pending = list(range(len(generations)))
    inflight = 0
    tag = f"{time.monotonic_ns()}"
    while pending or inflight:
        while pending and engine.num_waiting < max_waiting:
            i = pending.pop(0)
            g = generations[i]
            sp = SamplingParams(max_tokens=g.max_tokens, temperature=0.0)
            engine.submit(GenerationRequest(f"{tag}-{i}", list(g.prompt_ids), sp, dict(g.steering)), collectors[i])
            inflight += 1
        done.acquire()
        inflight -= 1
    bar.close()
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return [c.result for c in collectors]  # type: ignore[misc]


def engine_generate(model, tokenizer, batch_size: int = 16) -> Generate:
    """A :class:`~directions.generation.Generate` backed by a fresh torch engine per call."""

    def generate(
        directions: dict[str, DirectionSet], generations: Sequence[Generation], desc: str | None = None
    ) -> list[GenResult]:
        cfg = EngineConfig(max_batch_size=batch_size, max_queue=4 * batch_size)
        engine = TorchEngine(model, tokenizer, directions, cfg)
        engine.start()
        try:
            return run_generations(engine, generations, cfg.max_queue // 2, desc=desc)
        finally:
            engine.shutdown()

    return generate
