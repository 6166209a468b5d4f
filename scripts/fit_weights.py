#!/usr/bin/env python
"""Fit a direction's per-writer weights by gradient descent (issue #15), then confirm on validation.

The direction itself stays fixed; its (attention output, MLP down projection, embedding) x layer
weights are fitted on the **train** split (:mod:`directions.fit`: the teacher-forced probability
of the plain model's own refusal prefix on the harmful prompts it refuses, plus lambda x
first-token KL on harmless ones, lambda raised in stages). Each stage's weights are a candidate; the candidates and the source file are
confirmed on the **validation** split (greedy replies to every harmful val prompt judged by the
refusal markers, first-token KL on every harmless val prompt), and the winner (the lowest KL
among candidates refusing at most ``--max-extra-refusals`` more prompts than the source, if
that is below the source's KL) is written to ``--out`` with the source file's condition. The test split is never read.

Output in ``--out-dir``: ``fit-lamL.safetensors`` per stage, ``fit.json`` (every step's figures,
the confirm figures, the winner) and ``fit.png`` (fitted weights per layer; each layer's cosine to the source direction when it was fitted; confirmed refusals vs
KL).

    python scripts/fit_weights.py --direction directions/shipped/qwen-demo-refusal.safetensors \\
        --out-dir fit-refusal --out fitted-refusal.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from directions.extract import build_prompts  # noqa: E402
from directions.fileformat import COMPONENTS, load_direction, save_direction  # noqa: E402
from directions.files import read_lines, sha256_file  # noqa: E402
from directions.fit import DIRECTION_MODES, FitConfig, fit_weights, with_weights  # noqa: E402
from directions.forward import pad_id, pad_left  # noqa: E402
from directions.refusal import PROMPTS_DIR, is_refusal  # noqa: E402

R = PROMPTS_DIR / "refusal"


@torch.inference_mode()
def plain_replies(model, tok, prompts, n_tokens: int, batch: int = 16) -> list[list[int]]:
    """The unedited model's greedy reply tokens (at most ``n_tokens``, up to EOS) to each prompt."""
    pad, out = pad_id(tok), []
    eos = tok.eos_token_id
    for a in range(0, len(prompts), batch):
        ids, mask, _ = pad_left(prompts[a : a + batch], pad, next(model.parameters()).device)
        seq = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False, pad_token_id=pad
        )[:, ids.shape[1] :]
        for row in seq.tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
        print(f"plain replies {min(a + batch, len(prompts))}/{len(prompts)}", flush=True)
    return out


def non_answer_openings(tok, path: str, refusal_prefixes: list[list[int]]) -> list[list[int]]:
    """The openings in ``path`` as reply tokens ([] for "none"). An opening that a refusal prefix starts
    with, or that starts with one, is left out: the prefix set's probabilities are summed, which
    needs disjoint events."""
    if path.lower() == "none":
        return []
    out = []
    for line in read_lines(path):
        ids = tok.encode(line, add_special_tokens=False)
        clash = any(ids[: len(p)] == p or p[: len(ids)] == ids for p in refusal_prefixes + out)
        if ids and not clash:
            out.append(ids)
    return out


def pick(figs: dict[str, dict], extra: int) -> tuple[str, str | None]:
    """(winner, warning or None): the lowest-KL candidate refusing or not answering (non-answers count
    as refusals) at most ``extra`` more validation prompts than the source file; the source itself
    when no fitted candidate does that at a lower KL."""
    from directions.search_confirm import misses

    limit = misses(figs["source"]) + extra
    ok = [k for k, f in figs.items() if k != "source" and misses(f) <= limit]
    best = min(ok, key=lambda k: figs[k]["first_token_kl"], default=None)
    if best is None or figs[best]["first_token_kl"] >= figs["source"]["first_token_kl"]:
        return "source", (
            f"no fitted candidate refuses or deflects <= {limit} validation prompts at a lower KL than the source"
        )
    return best, None


