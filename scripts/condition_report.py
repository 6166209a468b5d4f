#!/usr/bin/env python
"""Where does a refusal condition fire, against what the unedited model does? (validation only)

For each prompt file, the unedited model's greedy reply (``--label-tokens``, 32) is judged refused
or answered, and each condition file's score (the engine's own ``condition_score``) says whether
it fires. Per file and condition it prints: fires, fires on refused prompts (wanted: ``auto``
removes that refusal), fires on answered prompts (a false positive: the edit touches an answer
that needed nothing), and refused prompts it misses (a refusal ``auto`` leaves). Writes JSON.

``--lookahead 3,4`` adds, beside the files' conditions, an output-based condition for each K: the
same judge on the first K tokens of the unedited reply (what a condition that lets a request
decode K tokens unsteered, then restarts it steered if they open a refusal, would decide).

    python scripts/condition_report.py shipped=directions/shipped/qwen-demo-refusal.safetensors \\
        other=OTHER.safetensors --out condition-report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.detection import fire_counts, first_tokens_flagged, probe_fires  # noqa: E402
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
DEFAULT_FILES = ("harmless_val.txt", "harmless_val_hard.txt", "harmful_val.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("conditions", nargs="+", metavar="NAME=FILE", help="direction files with a condition")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", nargs="+", metavar="FILE", help="prompt files (default: the validation files)")
    ap.add_argument("--label-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--lookahead",
        default="",
        help="comma-separated token counts K: also report the judge on the first K tokens of the unedited reply",
    )
    ap.add_argument("--out", default="condition-report.json")
    args = ap.parse_args(argv)
    try:
        lookahead = [int(k) for k in args.lookahead.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--lookahead: comma-separated token counts, not {args.lookahead!r}")
    if any(k < 1 for k in lookahead):
        ap.error("--lookahead: token counts must be >= 1")
    try:
        paths = parse_direction_specs(args.conditions)
        conds = load_directions(paths)
    except DirectionFileError as e:
        ap.error(str(e))
    for name, ds in conds.items():
        if not ds.has_probe:
            ap.error(f"{paths[name]}: no condition (detection vector) to report on")
    files = args.prompts or [str(R / f) for f in DEFAULT_FILES]
    lm = load_model(args.model)
    gen = engine_generate(lm.model, lm.tokenizer, args.batch_size)
    t0 = time.monotonic()
    res: dict = {"files": {}}
    for path in files:
        ids = build_prompts(lm.tokenizer, read_lines(path))
        replies = gen({}, [Generation(p, args.label_tokens) for p in ids], desc=f"unedited replies ({Path(path).name})")
        refused = [is_refusal(r.text) for r in replies]
        logits, states = forward_last(lm.model, lm.tokenizer, ids, states=True, batch_size=args.batch_size)
        row: dict = {"n": len(ids), "refused": sum(refused), "conditions": {}}
        for name, ds in conds.items():
            row["conditions"][name] = fire_counts(probe_fires(ds, states, logits), refused)
        for k in lookahead:
            early = [first_tokens_flagged(lm.tokenizer, r.token_ids, k) for r in replies]
            row["conditions"][f"first-{k}-tokens"] = fire_counts(early, refused)
        res["files"][Path(path).name] = row
    res["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(
        f"{'file':<24} {'n':>4} {'refused':>7} {'condition':<16} {'fires':>5} {'on refused':>10} "
        f"{'on answered':>11} {'missed refused':>14}"
    )
    for fname, row in res["files"].items():
        for name, c in row["conditions"].items():
            print(
                f"{fname:<24} {row['n']:>4} {row['refused']:>7} {name:<16} {c['fires']:>5} {c['fires_refused']:>10} "
                f"{c['fires_answered']:>11} {c['misses_refused']:>14}"
            )
    print(f"wrote {args.out} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
