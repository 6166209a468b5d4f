"""What ``frankly serve`` loads at start-up: the model, its directions and the id it is served under."""

from __future__ import annotations

import logging
from pathlib import Path

from directions.demo import DEMO_NAME, shipped_demo_paths
from directions.fileformat import DirectionSet
from directions.models import LoadedModel, load_model
from directions.specs import check_fit, load_directions, parse_direction_specs
from server.settings import ModelSettings

log = logging.getLogger("frankly.startup")


def direction_paths(ms: ModelSettings) -> dict[str, str]:
    """The shipped directions for the demo model (unless turned off), then ``--direction`` over them."""
    paths: dict[str, str] = {}
    if ms.model == "demo" and not ms.no_default_directions:
        paths.update({n: str(p) for n, p in shipped_demo_paths().items()})
    paths.update(parse_direction_specs(ms.directions))
    return paths


def load_served(ms: ModelSettings) -> tuple[LoadedModel, dict[str, DirectionSet]]:
    """Load the model and its directions, each checked against the model (clear errors naming both)."""
    paths = direction_paths(ms)
    loaded = load_model(ms.model, device=ms.device, dtype=ms.dtype)
    directions = load_directions(paths)
    check_fit(directions, loaded.model.config, paths, allow_mismatch=ms.allow_fingerprint_mismatch)
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
