#!/usr/bin/env python
"""Where does first-token KL on harmless prompts come from: answers, or over-refusals?

For each prompt file, the unedited model's greedy reply (``--label-tokens``, 32) is judged
refused or answered (the project's refusal judge), and each direction file's edits are applied
at ``--strength`` to every prompt: the file's own edit (``always``) and, where the file has one,
its firing-case edit (what a ``when: auto`` row gets when its condition fires). Per file and
direction it prints the mean first-token KL(P_orig || P_edited) over all prompts, its share from
the prompts the model refuses itself (removing such a refusal moves the first token, and the
metric counts that as damage), and the ``auto`` KL (the firing-case edit's KL on the prompts the
probe condition fires on, zero elsewhere, over all prompts) split the same way. Writes JSON with
the per-prompt figures.

    python scripts/kl_breakdown.py refusal=directions/shipped/qwen-demo-refusal.safetensors \\
        --out kl-breakdown.json          # the harmless validation files by default
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.detection import fire_counts, probe_fires  # noqa: E402
from directions.extract import build_prompts  # noqa: E402
from directions.fileformat import DirectionFileError  # noqa: E402
from directions.files import read_lines  # noqa: E402
from directions.forward import forward_last  # noqa: E402
from directions.generation import Generation  # noqa: E402
from directions.kl import first_token_kl  # noqa: E402
from directions.models import load_model  # noqa: E402
from directions.refusal import PROMPTS_DIR, is_refusal  # noqa: E402
from directions.specs import load_directions, parse_direction_specs  # noqa: E402
from server.engine.offline import engine_generate  # noqa: E402

R = PROMPTS_DIR / "refusal"
DEFAULT_FILES = ("harmless_val.txt", "harmless_val_hard.txt")


def edit_key(ds) -> str:
    """Two direction files that differ only in their condition apply the same edit: one pass serves both."""
    h = hashlib.sha256(ds.directions.to(torch.float32).contiguous().numpy().tobytes())
    h.update(ds.writer_weights().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def split_mean(values: list[float], refused: list[bool]) -> dict[str, float]:
    """Mean over all prompts, and the parts of that mean from refused and answered prompts
    (the two parts add up to the mean), with the per-group means."""
    n = len(values)
    on_ref = [v for v, r in zip(values, refused, strict=True) if r]
    on_ans = [v for v, r in zip(values, refused, strict=True) if not r]
    return {
        "mean": sum(values) / n if n else 0.0,
        "from_refused": sum(on_ref) / n if n else 0.0,
        "from_answered": sum(on_ans) / n if n else 0.0,
        "mean_refused": sum(on_ref) / len(on_ref) if on_ref else 0.0,
        "mean_answered": sum(on_ans) / len(on_ans) if on_ans else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directions", nargs="+", metavar="NAME=FILE", help="direction files")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", nargs="+", metavar="FILE", help="harmless prompt files (default: validation)")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--label-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="kl-breakdown.json")
    args = ap.parse_args(argv)
    try:
        dirs = load_directions(parse_direction_specs(args.directions))
    except DirectionFileError as e:
        ap.error(str(e))
    files = args.prompts or [str(R / f) for f in DEFAULT_FILES]
    lm = load_model(args.model)
    gen = engine_generate(lm.model, lm.tokenizer, args.batch_size)
    t0 = time.monotonic()
    res: dict = {"strength": args.strength, "label_tokens": args.label_tokens, "files": {}}
    for path in files:
        ids = build_prompts(lm.tokenizer, read_lines(path))
        replies = gen({}, [Generation(p, args.label_tokens) for p in ids], desc=f"unedited replies ({Path(path).name})")
        refused = [is_refusal(r.text) for r in replies]
        base, states = forward_last(lm.model, lm.tokenizer, ids, states=True, batch_size=args.batch_size)
        row: dict = {"n": len(ids), "refused": refused, "directions": {}}
        cache: dict[str, list[float]] = {}  # per file: edit -> per-prompt KL

        def kl_of(edit, ids=ids, base=base, cache=cache) -> list[float]:
            key = edit_key(edit)
            if key not in cache:
                s = {edit.name: [args.strength] * len(ids)}
                logits, _ = forward_last(lm.model, lm.tokenizer, ids, {edit.name: edit}, s, batch_size=args.batch_size)
                cache[key] = first_token_kl(base, logits)[1]
            return cache[key]

        for name, ds in dirs.items():
            kl_own = kl_of(ds)
            d: dict = {"always": split_mean(kl_own, refused), "kl_always": kl_own}
            kl_fire = kl_own
            if ds.auto_edit is not None:
                kl_fire = kl_of(ds.auto_edit)
                d["firing_edit_always"] = split_mean(kl_fire, refused)
                d["kl_firing_edit"] = kl_fire
            if ds.uses_probe:
                fired = probe_fires(ds, states, base)
                d["fired"] = fired
                d.update(fire_counts(fired, refused))
                d["auto"] = split_mean([k if f else 0.0 for k, f in zip(kl_fire, fired, strict=True)], refused)
            row["directions"][name] = d
        res["files"][Path(path).name] = row
    res["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"strength {args.strength}; KL = mean first-token KL over the file = part from refused + part from answered")
    print(
        f"{'file':<24} {'n':>4} {'refused':>7} {'direction':<12} {'edit':<18} {'KL':>7} "
        f"{'from refused':>12} {'from answered':>13} {'per refused':>11} {'per answered':>12} {'fires (ref+ans)':>16}"
    )
    for fname, row in res["files"].items():
        nref = sum(row["refused"])
        for name, d in row["directions"].items():
            for key in ("always", "firing_edit_always", "auto"):
                if key not in d:
                    continue
                m = d[key]
                fires = f"{d['fires_refused'] + d['fires_answered']} ({d['fires_refused']}+{d['fires_answered']})"
                print(
                    f"{fname:<24} {row['n']:>4} {nref:>7} {name:<12} {key:<18} {m['mean']:>7.4f} "
                    f"{m['from_refused']:>12.4f} {m['from_answered']:>13.4f} {m['mean_refused']:>11.4f} "
                    f"{m['mean_answered']:>12.4f} {fires if key == 'auto' else '':>16}"
                )
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