def plot(stages, figs: dict, winner: str, path: Path, records: dict[float, dict] | None = None) -> Path:
    """Fitted weights per layer, (when the direction was fitted) each layer's cosine to the source
    direction (``records[lambda]["direction_cos_to_source"]``), and the confirmed candidates'
    refusals against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from directions.plots import save_figure
    from directions.search_confirm import confirmed_panel

    cosines = {
        lam: r["direction_cos_to_source"] for lam, r in (records or {}).items() if "direction_cos_to_source" in r
    }
    fitted = bool(cosines)
    fig, axes = plt.subplots(1, 3 if fitted else 2, figsize=(16 if fitted else 11, 4.2))
    a, b = axes[0], axes[-1]
    for k, st in enumerate(stages):
        w = st.weights
        a.plot(w[COMPONENTS.index("attn")].tolist(), "-", c=f"C{k}", label=f"attn, lambda={st.lam:g}")
        a.plot(w[COMPONENTS.index("mlp")].tolist(), "--", c=f"C{k}", label=f"mlp, lambda={st.lam:g}")
    a.axhline(1.0, color="grey", ls=":", lw=0.8)
    a.set_xlabel("layer")
    a.set_ylabel("fitted writer weight (1 = the flat source file)")
    a.set_title("fitted weights per stage (train split)", fontsize=9)
    a.legend(fontsize=6, ncol=2)
    if fitted:
        c = axes[1]
        for k, st in enumerate(stages):
            if st.lam in cosines:
                c.plot(cosines[st.lam], "o-", c=f"C{k}", ms=3, label=f"lambda={st.lam:g}")
        c.set_xlabel("layer")
        c.set_ylabel("cos(fitted direction, source direction)")
        c.set_title("how far the fit turned each layer's direction", fontsize=9)
        c.grid(alpha=0.3)
        c.legend(fontsize=7)
    confirmed_panel(b, figs, winner, "confirmed on the validation split")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--direction", required=True, help="the direction file whose writer weights are fitted")
    ap.add_argument("--out", help="write the confirmed winner here (with the source file's condition)")
    ap.add_argument("--out-dir", default="fit-out")
    ap.add_argument("--positive", default=str(R / "harmful_train.txt"))
    ap.add_argument("--negative", default=str(R / "harmless_train.txt"))
    ap.add_argument("--val-positive", default=str(R / "harmful_val.txt"))
    ap.add_argument("--val-negative", default=str(R / "harmless_val.txt"))
    ap.add_argument("--lambdas", default="2,5,12,30", help="KL weight of each stage, in order (warm-started)")
    ap.add_argument("--steps", type=int, default=12, help="optimiser steps per stage")
    ap.add_argument("--batch", type=int, default=12, help="harmful and harmless train prompts per step (each)")
    ap.add_argument("--lr", type=float, default=0.15)
    ap.add_argument("--w-max", type=float, default=2.0)
    ap.add_argument(
        "--smooth", type=float, default=0.0, help="penalty on squared layer-to-layer weight differences (0: none)"
    )
    ap.add_argument("--no-embedding", action="store_true", help="keep the embedding's weight as in the file")
    ap.add_argument(
        "--init-from-file",
        action="store_true",
        help="start from the file's own writer weights (refine a fitted file) instead of every weight 1",
    )
    ap.add_argument(
        "--fit-direction",
        choices=DIRECTION_MODES,
        default="none",
        help="fit the direction too: one rotation for every layer (shared) or one direction per layer (per-layer)",
    )
    ap.add_argument("--direction-lr", type=float, default=0.003, help="Adam learning rate of the direction's offset")
    ap.add_argument(
        "--direction-reg", type=float, default=1.0, help="penalty weight on mean(1 - cos(fitted, source direction))"
    )
    ap.add_argument("--label-tokens", type=int, default=24, help="plain greedy reply length that labels refusals")
    ap.add_argument("--prefix-tokens", type=int, default=4, help="refusal prefix tokens scored teacher-forced")
    ap.add_argument(
        "--refusal-prefixes",
        type=int,
        default=1,
        help="score each harmful prompt's own refusal prefix plus the N-1 most common other ones "
        "(e.g. 'As an AI language' beside 'I'm sorry, but'); 1: its own only",
    )
    ap.add_argument(
        "--non-answer-openings",
        default=str(R / "non_answer_openings.txt"),
        help="a file of non-answer reply openings ('I'm glad I could help') added to every harmful prompt's "
        "penalised prefixes, so the fit cannot trade refusals for deflections; 'none': off",
    )
    ap.add_argument(
        "--comply-tokens",
        type=int,
        default=8,
        help="compliance term: the first N tokens of the source file's own answer (at --comply-strength) to "
        "each refused harmful prompt are scored as a target, so a non-answer cannot meet the refusal term; 0: off",
    )
    ap.add_argument("--comply-strength", type=float, default=1.0)
    ap.add_argument("--comply-weight", type=float, default=1.0, help="weight of the compliance term's per-token NLL")
    ap.add_argument("--confirm-tokens", type=int, default=64)
    ap.add_argument(
        "--max-extra-refusals",
        type=int,
        default=1,
        help="the winner may refuse at most this many more validation prompts than the source file",
    )
    ap.add_argument("--batch-size", type=int, default=16, help="confirm generation batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from directions.models import load_model
    from directions.search_confirm import confirm

    t0 = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = load_direction(args.direction)
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    src.check_fits(model.config, args.direction)
    harmful = build_prompts(tok, read_lines(args.positive))
    harmless = build_prompts(tok, read_lines(args.negative))
    replies = plain_replies(model, tok, harmful, args.label_tokens)
    refused = [i for i, r in enumerate(replies) if len(r) and is_refusal(tok.decode(r, skip_special_tokens=True))]
    if not refused:
        print("the plain model refuses none of the harmful train prompts: nothing to fit", file=sys.stderr)
        return 2
    fit_on = [harmful[i] for i in refused]
    own = [replies[i][: args.prefix_tokens] for i in refused]
    common = [list(t) for t, _ in Counter(tuple(x) for x in own).most_common()]
    prefixes = [[x, *[c for c in common if c != x][: max(0, args.refusal_prefixes - 1)]] for x in own]
    openings = non_answer_openings(tok, args.non_answer_openings, own)
    prefixes = [p + openings for p in prefixes]
    if openings:
        print("penalised non-answer openings: " + ", ".join(repr(tok.decode(o)) for o in openings), flush=True)
    if args.refusal_prefixes > 1:
        print(
            "common refusal prefixes: " + ", ".join(repr(tok.decode(c)) for c in common[: args.refusal_prefixes]),
            flush=True,
        )
    print(
        f"fitting on the {len(refused)} of {len(harmful)} harmful train prompts the plain model refuses "
        f"({args.label_tokens}-token greedy replies), prefixes of {args.prefix_tokens} tokens, e.g. "
        f"{tok.decode(own[0])!r}",
        flush=True,
    )
    cfg = FitConfig(
        lambdas=tuple(float(x) for x in args.lambdas.split(",") if x.strip()),
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        w_max=args.w_max,
        seed=args.seed,
        fit_embedding=not args.no_embedding,
        init_from_file=args.init_from_file,
        comply_weight=args.comply_weight,
        smooth=args.smooth,
        direction=args.fit_direction,
        direction_lr=args.direction_lr,
        direction_reg=args.direction_reg,
    )

    def progress(stage, step, steps, f):
        cos = f"  min cos to source {f['min_cos']:.4f}" if "min_cos" in f else ""
        comply_s = f"  comply nll {f['comply_nll']:.3f}" if "comply_nll" in f else ""
        print(
            f"[{stage}] step {step}/{steps}: loss {f['loss']:.4f}  refusal term {f['refusal_term']:.4f}  "
            f"mass {f['mass']:.4f}  kl {f['kl']:.4f}{cos}{comply_s}  ({f['s']} s)",
            flush=True,
        )

    from directions.measure import Job, Measurements
    from directions.strengths import DirectionRequest
    from server.engine.offline import engine_generate

    m = Measurements(model, tok, engine_generate(model, tok, batch_size=args.batch_size))
    comply = None
    if args.comply_tokens > 0:
        m.set_directions({"source": src})
        job = Job(("comply",), fit_on, args.label_tokens, {"source": DirectionRequest(args.comply_strength)})
        answers = m.generate([job], desc="compliant openings (source file)")[("comply",)]
        comply = [None if is_refusal(a.text) else a.token_ids[: args.comply_tokens] or None for a in answers]
        n_c = sum(c is not None for c in comply)
        first = next((c for c in comply if c), None)
        print(
            f"compliance targets: {n_c} of {len(fit_on)} (the source file at strength {args.comply_strength:g} "
            f"answers them), e.g. {tok.decode(first)!r}"
            if first
            else "compliance targets: none",
            flush=True,
        )
    stages = fit_weights(model, tok, src, fit_on, harmless, prefixes, cfg, progress, comply=comply)
    base_record = {
        "source": Path(args.direction).name,
        "source_sha256": sha256_file(args.direction),
        "objective": "mean -log(1 - P(plain refusal prefix"
        + (" or non-answer opening" if openings else "")
        + ")) on refused harmful train + lambda * first-token KL "
        "on harmless train"
        + ("" if comply is None else f" + {cfg.comply_weight:g} * per-token NLL of the source file's answer opening")
        + ("" if cfg.direction == "none" else f" + {cfg.direction_reg:g} * mean(1 - cos(direction, source direction))"),
        "prefix_tokens": args.prefix_tokens,
        "refusal_prefixes": args.refusal_prefixes,
        "non_answer_openings": [tok.decode(o) for o in openings],
        "comply": None
        if comply is None
        else {
            "tokens": args.comply_tokens,
            "strength": args.comply_strength,
            "weight": args.comply_weight,
            "n": sum(c is not None for c in comply),
        },
        "label_tokens": args.label_tokens,
        "n_fit": [len(fit_on), len(harmless)],
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "train_files": [Path(args.positive).name, Path(args.negative).name],
    }
    sets, records = {}, {}
    by_label = {f"lam{st.lam:g}": st for st in stages}
    for label, st in by_label.items():
        records[label] = {**base_record, "lambda": st.lam}
        if st.directions is not None:  # unit rows, as the source's
            cos = (st.directions * src.directions).sum(-1)
            records[label]["direction_cos_to_source"] = [round(float(c), 5) for c in cos]
        sets[label] = with_weights(src, st.weights, records[label], st.directions)
        save_direction(sets[label], out_dir / f"fit-{label}.safetensors", model.config)
    print(
        f"fit done in {time.monotonic() - t0:.0f} s; confirming {len(sets)} candidates + the source on validation",
        flush=True,
    )
    vh = build_prompts(tok, read_lines(args.val_positive))
    vn = build_prompts(tok, read_lines(args.val_negative))
    figs = confirm(m, {"source": src, **sets}, vh, vn, args.confirm_tokens, 1.0)
    winner, warning = pick(figs, args.max_extra_refusals)
    # written before the confirm too, so a failed confirm keeps the fit; again now, with each
    # candidate's own validation figures as its ``eval``
    for label, st in by_label.items():
        records[label]["confirm"] = figs[label]
        ds = with_weights(src, st.weights, records[label], st.directions)
        save_direction(ds, out_dir / f"fit-{label}.safetensors", model.config)
    print(
        f"\n| candidate | refusals of {len(vh)} harmful val ({args.confirm_tokens} tokens) | non-answers | "
        f"first-token KL, {len(vn)} harmless val | commonest openings of the harmful replies |"
    )
    print("|---|---|---|---|---|")
    for k, f in figs.items():
        top = "; ".join(f"{o!r} x{n}" for o, n in f.get("openings", []))
        print(
            f"| {k}{' (winner)' if k == winner else ''} | {f['refusals']} | {f['non_answers']} | "
            f"{f['first_token_kl']:.4f} | {top} |"
        )
    if warning:
        print("warning:", warning)
    res = {
        **base_record,
        "stages": [
            {
                "lambda": st.lam,
                "weights": st.weights.tolist(),
                "history": st.history,
                **(
                    {}
                    if st.directions is None
                    else {"direction_cos_to_source": records[f"lam{st.lam:g}"]["direction_cos_to_source"]}
                ),
            }
            for st in stages
        ],
        "confirm": figs,
        "val_files": [Path(args.val_positive).name, Path(args.val_negative).name],
        "winner": winner,
        "warning": warning,
        "wall_s": round(time.monotonic() - t0),
    }
    (out_dir / "fit.json").write_text(json.dumps(res, indent=1))
    plot(stages, figs, winner, out_dir / "fit.png", {st.lam: records[f"lam{st.lam:g}"] for st in stages})
    if args.out and winner == "source":
        print(f"{args.out} not written: {warning}")
    elif args.out:
        record = {**records[winner], "chosen": winner}
        ds = with_weights(src, by_label[winner].weights, record, by_label[winner].directions)
        save_direction(ds, args.out, model.config)
        print(f"wrote {args.out} ({winner})")
    print(f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
