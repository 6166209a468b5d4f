"""What ``frankly serve`` loads at start-up: the model, its directions and the id it is served under."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from directions import specs
from directions.demo import DEMO_NAME
from directions.fileformat import DirectionSet
from directions.models import LoadedModel, ModelLoadError, kv_cache_dtype, load_model, locate, read_configs
from directions.specs import check_fit, load_directions
from server.settings import ModelSettings

log = logging.getLogger("frankly.startup")


def direction_paths(ms: ModelSettings) -> dict[str, str]:
    """The shipped directions for the demo model (unless turned off), then ``--direction`` over them."""
    return specs.direction_paths(ms.model, ms.directions, shipped=not ms.no_default_directions)


@dataclass
class ConfigOnly:
    """What the server needs of a model that another runtime (llama.cpp) runs: its configs."""

    config: object
    generation_config: object


def _load_for_llamacpp(ms: ModelSettings) -> LoadedModel:
    """The tokenizer and configs of a GGUF model (from its one-time converted directory, which the
    adapter export needs too); the weights stay llama.cpp's."""
    path, gguf = locate(ms.model)
    if gguf is None:
        raise ModelLoadError(f"--engine llamacpp runs GGUF files: {ms.model!r} is not a .gguf file (or 'demo')")
    tok, config, gen = read_configs(ms.model, path)
    return LoadedModel(ConfigOnly(config, gen), tok, ms.model, path, "cpu", torch.float32, gguf)


def resolve_weights(ms: ModelSettings) -> tuple[str, str]:
    """``--weights`` as it will run, and why: ``auto`` is int8 for the torch engine on an x86-64 CPU with
    AVX2 and FMA (measured on the demo: 4.17x the float server at one stream, 2.9-3.2x at eight, first-token
    KL 0.0017), and float wherever int8 was not measured to win or does not apply."""
    if ms.weights != "auto":
        return ms.weights, "--weights"
    from directions import kernels
    from directions.models import resolve_device

    if ms.engine != "torch":
        return "float", f"the {ms.engine} engine runs its own weights"
    if ms.packed_weights:
        return "float", "--packed-weights prepacks float weights"
    device = resolve_device(ms.device)
    if device != "cpu":
        return "float", f"int8 is for CPUs, this model runs on {device}"
    if ms.dtype not in ("auto", "float32", "fp32"):
        return "float", f"--dtype {ms.dtype}"
    if not kernels.cpu_supported():
        return "float", "this CPU lacks AVX2 and FMA, where int8 was measured faster"
    return "int8", "an x86-64 CPU with AVX2 and FMA: int8 decodes about 4x faster than float here"


def load_served(ms: ModelSettings) -> tuple[LoadedModel, dict[str, DirectionSet]]:
    """Load the model and its directions, each checked against the model (clear errors naming both).

    With ``--engine llamacpp`` only the tokenizer and configs are loaded here (see
    :func:`_load_for_llamacpp`); the engine loads the GGUF itself. ``--weights auto`` is resolved
    first (:func:`resolve_weights`) and the choice logged."""
    weights, why = resolve_weights(ms)
    chose_float = ms.weights == "float"  # asked for by name, not picked by auto
    if ms.weights == "auto":
        log.info("--weights auto: %s (%s)", weights, why)
        ms = ms.model_copy(update={"weights": weights})
    paths = direction_paths(ms)
    if ms.engine == "vllm":  # tokenizer and configs only; vLLM loads the weights
        from server.vllm_setup import load_for_vllm

        return load_for_vllm(ms, paths)
    if ms.engine == "llamacpp":
        if ms.weights != "float":
            from directions.quant import QuantizationError

            raise QuantizationError(
                "--weights is for the torch engine; llama.cpp runs the GGUF's own quantized weights"
            )
        loaded = _load_for_llamacpp(ms)
        directions = load_directions(paths)
        check_fit(directions, loaded.model.config, paths, allow_mismatch=ms.allow_fingerprint_mismatch)
        return loaded, directions
    if ms.weights == "int8" and ms.packed_weights:
        from directions.quant import QuantizationError

        raise QuantizationError("--packed-weights prepacks float weights; it does not combine with --weights int8")
    directions = load_directions(paths)  # a bad direction file fails before the model loads
    loaded = load_model(
        ms.model,
        device=ms.device,
        dtype=ms.dtype,
        weights=ms.weights,
        int8_kernel=ms.int8_kernel,  # read only for quantized weights
        kv_dtype=ms.kv_dtype,
    )
    check_fit(directions, loaded.model.config, paths, allow_mismatch=ms.allow_fingerprint_mismatch)
    if chose_float and loaded.device == "cpu" and not ms.packed_weights:
        from directions import kernels

        if kernels.cpu_supported():
            log.info(
                "serving float weights on a CPU with AVX2: --weights int8 (what --weights auto picks here) decoded "
                "the demo 4x faster through this server, first-token KL 0.0017 against fp32; float computes "
                "exactly what a bake writes and transformers runs"
            )
    if ms.weights == "int8":
        from directions import kernels

        log.info(
            "int8 weights: linear layers int8 per channel (a GGUF read tensor by tensor); activations in %s; "
            "KV cache in %s; matmul: %s; lean decoder layers: %d of %d; weights on huge pages: %.0f MiB",
            str(loaded.dtype).removeprefix("torch."),
            str(kv_cache_dtype(loaded.model) or loaded.dtype).removeprefix("torch."),
            kernels.current().describe(),
            getattr(loaded.model, "frankly_lean_layers", 0),
            loaded.model.config.num_hidden_layers,
            getattr(loaded.model, "frankly_huge_page_bytes", 0) / 2**20,
        )
    if ms.packed_weights:
        from server.packing import pack_linear_weights

        pack_linear_weights(loaded.model)
    return loaded, directions


def served_id(ms: ModelSettings) -> str:
    """The model id clients use: ``--served-model-name``, ``qwen-demo`` for the demo, else the file or directory name."""
    if ms.served_model_name:
        return ms.served_model_name
    if ms.model == "demo":
        return DEMO_NAME
    return Path(ms.model.rstrip("/")).name.removesuffix(".gguf") or ms.model
