"""Request models (OpenAI shapes, plus frankly's ``steering`` extension), validated as OpenAI does.

Unknown-field policy: unknown keys are ignored (vLLM's policy) so clients that send extra
keys keep working; they are logged once per request.

Type policy: strict, as the OpenAI API is: a boolean is not a number (``max_tokens: true``),
a string is not a number or a boolean (``"temperature": "0.7"``, ``"stream": "yes"``), an
integer field does not take ``3.0``; a number field takes integers. The cross-field rules of
the OpenAI reference are here too (``top_logprobs`` needs ``logprobs: true``,
``stream_options`` needs ``stream: true``, a user, system or developer message needs
``content``). Every refusal is a 400 whose ``param`` names the field. Limits that are the
server's own (the caps in ServerSettings) and checks that need the tokenizer are applied by
the serving layer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

Role = Literal["system", "developer", "user", "assistant"]
ROLES_NEEDING_CONTENT = ("system", "developer", "user")


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class OpenAIBase(BaseModel):
    """Base for every request model: extra keys ignored, strict types, no NaN/inf floats."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, populate_by_name=True, strict=True)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class StreamOptions(OpenAIBase):
    include_usage: bool = False


class ContentPart(OpenAIBase):
    type: str
    text: str | None = None


class ChatMessage(OpenAIBase):
    role: Role = Field(..., description="system, developer, user or assistant (tool messages are not supported)")
    # Declared so an assistant message that made tool calls may omit content, as in the OpenAI API;
    # tool calling itself is not supported (the calls are not shown to the model).
    tool_calls: list[Any] | None = Field(None, description="accepted, not shown to the model")
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, v, info: ValidationInfo):
        role = info.data.get("role")
        if v is None and role in ROLES_NEEDING_CONTENT:
            raise _invalid(f"a {role} message needs 'content'")
        if v is None and role == "assistant" and not info.data.get("tool_calls"):
            raise _invalid("an assistant message needs 'content' unless it has 'tool_calls'")
        return v


SteeringField = Field(
    None,
    description=(
        "frankly extension: direction name -> strength (number), or -> {strength, when: 'always'|'auto'}; "
        "also accepted as the same object encoded as a JSON string. Wins over model-id suffixes."
    ),
)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(OpenAIBase):
    frequency_penalty: Penalty | None = Field(None, description="accepted, not applied")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="accepted, not applied"
    )
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    presence_penalty: Penalty | None = Field(None, description="accepted, not applied")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- frankly extension ---------------------------------------------------
    steering: dict[str, Any] | str | None = SteeringField

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise _invalid("stream_options is only allowed when stream is true")
        return v


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions (fields in the order of the OpenAI reference)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str = Field(..., min_length=1, max_length=512)
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, description="needs logprobs: true")

    @field_validator("messages")
    @classmethod
    def _needs_a_turn(cls, v: list[ChatMessage]):
        if all(m.role not in ("user", "assistant") for m in v):
            raise _invalid("messages must contain at least one user or assistant message")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("logprobs") is not True:
            raise _invalid("top_logprobs is only allowed when logprobs is true")
        return v


class CompletionRequest(SamplingFields):
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
    format: Literal["weights", "lora"] = Field(
        "weights",
        description="weights: an edited copy of the model (safetensors, plus GGUF for a GGUF source); "
        "lora: one rank-1 LoRA adapter per named direction (PEFT, plus llama.cpp GGUF for a GGUF source), "
        "scalable per request, and one with each given strength folded in (<name>-<strength>)",
    )
