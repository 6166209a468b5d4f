"""Naming direction files: ``NAME=PATH`` specs, and loading a named set checked against a model.

The server's ``--direction``, ``frankly eval`` and ``frankly bake`` all take ``NAME=PATH``;
they parse it here, so a name means the same thing (letters, digits, '-' and '_') everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
