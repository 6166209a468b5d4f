"""``frankly serve --engine vllm``: what is loaded here, and the engine in front of the vLLM it starts.

frankly keeps the tokenizer and the configs (chat template, EOS ids, limits); vLLM loads the
weights. At start-up the directions are written as LoRA adapters for the exported strengths
(:mod:`server.engine.vllm_adapters`, cached), ``vllm serve`` is started on a free loopback port
with them (:mod:`server.engine.vllm_supervisor`), and :class:`~server.engine.vllm_engine.VllmEngine`
forwards requests to it.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import torch

from directions.fileformat import DirectionSet
from directions.files import cache_root
from directions.models import LoadedModel, ModelLoadError, locate, read_configs
from directions.specs import check_fit, load_directions
from server.engine.vllm_adapters import (
    BASE,
    adapter_name,
    combinations_for,
    ensure_adapters,
    parse_combination,
    vllm_model_dir,
)
from server.engine.vllm_supervisor import VllmCommand, VllmStartError, VllmSupervisor, find_vllm
from server.settings import ModelSettings, ServerSettings

log = logging.getLogger("frankly.vllm")

BASE_NAME = "frankly-base"  # vLLM's name for the unsteered model
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256)  # --max-lora-rank values vLLM accepts


def load_for_vllm(ms: ModelSettings, paths: dict[str, str]) -> tuple[LoadedModel, dict[str, DirectionSet]]:
    """The tokenizer and configs of ``ms.model`` (a directory, a .gguf via its converted directory, or
    'demo') and its directions; the weights are vLLM's."""
    if ms.weights == "int8" or ms.packed_weights:  # auto is float here: vLLM runs its own weights
        raise ModelLoadError("--weights int8 and --packed-weights are for the torch engine; vLLM loads its own weights")
    path, gguf = locate(ms.model)
    tok, config, gen = read_configs(ms.model, path)
    directions = load_directions(paths)
    check_fit(directions, config, paths, allow_mismatch=ms.allow_fingerprint_mismatch)
    model = SimpleNamespace(config=config, generation_config=gen)  # what the server reads of a model it does not run
    return LoadedModel(model, tok, ms.model, path, "cpu", torch.float32, gguf), directions


def vllm_command(
    loaded: LoadedModel,
    directions: dict[str, DirectionSet],
    settings: ServerSettings,
    ms: ModelSettings,
    max_model_len: int,
    port: int,
) -> tuple[VllmCommand, dict]:
    """The ``vllm serve`` command (adapters written first, once) and combination -> vLLM model name."""
    executable = find_vllm(ms.vllm_path)  # before the (slow, first-time) adapter export
    try:
        extra = [parse_combination(c, directions) for c in ms.vllm_combinations]
    except ValueError as e:
        raise VllmStartError(str(e)) from None
    combos = combinations_for(directions, ms.vllm_strengths, extra)
    root = cache_root()
    adapters = ensure_adapters(loaded.path, directions, combos, root)
    rank = max((len(c) for c in combos), default=1)
    cmd = VllmCommand(
        executable=executable,
        model=vllm_model_dir(loaded.path, root),
        served_name=BASE_NAME,
        port=port,
        adapters={adapter_name(c): p for c, p in adapters.items()},
        max_model_len=max_model_len,
        max_num_seqs=settings.max_batch_size,
        max_lora_rank=next(r for r in LORA_RANKS if r >= max(rank, 8)),
        dtype=None if ms.dtype == "auto" else ms.dtype,
        extra_args=shlex.split(ms.vllm_args),
    )
    models = {BASE: BASE_NAME, **{c: adapter_name(c) for c in adapters}}
    return cmd, models


def vllm_engine(
    loaded: LoadedModel,
    directions: dict[str, DirectionSet],
    settings: ServerSettings,
    ms: ModelSettings,
    max_model_len: int,
    metrics,
):
    """The vLLM engine with its supervisor (vLLM itself starts in ``engine.start()``)."""
    from server.engine.torch_engine import eos_ids
    from server.engine.vllm_engine import VllmConfig, VllmEngine
    from server.testing import free_port

    port = free_port()
    cmd, models = vllm_command(loaded, directions, settings, ms, max_model_len, port)
    log_path = Path(cache_root()) / "vllm" / f"vllm-serve-{port}.log"
    supervisor = VllmSupervisor(cmd, log_path, ready_timeout_s=ms.vllm_ready_timeout_s)
    config = VllmConfig(settings.max_batch_size, settings.max_queue, max_model_len)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    return VllmEngine(supervisor.url, loaded.tokenizer, models, eos, config, observer=metrics, supervisor=supervisor)
