"""Loading the served model and its direction files, with clear startup errors."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from directions.fileformat import DirectionFileError, DirectionSet, load_direction
from server.demo import DEMO_NAME
from server.settings import ModelSettings

log = logging.getLogger("frankly.loading")

SHIPPED_DEMO = {"refusal": "qwen-demo-refusal.safetensors", "slop": "qwen-demo-slop.safetensors"}


def shipped_dir() -> Path:
    return Path(str(resources.files("directions").joinpath("shipped")))


def parse_direction_specs(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise DirectionFileError(f"--direction expects NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DirectionFileError(f"direction name {name!r} must be letters, digits, '-' or '_'")
        out[name] = path
    return out


def direction_paths(ms: ModelSettings) -> dict[str, str]:
    paths: dict[str, str] = {}
    if ms.model == "demo" and not ms.no_default_directions:
        for name, fn in SHIPPED_DEMO.items():
            p = shipped_dir() / fn
            if p.is_file():
                paths[name] = str(p)
            else:
                log.warning("shipped direction %s not found at %s", name, p)
    paths.update(parse_direction_specs(ms.directions))
    return paths


def load_directions(paths: dict[str, str], config, allow_mismatch: bool = False) -> dict[str, DirectionSet]:
    """Load and check every direction against the served model's config; raise naming both sides."""
    out = {}
    for name, path in paths.items():
        ds = load_direction(path, name=name)
        try:
            ds.check_fits(config, path)
        except DirectionFileError as e:
            if not allow_mismatch or "shape" in str(e):
                raise
            log.warning("%s (loaded anyway: --allow-fingerprint-mismatch)", e)
        out[name] = ds
    return out


def served_id(ms: ModelSettings) -> str:
    if ms.served_model_name:
        return ms.served_model_name
    if ms.model == "demo":
        return DEMO_NAME
    return Path(ms.model.rstrip("/")).name.removesuffix(".gguf") or ms.model
