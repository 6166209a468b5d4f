"""``frankly bake``: write the edit at given strengths into a copy of the weights.

    frankly bake --model demo --steering refusal=1.0 --out baked/qwen-norefusal
    frankly bake --model ./my-model --direction refusal=refusal.safetensors --steering refusal=0.8 --out out/x

With ``--model demo`` the shipped directions (directions/shipped/qwen-demo-*.safetensors)
load by default. A GGUF source also gets a ``model.gguf`` next to the safetensors copy.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from tqdm import tqdm

from directions import specs
from directions.bake import BakeError, bake_to_dir
from directions.fileformat import DirectionFileError, DirectionSet
from directions.gguf_write import GGUF_DTYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'demo', a model directory, a .gguf file or a hub id")
    p.add_argument(
        "--direction", action="append", default=[], metavar="NAME=PATH", help="a direction file to load (repeatable)"
    )
    p.add_argument(
        "--steering",
        action="append",
        required=True,
        metavar="NAME=S[,NAME=S]",
        help="strengths to bake, e.g. refusal=1.0,slop=0.5 (a bare NAME means 1.0; repeatable)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-gguf", action="store_true", help="do not write model.gguf even if the source is a GGUF")
    p.add_argument(
        "--gguf-dtype",
        choices=list(GGUF_DTYPES),
        default="q8_0",
        help="type of the edited tensors in model.gguf (q8_0: a quarter of f32's size; f16; f32: exact)",
    )


def parse_steering(items: list[str]) -> dict[str, float]:
    """``["refusal=1.0,slop=0.5", "x"]`` -> ``{"refusal": 1.0, "slop": 0.5, "x": 1.0}`` (order kept)."""
    out: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, _, value = part.partition("=")
            try:
                out[name.strip()] = float(value) if value else 1.0
            except ValueError:
                raise SystemExit(f"frankly bake: bad strength in --steering {part!r}") from None
    return out


def load_directions(command: str, model: str, direction_specs: list[str]) -> dict[str, DirectionSet] | None:
    """The shipped directions for ``--model demo``, then every ``--direction NAME=PATH`` over them;
    a bad spec or file is printed as ``frankly <command>: <error>`` (the result is None then)."""
    try:
        return specs.load_directions(specs.direction_paths(model, direction_specs))
    except DirectionFileError as e:
        print(f"frankly {command}: {e}", file=sys.stderr)
        return None


@contextmanager
def progress_bar(desc: str):
    """A 0-100% tqdm bar and the ``progress(fraction, message)`` callback that drives it."""
    fmt = "{l_bar}{bar}| {n:.0f}% [{elapsed}] {postfix}"
    with tqdm(total=100, unit="%", desc=desc, bar_format=fmt) as bar:

        def progress(fraction: float, message: str) -> None:
            # No forced refresh: tqdm's own rate limit keeps logs readable when stderr is not a terminal.
            bar.set_postfix_str(message[-60:], refresh=False)
            bar.update(100 * fraction - bar.n)

        yield bar, progress


def with_progress(command: str, desc: str, work: Callable[..., Path]) -> Path | None:
    """``work(progress=...)`` under a progress bar; a :class:`BakeError` closes the bar and is
    printed as ``frankly <command>: <error>`` (the result is None then)."""
    with progress_bar(desc) as (bar, progress):
        try:
            return work(progress=progress)
        except BakeError as e:
            bar.close()
            print(f"frankly {command}: {e}", file=sys.stderr)
            return None


def run(args: argparse.Namespace) -> int:
    directions = load_directions("bake", args.model, args.direction)
    if directions is None:
        return 2
    strengths = parse_steering(args.steering)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines would break the progress bar
    t0 = time.monotonic()
    out = with_progress(
        "bake",
        "baking",
        partial(
            bake_to_dir,
            args.model,
            directions,
            strengths,
            args.out,
            overwrite=args.overwrite,
            write_gguf=not args.no_gguf,
            gguf_dtype=args.gguf_dtype,
        ),
    )
    if out is None:
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    print(f"baked {strengths} into {out} in {time.monotonic() - t0:.1f} s (peak RSS {peak_gb:.2f} GB)")
    return 0
