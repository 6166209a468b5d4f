#!/usr/bin/env python
"""Which strength should a ``when: auto`` request get by default (the file's ``auto_strength``)?

Measured on the train and validation splits only (the test split stays for final figures):

1. the plain model's greedy replies to every harmful train + validation prompt label which
   ones it refuses (``--label-tokens``, 48);
2. those refused prompts are generated again in ``when: auto`` mode at each strength
   (``--max-tokens``, 64): how many still refuse, and on how many the condition fired;
3. first-token KL on the harmless validation prompts (plain + edgy) with the edit a firing row
   gets (the file's firing-case edit where it has one, else its own edit) always on at each
   strength: the damage a false positive of the condition does.

A refusal that survives ``auto`` is either a miss of the condition (no strength helps) or a
firing prompt the edit is too weak for (a higher strength helps). Prints a table; writes JSON.

    python scripts/auto_strength.py --direction directions/shipped/qwen-demo-refusal.safetensors \\
        --strengths 1,1.25,1.5 --out auto-strength.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.fileformat import edit_sets, firing_name, load_direction  # noqa: E402
from directions.files import read_lines  # noqa: E402
from directions.generation import Generation  # noqa: E402
from directions.measure import Measurements  # noqa: E402
from directions.models import load_model  # noqa: E402
from directions.refusal import PROMPTS_DIR, is_refusal  # noqa: E402
from directions.strengths import DirectionRequest  # noqa: E402
from server.engine.offline import engine_generate  # noqa: E402

R = PROMPTS_DIR / "refusal"
HARMFUL = ("harmful_train.txt", "harmful_val.txt")
HARMLESS = ("harmless_val.txt", "harmless_val_hard.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--direction", required=True, help="a refusal direction file with a condition")
    ap.add_argument("--name", default="refusal")
    ap.add_argument("--strengths", default="1,1.25,1.5")
    ap.add_argument("--label-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="auto-strength.json")
    ap.add_argument(
        "--harmful", nargs="+", metavar="FILE", help="harmful prompt files (default: the train + val splits)"
    )
    ap.add_argument("--harmless", nargs="+", metavar="FILE", help="harmless prompt files (default: val + val_hard)")
    args = ap.parse_args(argv)
    strengths = [float(x) for x in args.strengths.split(",") if x.strip()]
    ds = load_direction(args.direction)
    if not ds.has_probe:
        print(f"{args.direction}: no condition (detection vector) to measure", file=sys.stderr)
        return 2
    lm = load_model(args.model)
    gen = engine_generate(lm.model, lm.tokenizer, batch_size=args.batch_size)
    # the KL column measures what a firing row gets: the firing-case edit where the file has one
    m = Measurements(lm.model, lm.tokenizer, gen, edit_sets({args.name: ds}), batch_size=args.batch_size)
    fire = firing_name(args.name, ds)
    t0 = time.monotonic()
    harmful_files = args.harmful or [str(R / f) for f in HARMFUL]
    harmless_files = args.harmless or [str(R / f) for f in HARMLESS]
    prompts = m.ids([x for f in harmful_files for x in read_lines(f)])
    plain = gen({}, [Generation(p, args.label_tokens) for p in prompts], desc="plain replies (label refusals)")
    refused = [i for i, r in enumerate(plain) if is_refusal(r.text)]
    res = {
        "harmful_files": [Path(f).name for f in harmful_files],
        "harmless_files": [Path(f).name for f in harmless_files],
        "n_harmful": len(prompts),
        "plain_refused": len(refused),
        "rows": [],
    }
    for s in strengths:
        steer = {args.name: DirectionRequest(s, "auto")}
        out = gen(
            {args.name: ds}, [Generation(prompts[i], args.max_tokens, steer) for i in refused], desc=f"auto s={s}"
        )
        fired = [bool(r.fired.get(args.name)) for r in out]
        left = [is_refusal(r.text) for r in out]
        res["rows"].append(
            {
                "strength": s,
                "refusals_left": sum(left),
                "fired": sum(fired),
                "missed_by_condition": sum(not f for f in fired),
                "fired_but_refused": sum(f and x for f, x in zip(fired, left, strict=True)),
            }
        )
    harmless = m.ids([x for f in harmless_files for x in read_lines(f)])
    for row in res["rows"]:
        kl_mean, _ = m.first_token_kl(harmless, {fire: [row["strength"]] * len(harmless)})
        row["harmless_first_token_kl_always"] = kl_mean
    res["n_harmless"] = len(harmless)
    res["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"plain model refuses {len(refused)} of {len(prompts)} harmful train+val prompts")
    print(f"{'strength':>8} {'left':>5} {'fired':>6} {'missed':>7} {'fired+left':>10} {'KL always':>10}")
    for r in res["rows"]:
        print(
            f"{r['strength']:>8} {r['refusals_left']:>5} {r['fired']:>6} {r['missed_by_condition']:>7} "
            f"{r['fired_but_refused']:>10} {r['harmless_first_token_kl_always']:>10.4f}"
        )
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
