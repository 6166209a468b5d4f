"""Response models: what the server answers, in the OpenAI shapes (plus ``steering``).

The serving layer builds these instead of dicts; the routes document them in /openapi.json.
Fields are dumped in declaration order, which is the order of the OpenAI reference.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# direction name -> {"strength", "applied"} (+ "when", "fired", "score" for conditional directions)
SteeringApplied = dict[str, dict[str, Any]]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ResponseModel(BaseModel):
    """Base of every response; fields named in ``omit_none`` are left out when None."""

    model_config = ConfigDict(extra="forbid")
    omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        d = handler(self)
        for k in self.omit_none:
            if d.get(k) is None:
                d.pop(k, None)
        return d


# ---- logprobs -----------------------------------------------------------------------------


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob]


class TextLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class Envelope(ResponseModel):
    """What every completion answer and chunk carries, in the OpenAI order; families narrow the types."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None
    steering: SteeringApplied | None = Field(None, description="frankly extension: what was applied")


class Answer(Envelope):
    """A non-streamed answer: usage and steering always present."""

    usage: Usage
    steering: SteeringApplied = Field(default_factory=dict, description="frankly extension: what was applied")


class Chunk(Envelope):
    """A stream chunk: usage and steering only on the chunks that carry them."""

    omit_none = ("usage", "steering")


# ---- chat ---------------------------------------------------------------------------------


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(ResponseModel):
    omit_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


# ---- text completions -----------------------------------------------------------------------


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class CompletionChunk(Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# ---- models, directions, health ---------------------------------------------------------------


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "frankly"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DirectionCard(ResponseModel):
    """A loaded direction: its name and public metadata (fingerprint, method, layers, eval figures)."""

    model_config = ConfigDict(extra="allow")
    name: str
    object: Literal["direction"] = "direction"


class DirectionList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[DirectionCard]


class Health(ResponseModel):
    status: Literal["ok", "unavailable"]
    model: str
    engine: str
    directions: list[str]
    running: int
    waiting: int
    uptime_s: float
