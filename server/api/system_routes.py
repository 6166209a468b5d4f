"""GET /health, /metrics and the chat page at /."""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from server.deps import state
from server.responses import Health

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
async def health(request: Request):
    """200 when the engine can run requests, 503 otherwise."""
    st = state(request)
    ok = st.engine.alive
    stats = st.engine.stats()
    body = Health(
        status="ok" if ok else "unavailable",
        model=st.policy.base_id,
        engine=st.engine.capabilities.name,
        directions=list(st.directions),
        running=stats.running,
        waiting=stats.waiting,
        uptime_s=round(time.time() - st.started, 1),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    """Prometheus text format."""
    return Response(state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index():
    page = resources.files("server").joinpath("static/index.html")
    return HTMLResponse(page.read_text(encoding="utf-8") if page.is_file() else "<h1>frankly</h1>")
