"""``frankly extract``: compute a direction file from two prompt sets, choosing layers on validation.

Extraction and selection are the library's (:mod:`directions.selection`); this command wires
selection's generations to the torch engine, so candidates are measured as the server serves them."""

from __future__ import annotations

import argparse
import json
import logging
import time

from directions.extract import Candidate, default_layers, parse_layers
from directions.files import read_lines
from directions.refusal import PROMPTS_DIR
from directions.selection import ExtractData, SelectConfig, select_and_build

log = logging.getLogger("frankly.extract")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: 'demo', a directory, a .gguf file or a hub id")
    p.add_argument("--positive", required=True, help="train prompts of side A (harmful / slop-inducing), one per line")
    p.add_argument("--negative", required=True, help="train prompts of side B (harmless / plain)")
    p.add_argument("--val-positive", required=True, help="validation prompts of side A (selection, calibration)")
    p.add_argument("--val-negative", required=True, help="validation prompts of side B")
    p.add_argument("--system-positive", help="system prompts for side A; prompt k gets line k mod n (slop)")
    p.add_argument("--system-negative", help="system prompts for side B")
    p.add_argument("--name", required=True, help="direction name (what requests ask for)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument(
        "--objective",
        choices=("refusal", "slop"),
        help="selection objective (default: slop when system prompts are given, else refusal)",
    )
    p.add_argument("--layers", help="candidate layers, e.g. '8-18', '6-18:2', '10,12' (default: middle 20%%-80%%)")
    p.add_argument(
        "--variants",
        default="orth,kernel,perlayer",
        help="refinements tried around the best single layer (comma list of orth, kernel, perlayer; '' = none)",
    )
    p.add_argument("--layer", type=int, help="skip selection: use the mean difference of this layer ('single' kind)")
    p.add_argument(
        "--kl-prompts",
        help="harmless prompts for first-token KL (default: --val-negative for refusal, "
        "prompts/refusal/harmless_val.txt for slop)",
    )
    p.add_argument(
        "--capability",
        default=str(PROMPTS_DIR / "capability" / "questions.jsonl"),
        help="capability questions (jsonl) checked in the confirm stage",
    )
    p.add_argument("--kl-budget", type=float, default=0.1, help="max first-token KL for a candidate to be chosen")
    p.add_argument(
        "--proxy-n", type=int, help="validation prompts per candidate in the fast stages (default 32 / slop 16)"
    )
    p.add_argument("--proxy-tokens", type=int, help="tokens generated in the fast stages (default 24 / slop 64)")
    p.add_argument("--confirm-top", type=int, default=2, help="candidates re-measured with long generations")
    p.add_argument("--confirm-tokens", type=int, default=100, help="tokens generated in the confirm stage")
    p.add_argument("--confirm-n", type=int, help="validation prompts in the confirm stage (default: all)")
    p.add_argument("--no-detect", action="store_true", help="do not calibrate a detection vector (conditional mode)")
    p.add_argument(
        "--detect-fpr",
        type=float,
        default=0.02,
        help="max firing rate of the condition on side-B validation prompts (default 0.02)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="engine batch size and forward batch size")
    p.add_argument(
        "--quick", action="store_true", help="mechanics check: every 2nd layer, few prompts, short generations"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def _lines(path: str | None) -> list[str] | None:
    return read_lines(path) if path else None


def _data(args: argparse.Namespace, objective: str) -> ExtractData:
    """The prompt sets named by the flags, with their files (hashed into the metadata)."""
    from directions.capability import read_capability

    kl_path = args.kl_prompts or (
        args.val_negative if objective == "refusal" else str(PROMPTS_DIR / "refusal" / "harmless_val.txt")
    )
    files = {
        "positive": args.positive,
        "negative": args.negative,
        "val_positive": args.val_positive,
        "val_negative": args.val_negative,
        "kl_prompts": kl_path,
        "capability": args.capability,
    }
    if args.system_positive:
        files["system_positive"] = args.system_positive
    if args.system_negative:
        files["system_negative"] = args.system_negative
    return ExtractData(
        pos_train=_lines(args.positive),
        neg_train=_lines(args.negative),
        pos_val=_lines(args.val_positive),
        neg_val=_lines(args.val_negative),
        pos_systems=_lines(args.system_positive),
        neg_systems=_lines(args.system_negative),
        kl_prompts=_lines(kl_path),
        capability=read_capability(args.capability) if args.capability else None,
        files=files,
    )


def _config(args: argparse.Namespace, objective: str, n_layers: int) -> SelectConfig:
    cfg = SelectConfig(
        objective=objective,
        kl_budget=args.kl_budget,
        confirm_top=args.confirm_top,
        confirm_tokens=args.confirm_tokens,
        confirm_n=args.confirm_n,
        detect=not args.no_detect,
        detect_fpr=args.detect_fpr,
        batch_size=args.batch_size,
        proxy_n=args.proxy_n or (16 if objective == "slop" else 32),
        proxy_tokens=args.proxy_tokens or (64 if objective == "slop" else 24),
        variants=tuple(v for v in args.variants.split(",") if v.strip()),
    )
    if args.layers:
        cfg.layers = parse_layers(args.layers, n_layers)
    if args.quick:
        cfg.layers = (cfg.layers or default_layers(n_layers))[::2]
        cfg.proxy_n, cfg.proxy_tokens = min(cfg.proxy_n, 12), min(cfg.proxy_tokens, 16)
        cfg.confirm_top, cfg.confirm_n, cfg.confirm_tokens = 1, cfg.confirm_n or 16, min(cfg.confirm_tokens, 48)
        cfg.variants = ()
    return cfg


def _print_record(sel: dict) -> None:
    for stage in ("stage1_proxy", "stage2_proxy", "confirm"):
        if sel.get(stage):
            print(f"\n{stage}:")
            for k, f in sel[stage].items():
                print(f"  {k:>22}  " + "  ".join(f"{m}={v}" for m, v in f.items()))
    if "detection" in sel:
        d = sel["detection"]
        print(
            f"\ndetection: {d.get('chosen_kind', 'mean-diff')} at layer {d['chosen_layer']} threshold {d['threshold']} "
            f"val fire A={d['val_fire_pos']} B={d['val_fire_neg']} train fire A={d.get('train_fire_pos')} "
            f"B={d.get('train_fire_neg')}"
        )


def run(args: argparse.Namespace) -> int:
    from directions.fileformat import save_direction
    from directions.models import load_model
    from server.engine.offline import engine_generate

    t0 = time.monotonic()
    objective = args.objective or ("slop" if args.system_positive else "refusal")
    data = _data(args, objective)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = _config(args, objective, lm.model.config.num_hidden_layers)
    candidates = [Candidate("single", args.layer)] if args.layer is not None else None
    generate = engine_generate(lm.model, lm.tokenizer, batch_size=cfg.batch_size)
    ds = select_and_build(lm.model, lm.tokenizer, data, args.name, cfg, candidates, generate)
    ds.metadata["model"] = args.model
    ds.metadata["extract_wall_s"] = str(round(time.monotonic() - t0, 1))
    path = save_direction(ds, args.out, config=lm.model.config)
    sel = ds.metadata["selection"]
    print(f"wrote {path}: {ds.metadata['method']} (candidate {ds.metadata['candidate']})")
    _print_record(sel)
    print(f"\nwall time {time.monotonic() - t0:.0f} s")
    log.debug("selection record: %s", json.dumps(sel))
    return 0
