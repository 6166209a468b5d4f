"""Naming direction files: ``NAME=PATH`` specs, and loading a named set checked against a model.

The server's ``--direction``, ``frankly eval``, ``frankly bake`` and ``frankly export-lora`` all
take ``NAME=PATH``; they parse it here, so a name means the same thing (letters, digits, '-' and
'_') everywhere. ``direction_paths`` adds the directions shipped for the demo model under them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from directions.demo import shipped_demo_paths
from directions.fileformat import DirectionFileError, DirectionSet, FingerprintMismatch, load_direction

log = logging.getLogger("frankly.directions")


def parse_direction_specs(specs: list[str]) -> dict[str, str]:
    """``["refusal=r.safetensors", ...]`` -> ``{"refusal": "r.safetensors", ...}`` (order kept).

    Raises :class:`DirectionFileError` for a spec without ``=``, an empty path, or a name
    that is not letters, digits, '-' or '_' (names end up in model ids and URLs)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise DirectionFileError(f"--direction expects NAME=PATH, got {spec!r}")
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise DirectionFileError(f"direction name {name!r} must be letters, digits, '-' or '_'")
        out[name] = str(Path(path).expanduser())
    return out


def direction_paths(model: str, specs: list[str], shipped: bool = True) -> dict[str, str]:
    """The shipped directions for the ``demo`` model (unless ``shipped`` is False), then the
    ``NAME=PATH`` ``specs`` over them (a name given again replaces the shipped file)."""
    paths: dict[str, str] = {}
    if model == "demo" and shipped:
        paths.update({n: str(p) for n, p in shipped_demo_paths().items()})
    paths.update(parse_direction_specs(specs))
    return paths


def load_directions(paths: dict[str, str | Path]) -> dict[str, DirectionSet]:
    """Load every named file (clear :class:`DirectionFileError` for a missing or corrupt one)."""
    return {name: load_direction(path, name=name) for name, path in paths.items()}


def check_fit(
    directions: dict[str, DirectionSet], config, paths: dict | None = None, allow_mismatch: bool = False
) -> None:
    """Check every direction fits the model ``config``, raising naming both sides (and the file, from ``paths``).

    ``allow_mismatch`` lets a differing fingerprint through with a warning (never a wrong shape)."""
    for name, ds in directions.items():
        try:
            ds.check_fits(config, str((paths or {}).get(name, "")))
        except FingerprintMismatch as e:
            if not allow_mismatch:
                raise
            log.warning("%s (loaded anyway: --allow-fingerprint-mismatch)", e)
