#!/usr/bin/env python
"""What does steering cost a decoding request? Plain against steered decode steps, alternated
step by step so that the machine's drift hits both sides alike.

For each weight format: the demo model with the engine's hooks (:class:`directions.hooks.SteeringHooks`)
and the shipped refusal direction, one sequence, a KV cache. After a prompt, ``--steps`` decode
steps at batch ``--batch``, alternating refusal strength 0 (no hook installed: the plain model)
and 1 every step, each step timed alone (the hook switch is outside the timing). The table gives
the median step time of each side and the overhead from the medians, with the interquartile range
of each side, so a reader can tell a real cost from noise. (``bench_compare.py`` times whole
requests through the server; with one or two requests a side it cannot resolve a few percent.)

    python scripts/steering_overhead.py [--weights float,int8] [--steps 200] [--batch 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors"
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def _quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def measure(weights: str, steps: int, batch: int) -> dict:
    import torch
    from transformers.cache_utils import DynamicCache

    from directions.fileformat import load_direction
    from directions.hooks import SteeringHooks
    from directions.models import load_model
    from directions.prompting import user_prompt_ids

    lm = load_model("demo", device="cpu", weights=weights)
    model = lm.model
    hooks = SteeringHooks(model, {"refusal": load_direction(SHIPPED, name="refusal")})
    ids = torch.tensor([user_prompt_ids(lm.tokenizer, PROMPT)] * batch)
    side_s: dict[str, list[float]] = {"plain": [], "steered": []}
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(steps + 8):
            side = "steered" if step % 2 else "plain"
            hooks.set_strengths({"refusal": [1.0 if side == "steered" else 0.0] * batch})
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
            if step >= 8:  # the first steps warm the allocator and the kernels
                side_s[side].append(dt)
            if step % 50 == 49:
                print(f"  {weights}: step {step + 1}/{steps + 8}", flush=True)
    hooks.remove()
    mp, ms = statistics.median(side_s["plain"]), statistics.median(side_s["steered"])
    return {
        "weights": weights,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "plain_ms": 1000 * mp,
        "steered_ms": 1000 * ms,
        "plain_iqr_ms": [1000 * x for x in _quartiles(side_s["plain"])],
        "steered_iqr_ms": [1000 * x for x in _quartiles(side_s["steered"])],
        "overhead": ms / mp - 1,
        "steps_per_side": len(side_s["plain"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="float,int8", help="comma-separated: float (fp32), int8")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps, both sides together (default 200)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.steps < 8 or args.batch < 1:
        ap.error("--steps must be >= 8 and --batch >= 1")
    rows = [measure(w.strip(), args.steps, args.batch) for w in args.weights.split(",") if w.strip()]
    print()
    print(
        f"{'weights':<8} {'plain ms/step':>14} {'steered ms/step':>16} {'overhead':>9}  {'IQR plain':>13}  {'IQR steered':>13}"
    )
    for r in rows:
        ip, is_ = r["plain_iqr_ms"], r["steered_iqr_ms"]
        print(
            f"{r['weights']:<8} {r['plain_ms']:>14.2f} {r['steered_ms']:>16.2f} {100 * r['overhead']:>8.1f}%"
            f"  {ip[0]:>6.1f}-{ip[1]:<6.1f}  {is_[0]:>6.1f}-{is_[1]:<6.1f}"
        )
    print(f"(batch {args.batch}, median of {rows[0]['steps_per_side']} steps a side, refusal at strength 1)")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "steps": args.steps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
