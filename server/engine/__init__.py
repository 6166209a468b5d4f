"""The inference engine: one thread owns the model; asyncio talks to it through queues."""

from server.engine.engine import Engine, EngineConfig
from server.engine.types import (
    DirectionRequest,
    EngineOverloaded,
    GenerationRequest,
    SamplingParams,
    StepOutput,
)

__all__ = [
    "DirectionRequest",
    "Engine",
    "EngineConfig",
    "EngineOverloaded",
    "GenerationRequest",
    "SamplingParams",
    "StepOutput",
]
