"""``frankly calibrate``: (re)calibrate the condition of an existing direction file.

Conditional ablation (``when: auto``) needs a detection vector, a layer and a
threshold, and optionally a term on the unedited next-token distribution.
``frankly extract`` calibrates them as its last step; this command does only
that step for a file that already exists, in a few minutes (prefill passes, and
one short greedy reply per validation positive to label the ones the model
refuses): with other prompt sets, another firing-rate target, or after a change
in how detection is chosen. The ablation directions themselves are not touched.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from directions.files import read_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: 'demo', a directory, a .gguf file or a hub id")
    p.add_argument("--direction", required=True, help="the direction file to calibrate")
    p.add_argument("--positive", required=True, help="train prompts that should fire (harmful / slop-inducing)")
    p.add_argument("--negative", required=True, help="train prompts that should not fire (harmless / plain)")
    p.add_argument(
        "--val-positive",
        required=True,
        nargs="+",
        metavar="FILE",
        help="validation prompts that should fire (1+ files)",
    )
    p.add_argument(
        "--val-negative",
        required=True,
        nargs="+",
        metavar="FILE",
        help="validation prompts that should not fire: they set the threshold (1+ files, e.g. the plain harmless "
        "split and one of edgy harmless framings)",
    )
    p.add_argument("--system-positive", help="system prompts for the positive side; prompt k gets line k mod n")
    p.add_argument("--system-negative", help="system prompts for the negative side")
    p.add_argument("--fpr", type=float, default=0.02, help="max firing rate on --val-negative (default 0.02)")
    p.add_argument("--layers", help="candidate detection layers, e.g. '8-20' (default: middle 20%%-80%% of depth)")
    p.add_argument(
        "--count-positives",
        choices=["auto", "all", "refused"],
        default="auto",
        help="which validation positives the firing rate counts: all, or those the unedited model refuses "
        "(greedy, --label-tokens, the refusal judge); auto: refused for a refusal direction, else all",
    )
    p.add_argument(
        "--count-negatives",
        choices=["auto", "all", "answered"],
        default="all",
        help="which validation negatives set the threshold: all, or those the unedited model answers (greedy, "
        "--label-tokens, the refusal judge: firing on a harmless prompt the model would refuse anyway removes an "
        "over-refusal, so it is not counted as a false positive); auto: answered for a refusal direction, else all",
    )
    p.add_argument(
        "--next-token",
        default="auto",
        help="the condition's next-token term: 'none', a comma-separated list of token strings (e.g. 'I,Sorry'), "
        "or 'auto': for a refusal direction, the first tokens of the unedited model's refusals of the "
        "validation positives (weight 0 = probe alone is always a candidate)",
    )
    p.add_argument("--label-tokens", type=int, default=32, help="tokens generated per positive to label refusals")
    p.add_argument("--out", help="output file (default: rewrite --direction in place, atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def _read_all(paths: str | list[str]) -> list[str]:
    """The prompts of one file or of several, in order."""
    return [x for p in ([paths] if isinstance(paths, str) else paths) for x in read_lines(p)]


def run(args: argparse.Namespace) -> int:
    import torch

    from directions.detection import LogitFeatures, apply_detection, calibrate_detection, logit_term
    from directions.extract import build_prompts, default_layers, parse_layers
    from directions.fileformat import load_direction, save_direction
    from directions.files import sha256_file
    from directions.forward import forward_last
    from directions.generation import Generation
    from directions.models import load_model
    from directions.refusal import is_refusal
    from server.engine.offline import engine_generate

    t0 = time.monotonic()
    ds = load_direction(args.direction)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ds.check_fits(lm.model.config, args.direction)
    n_layers = lm.model.config.num_hidden_layers
    layers = parse_layers(args.layers, n_layers) if args.layers else default_layers(n_layers)
    sys_p, sys_n = (read_lines(p) if p else None for p in (args.system_positive, args.system_negative))

    refusal = ds.metadata.get("objective", "refusal") == "refusal"
    prompts = {
        k: build_prompts(lm.tokenizer, _read_all(paths), systems)
        for k, paths, systems in (
            ("tr_p", args.positive, sys_p),
            ("tr_n", args.negative, sys_n),
            ("va_p", args.val_positive, sys_p),
            ("va_n", args.val_negative, sys_n),
        )
    }
    # label the refused validation positives (and find the refusals' first tokens) before the prefills,
    # so each prefill's logits shrink to the next-token term at once instead of being held (N x vocab)
    generate = engine_generate(lm.model, lm.tokenizer, args.batch_size)

    def label(key: str, desc: str):
        """The unedited model's greedy replies to one prompt set, and which of them refuse."""
        replies = generate({}, [Generation(p, args.label_tokens) for p in prompts[key]], desc=desc)
        return replies, [is_refusal(r.text) for r in replies]

    count = args.count_positives if args.count_positives != "auto" else ("refused" if refusal else "all")
    pos_mask, first_tokens = None, []
    if count == "refused" or (args.next_token == "auto" and refusal):
        replies, refused = label("va_p", "unedited replies (val +)")
        first_tokens = [r.token_ids[0] for r, f in zip(replies, refused, strict=True) if f and r.token_ids]
        print(f"the unedited model refuses {sum(refused)} of {len(refused)} validation positives")
        if count == "refused" and any(refused):
            pos_mask = torch.tensor(refused)
        elif count == "refused":
            print("so the firing rate counts all of them")
    count_neg = args.count_negatives if args.count_negatives != "auto" else ("answered" if refusal else "all")
    neg_keep = None
    if count_neg == "answered":
        _, neg_refused = label("va_n", "unedited replies (val -)")
        print(
            f"the unedited model refuses {sum(neg_refused)} of {len(neg_refused)} validation negatives: "
            "the threshold is set on the others"
        )
        if all(neg_refused):
            print("so the threshold is set on all of them")
        else:
            neg_keep = [i for i, f in enumerate(neg_refused) if not f]
    tokens = _next_tokens(args.next_token, lm.tokenizer, first_tokens, refusal)
    labels = {"tr_p": "train (+)", "tr_n": "train (-)", "va_p": "val (+)", "va_n": "val (-)"}
    st, lt = {}, {}
    for k, p in prompts.items():
        logits, st[k] = forward_last(
            lm.model, lm.tokenizer, p, states=True, batch_size=args.batch_size, desc=f"{labels[k]} prefill"
        )
        if tokens:
            lt[k] = logit_term(logits, tokens)
        del logits
    if neg_keep is not None:
        st["va_n"] = st["va_n"][neg_keep]
        if tokens:
            lt["va_n"] = lt["va_n"][neg_keep]
    logit = None
    if tokens:
        logit = LogitFeatures(tuple(tokens), lt["va_p"], lt["va_n"], lt["tr_p"], lt["tr_n"])
        print("next-token term on " + ", ".join(repr(lm.tokenizer.decode([t])) for t in tokens))
    chosen = int(ds.metadata.get("chosen_layer", layers[len(layers) // 2]))
    det = calibrate_detection(
        ds.directions[chosen],
        st["va_p"],
        st["va_n"],
        layers,
        args.fpr,
        prefer=chosen,
        check=(st["tr_p"], st["tr_n"]),
        logit=logit,
        pos_mask=pos_mask,
    )
    apply_detection(ds, det)
    sel = json.loads(ds.metadata.get("selection", "{}") or "{}")
    if "detection" in sel:
        sel["previous_detection"] = {k: v for k, v in sel["detection"].items() if k not in ("layers", "candidates")}
    det.record["calibrated_by"] = "frankly calibrate"
    det.record["negatives_counted"] = count_neg
    if neg_keep is not None:
        det.record["val_negatives_refused_by_model"] = len(prompts["va_n"]) - len(neg_keep)
    hashed = lambda p: {"file": Path(p).name, "sha256": sha256_file(p)}  # noqa: E731
    det.record["prompt_hashes"] = {"positive": hashed(args.positive), "negative": hashed(args.negative)}
    for role in ("val_positive", "val_negative"):
        paths = getattr(args, role)
        det.record["prompt_hashes"][role] = hashed(paths[0]) if len(paths) == 1 else [hashed(p) for p in paths]
    sel["detection"] = det.record
    ds.metadata["selection"] = json.dumps(sel)
    ds.metadata["detect_calibrated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = save_direction(ds, args.out or args.direction, config=lm.model.config)

    print(f"{'kind':>10} {'layer':>5} {'next-tok w':>10} {'threshold':>10} {'fire +':>7} {'fire -':>7} {'AUC':>6}")
    top = sorted(det.record["candidates"], key=lambda c: (-c["fire_pos"], -c["auc"], c["fire_neg"]))[:12]
    r = det.record
    for c in top:
        key = (c["kind"], c["layer"], c["logit_weight"])
        mark = "  <- chosen" if key == (r["chosen_kind"], r["chosen_layer"], r["chosen_logit_weight"]) else ""
        print(
            f"{c['kind']:>10} {c['layer']:>5} {c['logit_weight']:>10g} {c['threshold']:>10.4f} "
            f"{c['fire_pos']:>7.1%} {c['fire_neg']:>7.1%} {c['auc']:>6.3f}{mark}"
        )
    print(
        f"\nwrote {out}: {r['chosen_kind']} at layer {r['chosen_layer']}, next-token weight "
        f"{r['chosen_logit_weight']:g}, threshold {r['threshold']}; "
        f"validation fires on {r['val_fire_pos']:.1%} of positives and {r['val_fire_neg']:.1%} of negatives "
        f"(train: {r['train_fire_pos']:.1%} / {r['train_fire_neg']:.1%}) in {time.monotonic() - t0:.0f} s"
    )
    return 0


def _next_tokens(spec: str, tokenizer, first_tokens: list[int], refusal: bool) -> list[int]:
    """Token ids of the next-token term: none, the given strings (each must be one token), or (auto,
    refusal) the first tokens of at least two of the unedited model's refusals, the five most common."""
    from collections import Counter

    if spec == "none" or (spec == "auto" and not refusal):
        return []
    if spec == "auto":
        return [t for t, c in Counter(first_tokens).most_common(5) if c >= 2]
    out = []
    for word in (w for w in spec.split(",") if w):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise SystemExit(f"--next-token: {word!r} is {len(ids)} tokens for this tokenizer, not one")
        out.append(ids[0])
    return out
