"""The ``frankly`` command: serve, extract, search, calibrate, eval, bake, export-lora, fetch-demo.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "serve": ("server.serve_cmd", "run the OpenAI-compatible server"),
    "extract": ("server.extract_cmd", "compute a direction file from two prompt sets"),
    "calibrate": ("server.calibrate_cmd", "(re)calibrate the condition (conditional ablation) of a direction file"),
    "search": ("server.search_cmd", "search the refusal direction's parameters with Optuna (the search extra)"),
    "eval": ("server.eval_cmd", "measure refusal rate, KL, slop score and capability over strengths"),
    "bake": ("directions.bake_cmd", "write the edit into a copy of the weights"),
    "export-lora": ("directions.lora_cmd", "write each direction as a rank-1 LoRA adapter (PEFT, llama.cpp GGUF)"),
    "fetch-demo": ("server.demo_cmd", "install, verify and convert the demo model"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="frankly", description="Inference-time direction ablation server.")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            sp.set_defaults(_module=None, _missing=mod)
            continue
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args._module is None:
        print(f"frankly {args.command}: not available in this build ({args._missing})", file=sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
