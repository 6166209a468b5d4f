"""Plain dataclasses the engine speaks. The engine never imports HTTP models."""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later."""

    def __init__(self, retry_after: float = 1.0):
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


class EngineStopped(RuntimeError):
    """The engine is shutting down and accepts no new work."""


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
class DirectionRequest:
    """How much of one direction to remove, and whether only when its condition fires."""

    strength: float
    when: str = "always"  # "always" | "auto" (conditional ablation)


@dataclass
class GenerationRequest:
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
    top: list[tuple[str, int, float]] = field(default_factory=list)


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
    """One event of a request's stream: new text, and at the end a finish reason."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "timeout"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering: dict[str, SteeringReport] | None = None  # sent with the first event
    error: str | None = None
    error_code: str | None = None  # "timeout" | "engine_error" | "shutdown" when error is set

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
