"""The application factory: assembles settings, engine, serving and routers (no module globals)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from directions.fileformat import DirectionSet
from directions.models import LoadedModel
from server import __version__
from server.api import admin_routes, models_routes, openai_routes, openapi, system_routes
from server.api.body_limit import BodyLimit
from server.deps import AppState
from server.engine.protocol import Engine
from server.engine.torch_engine import EngineConfig, TorchEngine, eos_ids
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.serving import ChatServing, CompletionServing
from server.settings import ModelSettings, ServerSettings
from server.steering import SteeringPolicy

log = logging.getLogger("frankly.app")


def max_model_len_for(model, requested: int | None) -> int:
    native = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    # Default cap 8192: prefill is one uninterruptible pass, and a 32k prompt on a CPU
    # would hold the engine for minutes. --max-model-len raises it.
    return min(requested or min(native, 8192), native)


def engine_limits(settings: ServerSettings, max_model_len: int, num_threads: int | None) -> dict:
    """The limits every engine's config takes from the settings."""
    return {
        "max_batch_size": settings.max_batch_size,
        "max_queue": settings.max_queue,
        "max_model_len": max_model_len,
        "num_threads": num_threads,
    }


def torch_engine(
    loaded: LoadedModel,
    directions: dict[str, DirectionSet],
    settings: ServerSettings,
    max_model_len: int,
    num_threads: int | None,
    metrics: Metrics,
) -> TorchEngine:
    """The torch engine for ``loaded``, reporting to ``metrics``."""
    config = EngineConfig(**engine_limits(settings, max_model_len, num_threads))
    return TorchEngine(loaded.model, loaded.tokenizer, directions, config, observer=metrics)


def llamacpp_engine(
    loaded: LoadedModel,
    directions: dict[str, DirectionSet],
    settings: ServerSettings,
    max_model_len: int,
    num_threads: int | None,
    metrics: Metrics,
    num_threads_batch: int | None = None,
):
    """The llama.cpp engine on ``loaded.gguf``, with the directions' adapters (exported once, cached)."""
    from pathlib import Path

    from directions.fileformat import edit_sets
    from directions.files import cache_root
    from server.engine.llamacpp_engine import LlamaCppConfig, LlamaCppEngine, ensure_adapters

    # one adapter per direction, and per firing-case edit (NAME@auto) for conditional requests
    base, adapters = ensure_adapters(Path(loaded.gguf), edit_sets(directions), cache_root())
    config = LlamaCppConfig(**engine_limits(settings, max_model_len, num_threads), num_threads_batch=num_threads_batch)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    return LlamaCppEngine(base, loaded.tokenizer, adapters, eos, config, observer=metrics, directions=directions)


def _bake_jobs(loaded: LoadedModel, directions: dict[str, DirectionSet], settings: ServerSettings):
    try:
        from directions.bake_jobs import BakeJobs
    except ImportError:  # bake module not available
        return None
    return BakeJobs(loaded, directions, settings.bake_dir)


def _state(loaded, directions, settings, model_settings, base_id, engine, metrics, max_model_len) -> AppState:
    policy = SteeringPolicy(
        base_id,
        directions,
        settings.max_abs_strength,
        settings.max_directions_per_request,
        capabilities=engine.capabilities,
    )
    serving = (engine, loaded.tokenizer, policy, settings, metrics, max_model_len)
    return AppState(
        engine=engine,
        chat=ChatServing(*serving),
        completions=CompletionServing(*serving),
        policy=policy,
        settings=settings,
        model_settings=model_settings,
        metrics=metrics,
        directions=directions,
        loaded=loaded,
        bake_jobs=_bake_jobs(loaded, directions, settings),
        api_keys=settings.all_api_keys(),
        started=time.time(),
    )


def _lifespan(engine: Engine, base_id: str, directions: dict, grace_s: float):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        log.info(
            "serving %s on the %s engine with directions [%s]",
            base_id,
            engine.capabilities.name,
            ", ".join(directions) or "none",
        )
        yield
        log.info("shutting down: finishing in-flight requests (up to %.0fs)", grace_s)
        engine.shutdown(timeout=grace_s)

    return lifespan


def build_app(
    loaded: LoadedModel,
    directions: dict[str, DirectionSet],
    settings: ServerSettings,
    model_settings: ModelSettings,
    base_id: str,
    engine: Engine | None = None,
) -> FastAPI:
    """Build the FastAPI app around a loaded model. The engine (default: the torch engine) starts in the lifespan."""
    metrics = Metrics()
    mml = max_model_len_for(loaded.model, model_settings.max_model_len)
    if engine is None and model_settings.engine == "vllm":
        from server.vllm_setup import vllm_engine

        engine = vllm_engine(loaded, directions, settings, model_settings, mml, metrics)
    if engine is None:
        if model_settings.engine == "llamacpp":
            engine = llamacpp_engine(
                loaded, directions, settings, mml, model_settings.num_threads, metrics, model_settings.num_threads_batch
            )
        else:
            engine = torch_engine(loaded, directions, settings, mml, model_settings.num_threads, metrics)
    metrics.bind_engine(engine)
    app = FastAPI(
        title="frankly",
        version=__version__,
        lifespan=_lifespan(engine, base_id, directions, settings.shutdown_grace_s),
        description="OpenAI-compatible server with per-request direction ablation.",
    )
    app.state.frankly = _state(loaded, directions, settings, model_settings, base_id, engine, metrics, mml)
    openapi.install(app)
    install_error_handlers(app)
    for r in (openai_routes.router, models_routes.router, admin_routes.router, system_routes.router):
        app.include_router(r)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Steering", "X-Request-Id"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
