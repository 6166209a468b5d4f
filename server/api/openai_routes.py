"""POST /v1/chat/completions and /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.deps import require_api_key, state
from server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions, streamed or not, with per-request ``steering``."""
    serving = state(request).serving
    prepared = serving.prepare_chat(body)
    return await serving.respond(prepared, request, "chat")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions (one prompt per request), with per-request ``steering``."""
    serving = state(request).serving
    prepared = serving.prepare_completion(body)
    return await serving.respond(prepared, request, "completion")
