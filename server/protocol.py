"""Request and response models (OpenAI shapes, plus frankly's ``steering`` extension).

Unknown-field policy: unknown keys are ignored (vLLM's policy) so clients
that send extra keys keep working; they are logged once per request.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIBase(BaseModel):
    """Base for every request model: extra keys ignored, no NaN/inf floats."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(OpenAIBase):
    include_usage: bool = False


class ContentPart(OpenAIBase):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBase):
    role: str = Field(..., max_length=32)
    content: str | list[ContentPart] | None = None
    name: str | None = None


SteeringField = Field(
    None,
    description=(
        "frankly extension: direction name -> strength (number), or -> {strength, when: 'always'|'auto'}; "
        "also accepted as the same object encoded as a JSON string. Wins over model-id suffixes."
    ),
)


class _SamplingFields(OpenAIBase):
    frequency_penalty: float | None = Field(None, description="accepted, not applied")
    logit_bias: dict[str, float] | None = Field(None, description="accepted, not applied")
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, description="accepted, not applied")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- frankly extension ---------------------------------------------------
    steering: dict[str, Any] | str | None = SteeringField


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions (fields in the order of the OpenAI reference)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str = Field(..., min_length=1, max_length=512)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    model: str = Field(..., min_length=1, max_length=512)
    prompt: str | list[str] | list[int] = Field(...)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None


class BakeRequest(OpenAIBase):
    name: str = Field(..., description="output directory name under the bake directory")
    steering: dict[str, Any] | str = Field(..., description="direction name -> strength")
    overwrite: bool = Field(False, description="replace a finished bake of the same name")


# ---- responses (plain dicts are built by the serving layer; helpers here) ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length"]
