"""A scripted engine for the HTTP layer's tests: the engine protocol, answering from a script."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch

from directions.fileformat import DirectionSet
from server.engine.errors import EngineStopped, GenerationFailed, RequestTimedOut
from server.engine.protocol import EngineCapabilities, EngineStats
from server.engine.types import GenerationRequest, SteeringReport, StepOutput

BASE = "qwen-demo"
MSGS = [{"role": "user", "content": "hi"}]
Script = Callable[[GenerationRequest], list[StepOutput]]
ERRORS = {"engine_error": GenerationFailed, "timeout": RequestTimedOut, "shutdown": EngineStopped}


def reports(req: GenerationRequest) -> dict[str, SteeringReport]:
    return {n: SteeringReport(strength=d.strength, when=d.when, applied=d.strength) for n, d in req.steering.items()}


def hello_script(req: GenerationRequest) -> list[StepOutput]:
    """Two text events, then a finish event that carries no text (like an EOS step)."""
    rid, n = req.request_id, len(req.prompt_ids)
    return [
        StepOutput(rid, text="Hello", token_ids=[1], prompt_tokens=n, completion_tokens=1, steering=reports(req)),
        StepOutput(rid, text=" world", token_ids=[2], prompt_tokens=n, completion_tokens=2),
        StepOutput(rid, text="", finish_reason="stop", prompt_tokens=n, completion_tokens=2),
    ]


class FakeEngine:
    """The engine protocol (:class:`server.engine.protocol.Engine`), answering from a script."""

    capabilities = EngineCapabilities(name="fake", supports_conditional=True, per_row_strengths=True, logprobs=True)

    def __init__(self, script: Script = hello_script, delay: float = 0.0):
        self.script = script
        self.delay = delay
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.raise_on_submit: BaseException | None = None
        self._alive = False
        self._running = 0

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return 0

    @property
    def alive(self) -> bool:
        return self._alive

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=0)

    def start(self) -> None:
        self._alive = True

    def submit(self, req: GenerationRequest, emit) -> None:
        raise NotImplementedError("the HTTP layer only uses generate()")

    def shutdown(self, timeout: float = 30.0) -> None:
        self._alive = False

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def generate(self, req: GenerationRequest):
        # like the real engine, submission (and its refusal) happens on the first __anext__
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        self.requests.append(req)
        self._running += 1
        finished = False
        try:
            for out in self.script(req):
                if self.delay:
                    await asyncio.sleep(self.delay)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._running -= 1
            if not finished:
                self.cancel(req.request_id)


def direction(name: str, conditional: bool = False) -> DirectionSet:
    g = torch.Generator().manual_seed(len(name))
    ds = DirectionSet(name, torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1), torch.ones(2))
    if conditional:
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.ones(8) / 8**0.5, 1, 0.5
    return ds
