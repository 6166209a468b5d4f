#!/usr/bin/env python
"""How well can any prefill probe tell refusals to remove from harmless prompts? (train + validation only)

Issue #15 asks ``when: auto`` for both <= 1% refusals and a condition firing on <= 2% of harmless
prompts. A prefill condition is a linear score at one layer (plus, optionally, the next-token
term), so this script measures the best such score can do on this model, out of sample: every
train and validation prompt is labelled by the unedited model (greedy ``--label-tokens``, the
refusal judge), its residual stream is read at every layer, and shrinkage-LDA probes are fitted
and scored by ``--folds``-fold cross-validation (each prompt scored by a probe that never saw it).

Positives are every harmful prompt (as ``frankly calibrate`` trains); recall counts the harmful
prompts the model refuses (those ``auto`` exists for). Per layer, shrinkage and next-token weight
it reports the pooled out-of-fold ROC: the share of refusals caught where the threshold lets at
most ``--fpr`` of the harmless prompts fire, and where it lets at most ``--fpr`` of the harmless
prompts the model *answers* fire (firing on one it refuses itself removes an over-refusal). Misses
are a floor on ``auto``'s refusals from this kind of condition: a row it does not fire on keeps
the plain model's reply. Beside the one-layer probes (what the engines run), ``--stack`` layer sets
are read together by one ridge classifier, linear and with an RBF kernel: a bound on what a richer
prefill condition could gain. Writes JSON and a plot (recall at the target against layer, the best
stacked probe as a dashed line).

    python scripts/probe_ceiling.py --out probe-ceiling.json     # ~30 min on two cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.detection import lda_vector, logit_term, threshold_at_fpr  # noqa: E402
from directions.extract import build_prompts  # noqa: E402
from directions.fileformat import DirectionFileError  # noqa: E402
from directions.files import read_lines  # noqa: E402
from directions.forward import forward_last  # noqa: E402
from directions.generation import Generation  # noqa: E402
from directions.models import load_model  # noqa: E402
from directions.refusal import PROMPTS_DIR, is_refusal  # noqa: E402
from directions.specs import load_directions, parse_direction_specs  # noqa: E402
from server.engine.offline import engine_generate  # noqa: E402

R = PROMPTS_DIR / "refusal"
HARMFUL = ("harmful_train.txt", "harmful_val.txt")
HARMLESS = ("harmless_train.txt", "harmless_train_hard.txt", "harmless_val.txt", "harmless_val_hard.txt")
SHIPPED = ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors"


def recall_at(pos: torch.Tensor, neg: torch.Tensor, fpr: float) -> tuple[float, float]:
    """(share of ``pos`` above the threshold that lets at most ``fpr`` of ``neg`` fire, that threshold)."""
    thr = threshold_at_fpr(neg.tolist(), fpr)
    return (float((pos > thr).float().mean()) if len(pos) else 0.0), thr


def folds_of(n: int, k: int, seed: int) -> torch.Tensor:
    """A fold index in [0, k) for each of n items, balanced, shuffled by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.arange(n)[torch.randperm(n, generator=g)] % k


