"""POST /v1/chat/completions and /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.deps import require_api_key, state
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses import ChatCompletion, Completion

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/chat/completions", responses={200: {"model": ChatCompletion}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """OpenAI chat completions, streamed or not, with per-request ``steering``."""
    serving = state(request).chat
    # templating and tokenising a large body takes real CPU time: keep it off the event loop
    prepared = await run_in_threadpool(serving.prepare, body)
    return await serving.respond(prepared, request)


@router.post("/completions", responses={200: {"model": Completion}})
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions (one prompt per request), with per-request ``steering``."""
    serving = state(request).completions
    prepared = await run_in_threadpool(serving.prepare, body)
    return await serving.respond(prepared, request)
