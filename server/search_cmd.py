"""``frankly search``: Optuna search of the refusal direction's parameters (direction index,
per-component layer-weight kernels, orthogonalisation, embedding and first layers) on
train/validation, confirmed with generations, written as a direction file with its condition.

The study is :mod:`directions.search`; this command wires its confirm stage to the torch engine,
so candidates are measured as the server serves them. Needs the ``search`` extra (Optuna)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from directions.refusal import PROMPTS_DIR

log = logging.getLogger("frankly.search")
REFUSAL = PROMPTS_DIR / "refusal"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model spec: 'demo', a directory, a .gguf file or a hub id")
    p.add_argument("--positive", default=str(REFUSAL / "harmful_train.txt"), help="harmful train prompts")
    p.add_argument("--negative", default=str(REFUSAL / "harmless_train.txt"), help="harmless train prompts")
    p.add_argument("--val-positive", default=str(REFUSAL / "harmful_val.txt"), help="harmful validation prompts")
    p.add_argument("--val-negative", default=str(REFUSAL / "harmless_val.txt"), help="harmless validation prompts")
    p.add_argument("--name", default="refusal", help="direction name (what requests ask for)")
    p.add_argument("--out", required=True, help="output .safetensors path (plot and selection JSON go beside it)")
    p.add_argument("--study-dir", required=True, help="study directory: SQLite study and cached activations (resume)")
    p.add_argument("--trials", type=int, default=60, help="finished trials the study should hold (resumes)")
    p.add_argument("--minutes", type=float, help="stop starting new trials after this many minutes (then confirm)")
    p.add_argument("--startup-trials", type=int, default=12, help="random trials before TPE takes over")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--proxy-n", type=int, default=24, help="validation prompts per side scored in each trial")
    p.add_argument("--proxy-tokens", type=int, default=24, help="tokens of the short replies judged in each trial")
    p.add_argument("--kl-budget", type=float, default=0.02, help="max first-token KL of the winner (whole val split)")
    p.add_argument("--confirm-top", type=int, default=4, help="Pareto candidates confirmed with generations")
    p.add_argument(
        "--confirm-trials", help="comma list of trial numbers to confirm instead of the automatic Pareto pick"
    )
    p.add_argument("--confirm-tokens", type=int, default=64, help="tokens generated per prompt in the confirm stage")
    p.add_argument("--confirm-base", action="store_true", help="also count the unedited model's refusals")
    p.add_argument("--reference-layer", type=int, help="enqueue the flat orth@LAYER direction as the first trial")
    p.add_argument("--train-n", type=int, help="evenly spaced train prompts per side for the means (default: all)")
    p.add_argument(
        "--detector",
        help="take the condition (detect vector, layer, threshold) from this direction file instead of calibrating "
        "one (saves the validation activation pass; the condition does not depend on the ablation direction)",
    )
    p.add_argument("--no-detect", action="store_true", help="do not calibrate the condition (conditional mode)")
    p.add_argument("--detect-fpr", type=float, default=0.02, help="max firing rate on harmless validation prompts")
    p.add_argument("--batch-size", type=int, default=16, help="forward and engine batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def _study(args, lm, prompts, n_layers: int):
    """Activations (cached), proxy scorer and the study with its trials run; returns (acts, rows, refusal ids)."""
    from directions.extract import build_prompts
    from directions.search import (
        ProxyScorer,
        load_or_extract,
        open_study,
        reference_params,
        refusal_tokens,
        run_trials,
        study_key,
        trial_rows,
    )

    study_dir = Path(args.study_dir)
    val = not (args.no_detect or args.detector)
    key = study_key(args.model, prompts) + f"/val={val}"
    acts = load_or_extract(lm.model, lm.tokenizer, prompts, study_dir, key, args.batch_size, val)
    ref_ids = refusal_tokens(acts)
    if not ref_ids:
        raise SystemExit("no refusal-opening tokens found: does the unedited model refuse the harmful train prompts?")
    print("refusal-opening tokens:", [lm.tokenizer.decode([i]) for i in ref_ids])
    ids = lambda texts: build_prompts(lm.tokenizer, texts[: args.proxy_n])  # noqa: E731
    scorer = ProxyScorer(
        lm.model,
        lm.tokenizer,
        ids(prompts.harmful_val),
        ids(prompts.harmless_val),
        ref_ids,
        1.0,
        args.batch_size,
        args.proxy_tokens,
    )
    study = open_study(study_dir, args.name, args.seed, args.startup_trials)
    if args.reference_layer is not None and not study.trials:
        study.enqueue_trial(reference_params(args.reference_layer))
    run_trials(study, scorer, acts, args.trials, n_layers, args.minutes * 60 if args.minutes else None)
    rows = trial_rows(study)
    (study_dir / "trials.json").write_text(json.dumps(rows, indent=1))
    return acts, rows, ref_ids


def _detect(args, ds, acts, n_layers: int) -> dict | None:
    from directions.detection import apply_detection, calibrate_detection
    from directions.extract import default_layers
    from directions.fileformat import load_direction

    if args.no_detect:
        return None
    if args.detector:
        src = load_direction(args.detector)
        if not src.has_probe:
            raise SystemExit(f"--detector {args.detector} has no prefill probe (detection vector)")
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = (
            src.detect_vector,
            src.detect_layer,
            src.detect_threshold,
        )
        for k in ("detect_logit_tokens", "detect_logit_weight"):
            if k in src.metadata:
                ds.metadata[k] = src.metadata[k]
        sel = json.loads(src.metadata.get("selection", "{}") or "{}")
        return {**sel.get("detection", {}), "copied_from": Path(args.detector).name}
    chosen = int(ds.metadata["chosen_layer"])
    det = calibrate_detection(
        acts.means.diff[chosen].float(),
        acts.val_pos,
        acts.val_neg,
        default_layers(n_layers),
        args.detect_fpr,
        prefer=chosen,
        check=(acts.train_pos, acts.train_neg),
    )
    apply_detection(ds, det)
    return det.record


def _confirmed(args, lm, acts, rows, prompts) -> tuple[list[dict], dict[str, dict]]:
    """The candidates to confirm and their confirm figures; figures already in ``study_dir``/confirm.json
    for the same token count and prompt count are reused, new ones are measured and added there."""
    from directions.extract import build_prompts
    from directions.measure import Measurements
    from directions.search import build_from_row, pareto_candidates
    from directions.search_confirm import confirm
    from server.engine.offline import engine_generate

    if args.confirm_trials:
        wanted = {int(x) for x in args.confirm_trials.split(",")}
        cands = [r for r in rows if r["number"] in wanted]
    else:
        cands = pareto_candidates(rows, args.kl_budget, args.confirm_top)
    if not cands:
        cands = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl"])[:1]
    cache_path = Path(args.study_dir) / "confirm.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    n = len(prompts.harmful_val)
    fits = lambda f: f.get("tokens") == args.confirm_tokens and f.get("n") == n  # noqa: E731
    labels = [f"t{r['number']}" for r in cands] + ["base"] * args.confirm_base
    todo = [r for r in cands if not fits(cache.get(f"t{r['number']}", {}))]
    need_base = args.confirm_base and not fits(cache.get("base", {}))
    if todo or need_base:
        sets = {f"t{r['number']}": build_from_row(acts, r, f"t{r['number']}") for r in todo}
        gen = engine_generate(lm.model, lm.tokenizer, batch_size=args.batch_size)
        m = Measurements(lm.model, lm.tokenizer, gen)
        ids = lambda texts: build_prompts(lm.tokenizer, texts)  # noqa: E731
        harmful, harmless = ids(prompts.harmful_val), ids(prompts.harmless_val)
        cache |= confirm(m, sets, harmful, harmless, args.confirm_tokens, 1.0, need_base)
        cache_path.write_text(json.dumps(cache, indent=1))
    return cands, {k: cache[k] for k in labels}


def run(args: argparse.Namespace) -> int:
    from directions.files import read_lines, sha256_file
    from directions.models import load_model
    from directions.search import SearchPrompts, build_from_row
    from directions.search_confirm import pick_winner

    t0 = time.monotonic()
    files = {"positive": args.positive, "negative": args.negative}
    files |= {"val_positive": args.val_positive, "val_negative": args.val_negative}
    prompts = SearchPrompts(*(read_lines(files[k]) for k in ("positive", "negative", "val_positive", "val_negative")))
    prompts = prompts.thinned(args.train_n)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    n_layers = lm.model.config.num_hidden_layers
    acts, rows, ref_ids = _study(args, lm, prompts, n_layers)
    cands, figs = _confirmed(args, lm, acts, rows, prompts)
    winner, warning = pick_winner(figs, args.kl_budget)
    row = next(r for r in cands if f"t{r['number']}" == winner)
    ds = build_from_row(acts, row, args.name)
    record = {
        "objective": "refusal",
        "search": "optuna TPE, two objectives: refusals in short greedy replies (+ refusal-token mass / 10) on "
        "harmful val, first-token KL on harmless val",
        "proxy_tokens": args.proxy_tokens,
        "trials": len(rows),
        "proxy_n": args.proxy_n,
        "refusal_tokens": [lm.tokenizer.decode([i]) for i in ref_ids],
        "kl_budget": args.kl_budget,
        "n_train": [acts.means.n_pos, acts.means.n_neg],
        "n_val": [len(prompts.harmful_val), len(prompts.harmless_val)],
        "confirm": figs,
        "chosen": winner,
        "chosen_trial": {k: row[k] for k in ("number", "refusal", "refusal_mass", "kl", "label", "params")},
    }
    if warning:
        record["warning"] = warning
    det = _detect(args, ds, acts, n_layers)
    if det is not None:
        record["detection"] = det
    ds.metadata |= {
        "objective": "refusal",
        "candidate": row["label"],
        "model": args.model,
        "prompt_hashes": json.dumps({r: {"file": Path(p).name, "sha256": sha256_file(p)} for r, p in files.items()}),
        "selection": json.dumps(record),
        "eval": json.dumps(figs[winner]),
        "strength": "1.0",  # the strength the search and the confirm stage measured
        "extract_wall_s": str(round(time.monotonic() - t0, 1)),
    }
    _write(args, ds, lm, rows, figs, winner)
    return 0


def _write(args, ds, lm, rows, figs, winner) -> None:
    from directions.fileformat import save_direction
    from directions.search_confirm import plot_pareto

    out = Path(args.out)
    save_direction(ds, out, config=lm.model.config)
    png = plot_pareto(rows, figs, winner, args.kl_budget, out.with_suffix(".pareto.png"))
    md = ds.public_metadata()
    md.pop("n_layers", None), md.pop("d_model", None), md.pop("conditional", None)
    out.with_suffix(".selection.json").write_text(json.dumps(md, indent=1))
    print(f"wrote {out}, {png} and {out.with_suffix('.selection.json')}")
    for k, f in figs.items():
        mark = "  <- winner" if k == winner else ""
        print(
            f"  {k:>6}  refusals {f['refusals']}/{f['n']} ({f['tokens']} tok)  first-token KL {f['first_token_kl']}{mark}"
        )