def stratified_folds(is_pos: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """A fold index in [0, k) per item, positives and negatives folded apart so every fold holds both."""
    pos_idx, neg_idx = torch.nonzero(is_pos).flatten(), torch.nonzero(~is_pos).flatten()
    fold = torch.empty(len(is_pos), dtype=torch.long)
    fold[pos_idx] = folds_of(len(pos_idx), k, seed)
    fold[neg_idx] = folds_of(len(neg_idx), k, seed + 1)
    return fold


def out_of_fold_scores(
    states: torch.Tensor,
    is_pos: torch.Tensor,
    layer: int,
    shrinkage: float,
    k: int,
    seed: int = 0,
    logit: torch.Tensor | None = None,
    weight: float = 0.0,
) -> torch.Tensor:
    """Each prompt's score from an LDA probe fitted on the other folds (positives and negatives
    folded apart, so every fold holds both). With ``logit`` (each prompt's next-token term) and a
    ``weight`` != 0, the score adds ``weight`` times that term, in units of the fold's train
    spread of the two (as ``frankly calibrate`` weighs it)."""
    fold = stratified_folds(is_pos, k, seed)
    x = states[:, layer].float()
    out = torch.empty(len(states))
    for f in range(k):
        train, held = fold != f, fold == f
        v = lda_vector(x[train & is_pos], x[train & ~is_pos], shrinkage)
        score = x @ v
        if logit is not None and weight != 0:
            spread = float(score[train].std()) / max(float(logit[train].std()), 1e-6)
            score = score + weight * spread * logit
        out[held] = score[held]
    return out


def stacked_scores(
    states: torch.Tensor,
    is_pos: torch.Tensor,
    layers: list[int],
    ridge: float,
    k: int,
    seed: int = 0,
    gamma: float | None = None,
) -> torch.Tensor:
    """Out-of-fold scores of one probe over several layers at once: the states of ``layers``
    concatenated, standardised on the train folds, and a ridge-regression classifier (labels +-1)
    fitted in dual form (``n`` train prompts, not ``d`` features, sets the cost). ``gamma`` set: an
    RBF kernel ``exp(-gamma * |a - b|^2 / d)`` instead of the linear one, so a curved boundary gets
    its chance too. ``ridge`` is relative to the kernel's mean diagonal."""
    fold = stratified_folds(is_pos, k, seed)
    x = states[:, layers].reshape(len(states), -1).to(torch.float64)
    y = is_pos.to(torch.float64) * 2 - 1
    out = torch.empty(len(states))
    for f in range(k):
        train = fold != f
        z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        linear = gamma is None
        kern = z @ z[train].T if linear else torch.exp(-gamma * torch.cdist(z, z[train]).square() / z.shape[1])
        kt = kern[train]
        yt = y[train] - y[train].mean()
        reg = ridge * float(kt.diagonal().mean())
        alpha = torch.linalg.solve(kt + reg * torch.eye(len(kt), dtype=kt.dtype), yt)
        out[~train] = (kern[~train] @ alpha).float()
    return out


def _recalls(s: torch.Tensor, harmful: torch.Tensor, refused: torch.Tensor, fpr: float) -> dict:
    """The share (and count missed) of refused harmful prompts that scores ``s`` catch at ``fpr`` of
    all harmless prompts and at ``fpr`` of the answered ones, and how many harmless prompts the
    second threshold lets fire."""
    target = harmful & refused
    r_all, thr_all = recall_at(s[target], s[~harmful], fpr)
    r_ans, thr_ans = recall_at(s[target], s[~harmful & ~refused], fpr)
    return {
        "recall_at_fpr_all": round(r_all, 4),
        "missed_at_fpr_all": int((s[target] <= thr_all).sum()),
        "recall_at_fpr_answered": round(r_ans, 4),
        "missed_at_fpr_answered": int((s[target] <= thr_ans).sum()),
        "harmless_fire_at_answered_threshold": round(float((s[~harmful] > thr_ans).float().mean()), 4),
    }


def stacked_table(
    states: torch.Tensor,
    harmful: torch.Tensor,
    refused: torch.Tensor,
    stacks: dict[str, list[int]],
    ridges: list[float],
    gammas: list[float | None],
    fpr: float,
    k: int,
    seed: int = 0,
) -> list[dict]:
    """One row per (layer set, ridge, kernel): the same two recalls as :func:`ceiling_table`.
    ``stacks`` maps each layer set as written ('8-23') to its layers."""
    rows = []
    for spec, layers in stacks.items():
        for lam in ridges:
            for gamma in gammas:
                s = stacked_scores(states, harmful, layers, lam, k, seed, gamma)
                kernel = "linear" if gamma is None else f"rbf {gamma:g}"
                rows.append({"layers": spec, "ridge": lam, "kernel": kernel, **_recalls(s, harmful, refused, fpr)})
    return rows


def ceiling_table(
    states: torch.Tensor,
    harmful: torch.Tensor,
    refused: torch.Tensor,
    layers: list[int],
    shrinkages: list[float],
    fpr: float,
    k: int,
    logit: torch.Tensor | None = None,
    weights: tuple[float, ...] = (0.0,),
    seed: int = 0,
) -> list[dict]:
    """One row per (layer, shrinkage, weight): out-of-fold recall on refused harmful prompts at
    ``fpr`` of all harmless prompts, and at ``fpr`` of the harmless prompts the model answers."""
    rows = []
    for L in layers:
        for lam in shrinkages:
            for w in weights:
                if w != 0 and logit is None:
                    continue
                s = out_of_fold_scores(states, harmful, L, lam, k, seed, logit, w)
                rows.append({"layer": L, "shrinkage": lam, "logit_weight": w, **_recalls(s, harmful, refused, fpr)})
    return rows


def _best(rows: list[dict], key: str) -> dict:
    return max(rows, key=lambda r: (r[key], -r["layer"]))


def plot(rows: list[dict], fpr: float, path: Path, stacked: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from directions.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    layers = sorted({r["layer"] for r in rows})
    for key, label in (
        ("recall_at_fpr_all", f"fires on <= {fpr:.0%} of all harmless"),
        ("recall_at_fpr_answered", f"fires on <= {fpr:.0%} of answered harmless"),
    ):
        best = [max(r[key] for r in rows if r["layer"] == L) for L in layers]
        line = ax.plot(layers, best, marker="o", label=label)[0]
        if stacked:
            top = max(stacked, key=lambda r: r[key])
            ax.axhline(
                top[key],
                color=line.get_color(),
                ls="--",
                lw=1,
                label=f"layers {top['layers']} together ({top['kernel']}), {label}",
            )
    ax.set_xlabel("detection layer")
    ax.set_ylabel("refusals caught (out of fold)")
    ax.set_ylim(0, 1.02)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title("Best prefill probe per layer (LDA, cross-validated, train + val)")
    ax.legend(loc="lower right", fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--harmful", nargs="+", default=[str(R / f) for f in HARMFUL], metavar="FILE")
    ap.add_argument("--harmless", nargs="+", default=[str(R / f) for f in HARMLESS], metavar="FILE")
    ap.add_argument(
        "--direction",
        default=f"shipped={SHIPPED}",
        metavar="NAME=FILE",
        help="a file whose next-token tokens the probe may add, and whose own condition is reported beside "
        "(in sample: it was fitted and thresholded on these splits); 'none' for neither",
    )
    ap.add_argument("--layers", default="4-23", help="e.g. '4-23' or '13,19,22'")
    ap.add_argument("--shrinkages", default="0.03,0.1,0.3")
    ap.add_argument("--weights", default="0,0.5,1", help="next-token weights to try (0: the probe alone)")
    ap.add_argument(
        "--stack",
        action="append",
        metavar="LAYERS",
        help="a layer set (e.g. '8-23') whose states one probe reads together (ridge classifier); "
        "repeatable; default 12-23 and 8-23; 'none' for none",
    )
    ap.add_argument("--ridges", default="0.1,1", help="ridge strengths of the stacked probes")
    ap.add_argument(
        "--rbf-gammas", default="0.5", help="RBF kernel widths also tried for the stacked probes ('' for linear only)"
    )
    ap.add_argument("--fpr", type=float, default=0.02)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--label-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cache", help="a .pt file: labels and states are read from it if it exists, else written")
    ap.add_argument("--out", default="probe-ceiling.json")
    args = ap.parse_args(argv)
    try:
        layers = _parse_layers(args.layers)
        shrinkages = [float(x) for x in args.shrinkages.split(",")]
        weights = tuple(float(x) for x in args.weights.split(","))
        specs = [] if args.stack == ["none"] else (args.stack or ["12-23", "8-23"])
        stacks = {spec: _parse_layers(spec) for spec in specs}
        ridges = [float(x) for x in args.ridges.split(",")]
        gammas: list[float | None] = [None] + [float(x) for x in args.rbf_gammas.split(",") if x.strip()]
    except ValueError as e:
        ap.error(f"bad --layers/--shrinkages/--weights/--stack/--ridges/--rbf-gammas: {e}")
    if args.folds < 2:
        ap.error("--folds must be >= 2")
    ds = None
    if args.direction != "none":
        try:
            ds = next(iter(load_directions(parse_direction_specs([args.direction])).values()))
        except DirectionFileError as e:
            ap.error(str(e))
    t0 = time.monotonic()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        data = torch.load(cache)
    else:
        data = _collect(args)
        if cache is not None:
            torch.save(data, cache)
    states, harmful, refused, logits = data["states"], data["harmful"], data["refused"], data["logits"]
    for spec, named in {args.layers: layers, **stacks}.items():
        if max(named) >= states.shape[1]:
            ap.error(f"layers {spec!r}: the model has {states.shape[1]} layers")
    tokens = ds.detect_logit_tokens if ds is not None else ()
    logit = logit_term(logits, tokens) if tokens else None
    rows = ceiling_table(states, harmful, refused, layers, shrinkages, args.fpr, args.folds, logit, weights)
    res = {
        "n_harmful": int(harmful.sum()),
        "n_refused_harmful": int((harmful & refused).sum()),
        "n_harmless": int((~harmful).sum()),
        "n_refused_harmless": int((~harmful & refused).sum()),
        "fpr": args.fpr,
        "folds": args.folds,
        "label_tokens": args.label_tokens,
        "files": {"harmful": [Path(p).name for p in args.harmful], "harmless": [Path(p).name for p in args.harmless]},
        "rows": rows,
        "best_all": _best(rows, "recall_at_fpr_all"),
        "best_answered": _best(rows, "recall_at_fpr_answered"),
    }
    stacked = stacked_table(states, harmful, refused, stacks, ridges, gammas, args.fpr, args.folds)
    if stacked:
        res["stacked_rows"] = stacked
        res["best_stacked_all"] = max(stacked, key=lambda r: r["recall_at_fpr_all"])
        res["best_stacked_answered"] = max(stacked, key=lambda r: r["recall_at_fpr_answered"])
    if ds is not None and ds.has_probe:
        from directions.detection import fire_counts, probe_fires

        fired = torch.tensor(probe_fires(ds, states, logits))
        res["file_condition_in_sample"] = {
            side: fire_counts(fired[m].tolist(), refused[m].tolist())
            for side, m in (("harmful", harmful), ("harmless", ~harmful))
        }
    res["wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out)
    out.write_text(json.dumps(res, indent=1))
    plot(rows, args.fpr, out.with_suffix(".png"), stacked)
    _print(res, args.fpr)
    print(f"wrote {out} and {out.with_suffix('.png')} in {res['wall_s']:.0f} s")
    return 0


def _parse_layers(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    if not out or min(out) < 0:
        raise ValueError(f"no layers in {spec!r}")
    return sorted(set(out))


def _collect(args) -> dict:
    lm = load_model(args.model)
    gen = engine_generate(lm.model, lm.tokenizer, args.batch_size)
    texts, harmful = [], []
    for paths, flag in ((args.harmful, True), (args.harmless, False)):
        for p in paths:
            lines = read_lines(p)
            texts += lines
            harmful += [flag] * len(lines)
    ids = build_prompts(lm.tokenizer, texts)
    replies = gen({}, [Generation(p, args.label_tokens) for p in ids], desc="unedited replies")
    logits, states = forward_last(lm.model, lm.tokenizer, ids, states=True, batch_size=args.batch_size, desc="prefill")
    return {
        "states": states,
        "logits": logits,
        "harmful": torch.tensor(harmful),
        "refused": torch.tensor([is_refusal(r.text) for r in replies]),
    }


def _print(res: dict, fpr: float) -> None:
    print(
        f"harmful {res['n_harmful']} (the plain model refuses {res['n_refused_harmful']}), "
        f"harmless {res['n_harmless']} (refuses {res['n_refused_harmless']}); {res['folds']}-fold, out of fold"
    )
    print(f"{'layer':>5} {'best recall, <= fpr of all harmless':>36} {'best recall, <= fpr of answered':>32}")
    for L in sorted({r["layer"] for r in res["rows"]}):
        at = [r for r in res["rows"] if r["layer"] == L]
        a, b = _best(at, "recall_at_fpr_all"), _best(at, "recall_at_fpr_answered")
        print(
            f"{L:>5} {a['recall_at_fpr_all']:>8.1%} (missed {a['missed_at_fpr_all']:>3}, lam {a['shrinkage']:g}, "
            f"w {a['logit_weight']:g}) {b['recall_at_fpr_answered']:>8.1%} (missed {b['missed_at_fpr_answered']:>3})"
        )
    for key in ("best_all", "best_answered"):
        r = res[key]
        print(
            f"{key}: layer {r['layer']}, lam {r['shrinkage']:g}, w {r['logit_weight']:g}: "
            f"{r['recall_at_fpr_all']:.1%} of refusals at <= {fpr:.0%} of all harmless, "
            f"{r['recall_at_fpr_answered']:.1%} at <= {fpr:.0%} of answered harmless "
            f"(which fires on {r['harmless_fire_at_answered_threshold']:.1%} of all harmless)"
        )
    for r in res.get("stacked_rows", []):
        print(
            f"layers {r['layers']} together, ridge {r['ridge']:g}, {r['kernel']}: {r['recall_at_fpr_all']:.1%} "
            f"(missed {r['missed_at_fpr_all']}) at <= {fpr:.0%} of all harmless, {r['recall_at_fpr_answered']:.1%} "
            f"(missed {r['missed_at_fpr_answered']}) at <= {fpr:.0%} of answered harmless"
        )
    if "file_condition_in_sample" in res:
        c = res["file_condition_in_sample"]
        print(f"the file's own condition, in sample: harmful {c['harmful']}, harmless {c['harmless']}")


if __name__ == "__main__":
    raise SystemExit(main())
