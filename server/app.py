"""The application factory: assembles settings, engine, serving and routers (no module globals)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.api import admin_routes, models_routes, openai_routes, system_routes
from server.deps import AppState
from server.engine import Engine, EngineConfig
from server.errors import PayloadTooLarge, error_response, install_error_handlers
from server.metrics import Metrics
from server.serving import OpenAIServing
from server.settings import ModelSettings, ServerSettings
from server.steering import SteeringPolicy

log = logging.getLogger("frankly.app")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (checks the header and the stream)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = PayloadTooLarge(f"request body exceeds {self.limit} bytes")
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await error_response(err)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await error_response(err)(scope, receive, send)


class _TooLarge(Exception):
    pass


def max_model_len_for(model, requested: int | None) -> int:
    native = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    return min(requested or min(native, 32768), native)


def build_app(loaded, directions: dict, settings: ServerSettings, model_settings: ModelSettings,
              base_id: str, engine: Engine | None = None) -> FastAPI:
    """Build the FastAPI app around a loaded model. The engine starts in the lifespan."""
    metrics = Metrics()
    mml = max_model_len_for(loaded.model, model_settings.max_model_len)
    if engine is None:
        engine = Engine(
            loaded.model, loaded.tokenizer, directions,
            EngineConfig(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                         max_model_len=mml, num_threads=model_settings.num_threads),
            metrics=metrics,
        )
    metrics.bind_engine(engine)
    policy = SteeringPolicy(base_id, directions, settings.max_abs_strength, settings.max_directions_per_request)
    serving = OpenAIServing(engine, loaded.tokenizer, policy, settings, metrics, mml)
    bake_jobs = None
    try:
        from directions.bake import BakeJobs

        bake_jobs = BakeJobs(loaded, directions, settings.bake_dir)
    except ImportError:  # bake module not available
        pass
    st = AppState(engine=engine, serving=serving, policy=policy, settings=settings, model_settings=model_settings,
                  metrics=metrics, directions=directions, loaded=loaded, bake_jobs=bake_jobs,
                  api_keys=settings.all_api_keys(), started=time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        log.info("serving %s with directions [%s]", base_id, ", ".join(directions) or "none")
        yield
        log.info("shutting down: finishing in-flight requests (up to %.0fs)", settings.shutdown_grace_s)
        engine.shutdown(timeout=settings.shutdown_grace_s)

    app = FastAPI(title="frankly", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server with per-request direction ablation.")
    app.state.frankly = st
    install_error_handlers(app)
    for r in (openai_routes.router, models_routes.router, admin_routes.router, system_routes.router):
        app.include_router(r)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["X-Steering", "X-Request-Id"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
