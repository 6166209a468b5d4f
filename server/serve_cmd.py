"""``frankly serve``: load the model and directions, then run the HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from typing import Literal, get_args, get_origin

from pydantic_settings import BaseSettings

from directions.bake import BakeError
from directions.fileformat import DirectionFileError
from directions.llamacpp import LlamaCppError
from directions.models import ModelLoadError
from directions.quant import QuantizationError
from directions.writers import UnsupportedModelError
from server.engine.vllm_supervisor import VllmStartError
from server.packing import PackingUnavailable
from server.settings import CONFIG_ENV, ModelSettings, ServerSettings

log = logging.getLogger("frankly.serve")

# (flag, settings field, extra argparse kwargs). Help texts, types and defaults come from the
# settings models (one description per setting); argparse passes only the flags given, so
# CLI > env > config file holds.
MODEL_FLAGS = [
    ("--model", "model", {}),
    ("--engine", "engine", {"choices": ["torch", "llamacpp", "vllm"]}),
    ("--served-model-name", "served_model_name", {}),
    ("--device", "device", {}),
    ("--dtype", "dtype", {}),
    ("--direction", "directions", {"metavar": "NAME=PATH"}),
    ("--no-default-directions", "no_default_directions", {}),
    ("--allow-fingerprint-mismatch", "allow_fingerprint_mismatch", {}),
    ("--max-model-len", "max_model_len", {}),
    ("--num-threads", "num_threads", {}),
    ("--num-threads-batch", "num_threads_batch", {}),
    ("--weights", "weights", {}),
    ("--int8-kernel", "int8_kernel", {"choices": ["auto", "frankly", "aten"]}),
    ("--kv-dtype", "kv_dtype", {"choices": ["auto", "float32", "bfloat16"]}),
    ("--packed-weights", "packed_weights", {}),
    ("--vllm-path", "vllm_path", {}),
    ("--vllm-strengths", "vllm_strengths", {"metavar": "S,S"}),
    ("--vllm-combination", "vllm_combinations", {"metavar": "NAME=S,NAME=S"}),
    ("--vllm-args", "vllm_args", {"metavar": "ARGS"}),
    ("--vllm-ready-timeout", "vllm_ready_timeout_s", {"metavar": "SECONDS"}),
]
SERVER_FLAGS = [
    ("--host", "host", {}),
    ("--port", "port", {}),
    ("--api-key", "api_keys", {"metavar": "KEY"}),
    ("--api-key-file", "api_key_file", {}),
    ("--admin-key", "admin_key", {}),
    ("--cors-origin", "cors_origins", {"metavar": "ORIGIN"}),
    ("--bake-dir", "bake_dir", {}),
    ("--max-batch-size", "max_batch_size", {}),
    ("--max-queue", "max_queue", {}),
    ("--max-body-bytes", "max_body_bytes", {}),
    ("--default-max-tokens", "default_max_tokens", {}),
    ("--max-tokens-cap", "max_tokens_cap", {}),
    ("--max-n", "max_n", {}),
    ("--max-abs-strength", "max_abs_strength", {}),
    ("--request-timeout", "request_timeout_s", {"metavar": "SECONDS"}),
    ("--shutdown-grace", "shutdown_grace_s", {"metavar": "SECONDS"}),
]


def flag_kwargs(settings_cls: type[BaseSettings], field: str, flag: str, extra: dict) -> dict:
    """argparse kwargs for one settings field: its description (and default) as the help, its type."""
    info = settings_cls.model_fields[field]
    default = None if info.default_factory is not None else info.default
    shown = f" (default: {default})" if default not in (None, False, "") else ""
    kw: dict = {"help": ((info.description or "") + shown).replace("%", "%%")}  # argparse formats help with %
    types = {info.annotation, *get_args(info.annotation)} - {type(None)}
    if bool in types:
        return {**kw, "action": "store_true", "default": None, **extra}
    if any(get_origin(t) is list for t in types):
        kw["action"] = "append"
    elif int in types or float in types:
        kw["type"] = int if int in types else float
    elif get_origin(info.annotation) is Literal:
        kw["choices"] = list(get_args(info.annotation))
    return {"metavar": flag.lstrip("-").upper().replace("-", "_"), **kw, **extra}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"TOML settings file (also env {CONFIG_ENV}); flags > env > file")
    for title, cls, flags, prefix in (
        ("model", ModelSettings, MODEL_FLAGS, "m_"),
        ("server", ServerSettings, SERVER_FLAGS, "s_"),
    ):
        g = p.add_argument_group(title)
        for flag, dest, extra in flags:
            g.add_argument(flag, dest=prefix + dest, **flag_kwargs(cls, dest, flag, extra))


def settings_from_args(args) -> tuple[ModelSettings, ServerSettings]:
    if getattr(args, "config", None):
        if not os.path.isfile(args.config):
            raise SystemExit(f"frankly: config file not found: {args.config}")
        os.environ[CONFIG_ENV] = args.config
    m = {k[2:]: v for k, v in vars(args).items() if k.startswith("m_") and v is not None}
    s = {k[2:]: v for k, v in vars(args).items() if k.startswith("s_") and v is not None}
    return ModelSettings(**m), ServerSettings(**s)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    import uvicorn

    from server.app import build_app
    from server.startup import load_served, served_id

    ms, ss = settings_from_args(args)
    try:
        loaded, directions = load_served(ms)  # --engine llamacpp: tokenizer and config only
        app = build_app(loaded, directions, ss, ms, served_id(ms))
        if ms.engine == "vllm":  # vLLM starts (a minute or more) before frankly listens; its errors end here
            app.state.frankly.engine.start()
    except PackingUnavailable as e:
        print(f"frankly: cannot start: --packed-weights: {e}", file=sys.stderr)
        return 2
    except (
        ModelLoadError,
        DirectionFileError,
        UnsupportedModelError,
        LlamaCppError,
        BakeError,
        QuantizationError,
        VllmStartError,
        OSError,
    ) as e:
        print(f"frankly: cannot start: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(ss.host) and not ss.all_api_keys():
        log.warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or FRANKLY_API_KEYS)",
            ss.host,
        )
    config = uvicorn.Config(
        app,
        host=ss.host,
        port=ss.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=int(ss.shutdown_grace_s) + 5,
    )
    _draining_server(config, app.state.frankly.engine, ss.shutdown_grace_s).run()
    return 0


def _draining_server(config, engine, grace_s: float):
    """uvicorn's server, draining the engine on SIGTERM before connections are closed.

    uvicorn waits for open connections and only then runs the lifespan shutdown, so a stream
    outlasting the grace period would be cut without an ending. Here the engine stops accepting
    first (new requests get 503), in-flight requests get ``grace_s`` to finish, and the rest end
    with an error event, so every stream still closes with an error chunk and ``[DONE]``.
    """
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for srv in self.servers:  # stop accepting connections before draining
                srv.close()
            log.info("draining: in-flight requests get up to %.0fs", grace_s)
            await asyncio.to_thread(engine.shutdown, grace_s)
            await super().shutdown(sockets)

        def run(self, sockets=None):
            # uvicorn re-raises the signal it caught once it has shut down; after a graceful
            # stop on SIGTERM the process exits 0 instead of dying of that signal.
            previous = signal.signal(signal.SIGTERM, lambda *_: None)
            try:
                super().run(sockets)
            finally:
                signal.signal(signal.SIGTERM, previous)

    return DrainingServer(config)
