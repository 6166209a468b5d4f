"""``frankly serve``: load the model and directions, then run the HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys

from directions.fileformat import DirectionFileError
from directions.writers import UnsupportedModelError
from server.modelio import ModelLoadError, load_model
from server.settings import CONFIG_ENV, ModelSettings, ServerSettings

log = logging.getLogger("frankly.serve")

# (flag, settings field, kwargs) -- defaults live in the settings classes, so
# that CLI > env > config file holds: argparse only passes flags given.
MODEL_FLAGS = [
    ("--model", "model", {"help": "hub id, model directory, .gguf file, or 'demo' (default: demo)"}),
    ("--served-model-name", "served_model_name", {"help": "model id clients use (default: qwen-demo for demo)"}),
    ("--device", "device", {"help": "auto | cpu | cuda | cuda:N | mps"}),
    ("--dtype", "dtype", {"help": "auto | float32 | bfloat16 | float16"}),
    ("--direction", "directions", {"action": "append", "help": "NAME=PATH direction file (repeatable)"}),
    (
        "--no-default-directions",
        "no_default_directions",
        {"action": "store_true", "default": None, "help": "skip the directions shipped for the demo model"},
    ),
    (
        "--allow-fingerprint-mismatch",
        "allow_fingerprint_mismatch",
        {"action": "store_true", "default": None, "help": "load directions whose config hash differs"},
    ),
    ("--max-model-len", "max_model_len", {"type": int, "help": "context limit in tokens"}),
    ("--num-threads", "num_threads", {"type": int, "help": "torch CPU threads"}),
    (
        "--packed-weights",
        "packed_weights",
        {"action": "store_true", "default": None, "help": "CPU fp32: prepack linear weights (faster batched decode)"},
    ),
]
SERVER_FLAGS = [
    ("--host", "host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port (default 8000)"}),
    (
        "--api-key",
        "api_keys",
        {"action": "append", "help": "accepted bearer key (repeatable; env FRANKLY_API_KEYS=a,b)"},
    ),
    ("--api-key-file", "api_key_file", {"help": "file with one key per line"}),
    ("--admin-key", "admin_key", {"help": "key for /v1/bake; admin routes are off without it"}),
    ("--cors-origin", "cors_origins", {"action": "append", "help": "allowed CORS origin (repeatable)"}),
    ("--bake-dir", "bake_dir", {"help": "where /v1/bake writes (default ./baked)"}),
    ("--max-batch-size", "max_batch_size", {"type": int, "help": "rows in the running batch (default 8)"}),
    ("--max-queue", "max_queue", {"type": int, "help": "waiting requests before 429 (default 64)"}),
    ("--max-body-bytes", "max_body_bytes", {"type": int, "help": "largest request body (default 2000000)"}),
    ("--default-max-tokens", "default_max_tokens", {"type": int, "help": "max_tokens when none given (default 512)"}),
    ("--max-tokens-cap", "max_tokens_cap", {"type": int, "help": "largest max_tokens allowed (default 4096)"}),
    ("--max-n", "max_n", {"type": int, "help": "largest n (default 4)"}),
    ("--max-abs-strength", "max_abs_strength", {"type": float, "help": "|strength| bound (default 4)"}),
    (
        "--request-timeout",
        "request_timeout_s",
        {"type": float, "help": "seconds before a request is ended (default 600)"},
    ),
    (
        "--shutdown-grace",
        "shutdown_grace_s",
        {"type": float, "help": "seconds in-flight requests get on SIGTERM (default 30)"},
    ),
]


def _meta(flag: str, kw: dict) -> dict:
    if kw.get("action") == "store_true":
        return kw
    return {"metavar": flag.lstrip("-").upper().replace("-", "_"), **kw}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"TOML settings file (also env {CONFIG_ENV}); flags > env > file")
    g = p.add_argument_group("model")
    for flag, dest, kw in MODEL_FLAGS:
        g.add_argument(flag, dest=f"m_{dest}", **_meta(flag, kw))
    g = p.add_argument_group("server")
    for flag, dest, kw in SERVER_FLAGS:
        g.add_argument(flag, dest=f"s_{dest}", **_meta(flag, kw))


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
    from server.loading import direction_paths, load_directions, served_id

    ms, ss = settings_from_args(args)
    try:
        loaded = load_model(ms.model, device=ms.device, dtype=ms.dtype)
        directions = load_directions(direction_paths(ms), loaded.model.config, ms.allow_fingerprint_mismatch)
        if ms.packed_weights:
            from server.packing import PackingUnavailable, pack_linear_weights

            try:
                pack_linear_weights(loaded.model)
            except PackingUnavailable as e:
                print(f"frankly: cannot start: --packed-weights: {e}", file=sys.stderr)
                return 2
        app = build_app(loaded, directions, ss, ms, served_id(ms))
    except (ModelLoadError, DirectionFileError, UnsupportedModelError, OSError) as e:
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
