"""POST /v1/chat/completions and /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.deps import require_api_key, state
from server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions, streamed or not, with per-request ``steering``."""
    serving = state(request).serving
    # templating and tokenising a large body takes real CPU time: keep it off the event loop
    prepared = await run_in_threadpool(serving.prepare_chat, body)
    return await serving.respond(prepared, request, "chat")


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions (one prompt per request), with per-request ``steering``."""
    serving = state(request).serving
    prepared = await run_in_threadpool(serving.prepare_completion, body)
    return await serving.respond(prepared, request, "completion")
