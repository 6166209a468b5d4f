"""``frankly export-lora``: write each direction as a rank-1 LoRA adapter (PEFT and llama.cpp GGUF).

    frankly export-lora --model demo --out adapters/qwen-demo
    frankly export-lora --model demo --strengths 0.5,1.0 --out adapters/qwen-demo
    frankly export-lora --model ./my-model --direction refusal=refusal.safetensors --format peft --out out/x

With ``--model demo`` the shipped directions load by default. Adapter scale s
is frankly's strength s; ``--strengths`` also writes ``<name>-<s>`` adapters
with the strength folded in, for runtimes that cannot scale per request.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial

from directions.bake_cmd import load_directions, with_progress
from directions.lora_export import FORMATS, GGUF_EMBEDDING, MANIFEST, export_lora


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'demo', a model directory or a .gguf file")
    p.add_argument(
        "--direction", action="append", default=[], metavar="NAME=PATH", help="a direction file to load (repeatable)"
    )
    p.add_argument(
        "--only", action="append", default=None, metavar="NAME", help="export only these directions (repeatable)"
    )
    p.add_argument(
        "--strengths",
        default="",
        metavar="S[,S]",
        help="also write adapters with these strengths folded in, named <name>-<s> (for vLLM, Ollama)",
    )
    p.add_argument(
        "--format",
        action="append",
        choices=FORMATS,
        default=None,
        help="adapter formats to write (repeatable; default: both, gguf only when a base GGUF is known)",
    )
    p.add_argument("--gguf-base", default=None, help="base GGUF the llama.cpp adapters are for (default: the source's)")
    p.add_argument(
        "--gguf-embedding",
        choices=GGUF_EMBEDDING,
        default="auto",
        help="token_embd in the GGUF adapter when the base GGUF ties its LM head to it (llama.cpp would abort): "
        "auto/omit leave it out, untie writes base-untied.gguf (exact), include refuses",
    )
    p.add_argument(
        "--no-peft-embedding",
        action="store_true",
        help="leave embed_tokens out of the PEFT adapters: vLLM (0.32) refuses an embedding target "
        "(the embedding term of the edit is then missing; see README)",
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def parse_strengths(text: str) -> list[float]:
    out = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        try:
            out.append(float(part))
        except ValueError:
            raise SystemExit(f"frankly export-lora: bad strength {part!r} in --strengths") from None
    return out


def run(args: argparse.Namespace) -> int:
    directions = load_directions("export-lora", args.model, args.direction)
    if directions is None:
        return 2
    formats = args.format
    if formats is None:
        source_is_gguf = args.model == "demo" or args.model.endswith(".gguf")
        formats = ["peft", "gguf"] if (source_is_gguf or args.gguf_base) else ["peft"]
    logging.getLogger("gguf").setLevel(logging.WARNING)
    t0 = time.monotonic()
    out = with_progress(
        "export-lora",
        "exporting",
        partial(
            export_lora,
            args.model,
            directions,
            args.out,
            names=args.only,
            strengths=parse_strengths(args.strengths),
            formats=formats,
            gguf_base=args.gguf_base,
            gguf_embedding=args.gguf_embedding,
            peft_embedding=not args.no_peft_embedding,
            overwrite=args.overwrite,
        ),
    )
    if out is None:
        return 2
    print(
        f"exported {len(directions) if args.only is None else len(args.only)} direction(s) to {out} "
        f"in {time.monotonic() - t0:.1f} s (see {out / MANIFEST})"
    )
    return 0
