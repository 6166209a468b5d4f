"""The engine protocol: everything the HTTP layer and the tools need from an inference engine.

frankly's server talks to an engine only through :class:`Engine`. The torch engine
(:class:`server.engine.torch_engine.TorchEngine`) is the reference; a llama.cpp or vLLM
engine implements the same members and says through :class:`EngineCapabilities` what it
cannot do, and the serving layer refuses such requests with a 400 naming the engine.

Threading contract: ``submit``, ``cancel``, ``shutdown`` and the properties may be called
from any thread; ``emit`` callbacks run on the engine's own thread and must not block.
``generate`` is the asyncio form of ``submit``; :class:`AsyncBridge` implements it once
from ``submit`` and ``cancel``, so an engine written around a thread only writes those.

Lifecycle: construct, ``start()``, then submit; ``shutdown(timeout)`` stops accepting
(``submit`` raises :class:`~server.engine.errors.EngineStopped`), lets running and waiting
requests finish for up to ``timeout`` seconds, then ends the rest with an error event.

Events: every request gets a stream of :class:`~server.engine.types.StepOutput`; the first
carries the steering report, the last has ``finish_reason`` set ("stop", "length",
"cancelled" or "error" with ``error`` an :class:`~server.engine.errors.EngineError`).
Every request ends with exactly one finished event, whatever happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from server.engine.types import GenerationRequest, StepOutput

Emit = Callable[[StepOutput], None]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do; the serving layer checks a request against it before submitting."""

    name: str  # shown in errors and /health: "torch", "llama.cpp", "vllm"
    supports_conditional: bool = False  # when="auto": directions applied only when their condition fires
    per_row_strengths: bool = False  # requests with different strengths share a batch (else: serialised)
    logprobs: bool = False  # logprobs / top_logprobs in the answer
    bit_identical_at_zero: bool = False  # strength 0 gives exactly the plain model's logits
    quantized_weights: bool = False  # runs on quantized weights (figures differ from fp32 transformers)
    # None: any strengths. Else the only steerings it runs, each the sorted (name, strength) pairs of a
    # request's nonzero strengths (all-zero always runs): the vLLM engine's one adapter per exported strength
    steering_combinations: tuple[tuple[tuple[str, float], ...], ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for /health and the Prometheus gauges."""

    running: int  # rows in the running batch
    waiting: int  # requests queued for a batch slot
    decode_steps: int = 0  # decode forwards since start
    batched_prefills: int = 0  # prefills of more than one request in one forward


class EngineObserver:
    """Callbacks an engine makes from its thread as requests progress (the Prometheus metrics).

    Every method is a no-op here: an observer overrides what it records, and an engine may
    leave out the calls it cannot measure. Each must return quickly."""

    def queue_time(self, seconds: float) -> None:
        """Arrival to the start of prefill."""

    def first_token(self, seconds: float) -> None:
        """Arrival to the first token."""

    def inter_token(self, seconds: float) -> None:
        """Between two tokens of one request."""

    def decode_batch(self, rows: int) -> None:
        """Rows in one decode step."""

    def prefill_batch(self, requests: int) -> None:
        """Requests prefilled together in one forward."""

    def steering_used(self, name: str) -> None:
        """A request ran with direction ``name`` applied."""

    def condition(self, name: str, fired: bool) -> None:
        """A conditional direction was decided."""

    def finished(self, prompt_tokens: int, completion_tokens: int, reason: str, seconds: float) -> None:
        """A request ended (any reason), ``seconds`` after it arrived."""


class NullObserver(EngineObserver):
    """Records nothing (engines used outside the server: eval, extract, tests)."""


@runtime_checkable
class Engine(Protocol):
    """An inference engine as the server sees it (see the module docstring for the contract)."""

    @property
    def capabilities(self) -> EngineCapabilities: ...

    @property
    def alive(self) -> bool:
        """True while the engine can run requests (its thread is up)."""
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def start(self) -> None: ...

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        """Queue ``req``; ``emit`` gets each of its events. Raises EngineOverloaded or EngineStopped."""
        ...

    def generate(self, req: GenerationRequest) -> AsyncIterator[StepOutput]:
        """The events of ``req`` as an async iterator. Submission happens on the first ``__anext__``
        (so refusals surface there); closing the iterator before the end cancels the request."""
        ...

    def cancel(self, request_id: str) -> None:
        """End the request (queued: at once; running: at the next step) with finish_reason "cancelled"."""
        ...

    def shutdown(self, timeout: float = 30.0) -> None: ...

    def stats(self) -> EngineStats: ...


class AsyncBridge:
    """``generate`` for engines that implement ``submit`` and ``cancel`` around a thread: events
    cross into the event loop with ``call_soon_threadsafe`` (one queue per request)."""

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        raise NotImplementedError

    def cancel(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, req: GenerationRequest) -> AsyncIterator[StepOutput]:
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
