"""Typed engine errors: raised by ``submit`` (the request never ran) or carried by the last
:class:`~server.engine.types.StepOutput` of a request that ended badly.

The HTTP layer maps each class to a status and an OpenAI error code in one table
(``server.serving.base``); ``code`` is the code an error chunk of a stream carries.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base of every error an engine reports; the message is safe to show to the client."""

    code = "engine_error"


class EngineOverloaded(EngineError):
    """The waiting queue is full; the caller should retry after ``retry_after`` seconds."""

    code = "server_overloaded"

    def __init__(self, retry_after: float = 1.0):
        super().__init__("the server is at capacity; retry later")
        self.retry_after = retry_after


class EngineStopped(EngineError):
    """The engine is shutting down: it accepts no new work, and ends what it cannot finish."""

    code = "shutdown"


class RequestTimedOut(EngineError):
    """The request ran (or waited) past its ``timeout_s``."""

    code = "timeout"


class GenerationFailed(EngineError):
    """The model failed while computing this request (prefill, a decode step, or the engine itself)."""

    code = "engine_error"
