"""Plain dataclasses every engine speaks: the request going in, the events coming out.

The engine never imports HTTP models: the serving layer converts requests into these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from directions.strengths import DirectionRequest
from server.engine.errors import EngineError

# "cancelled": the client went away (or the server stopped); "error": see StepOutput.error
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class SamplingParams:
    """Per-row sampling: every row of a batch carries its own."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerationRequest:
    """One sequence to generate: prompt ids, its sampling, and its steering (direction name -> request)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    steering: dict[str, DirectionRequest] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (token, id, logprob), best first


@dataclass
class SteeringReport:
    """What was applied to one direction of one request."""

    strength: float  # requested
    when: str
    applied: float  # what actually ran (0 when a condition did not fire)
    fired: bool | None = None  # None for unconditional
    score: float | None = None

    def to_dict(self) -> dict:
        d = {"strength": self.strength, "applied": self.applied}
        if self.when != "always":
            d.update(when=self.when, fired=self.fired, score=self.score)
        return d


@dataclass
class StepOutput:
    """One event of a request's stream: new text, and at the end a finish reason.

    The first event carries ``steering`` (what was applied); the last has ``finish_reason``
    set and, when the request ended badly, ``error``.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering: dict[str, SteeringReport] | None = None  # sent with the first event
    error: EngineError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def failed(self) -> bool:
        """The request ended without a complete answer (an error, or cancelled)."""
        return self.error is not None or self.finish_reason in ("error", "cancelled")
