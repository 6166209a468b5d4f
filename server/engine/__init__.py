"""Inference engines behind one protocol (:mod:`server.engine.protocol`); the torch engine is the reference.

One thread owns the model; asyncio talks to it through queues.
"""

from directions.strengths import DirectionRequest
from server.engine.errors import (
    EngineError,
    EngineOverloaded,
    EngineStopped,
    GenerationFailed,
    RequestTimedOut,
)
from server.engine.protocol import Engine, EngineCapabilities, EngineObserver, EngineStats
from server.engine.torch_engine import EngineConfig, TorchEngine
from server.engine.types import GenerationRequest, SamplingParams, SteeringReport, StepOutput, TokenLogprob

__all__ = [
    "DirectionRequest",
    "Engine",
    "EngineCapabilities",
    "EngineConfig",
    "EngineError",
    "EngineObserver",
    "EngineOverloaded",
    "EngineStats",
    "EngineStopped",
    "GenerationFailed",
    "GenerationRequest",
    "RequestTimedOut",
    "SamplingParams",
    "SteeringReport",
    "StepOutput",
    "TokenLogprob",
    "TorchEngine",
]
