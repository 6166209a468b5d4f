#!/usr/bin/env python
"""What does steering cost a decoding request? The torch engine, one request at a time, plain
against steered, interleaved so that the machine's drift hits both alike.

For each weight format, ``--rounds`` rounds of an ABBA pattern (plain, steered, steered, plain)
of one ``--tokens``-token greedy request each, on a fresh :class:`~server.engine.TorchEngine`
with the shipped refusal direction. The decode rate of a request is its tokens after the first
over the time from its first to its last token (prefill excluded). The table gives the median
rate of each side and the overhead from the medians, with the spread of the per-round ratios,
so a reader can tell a real cost from noise. One server-level figure (``bench_compare.py``) is
one request per side; this is the number to read for "what does the edit cost".

    python scripts/steering_overhead.py [--weights float,int8] [--tokens 64] [--rounds 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors"
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def decode_rate(engine, ids: list[int], tokens: int, steering: dict, rid: str) -> float:
    """Tokens per second of one request's decode (first to last token)."""
    from server.engine import GenerationRequest, SamplingParams

    stamps: list[float] = []
    done = threading.Event()

    def emit(o):
        if o.token_ids:
            stamps.append(time.perf_counter())
        if o.finished:
            done.set()

    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.submit(GenerationRequest(rid, ids, sp, steering), emit)
    if not done.wait(600):
        raise RuntimeError("request did not finish in 600 s")
    if len(stamps) < 2:
        raise RuntimeError(f"request {rid} produced {len(stamps)} tokens")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(weights: str, tokens: int, rounds: int, threads: int | None) -> dict:
    import torch

    from directions.fileformat import load_direction
    from directions.models import load_model
    from directions.prompting import user_prompt_ids
    from server.engine import DirectionRequest, EngineConfig, TorchEngine

    lm = load_model("demo", device="cpu", weights=weights)
    dirs = {"refusal": load_direction(SHIPPED, name="refusal")}
    eng = TorchEngine(lm.model, lm.tokenizer, dirs, EngineConfig(max_batch_size=1, num_threads=threads))
    eng.start()
    ids = user_prompt_ids(lm.tokenizer, PROMPT)
    on = {"refusal": DirectionRequest(1.0)}
    plain, steered = [], []
    try:
        decode_rate(eng, ids, 8, {}, "warm-0")  # warm-up: allocator, kernels, the hooks
        decode_rate(eng, ids, 8, on, "warm-1")
        for r in range(rounds):
            for k, side in enumerate(("plain", "steered", "steered", "plain")):
                rate = decode_rate(eng, ids, tokens, on if side == "steered" else {}, f"{r}-{k}")
                (steered if side == "steered" else plain).append(rate)
            print(f"  {weights}: round {r + 1}/{rounds}", flush=True)
    finally:
        eng.shutdown()
    ratios = [s / p for s, p in zip(steered, plain, strict=True)]
    mp, ms = statistics.median(plain), statistics.median(steered)
    return {
        "weights": weights,
        "threads": torch.get_num_threads(),
        "plain_tok_s": plain,
        "steered_tok_s": steered,
        "plain_median": mp,
        "steered_median": ms,
        "overhead": 1 - ms / mp,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="float,int8", help="comma-separated: float (fp32), int8")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds per format (default 4: 8 requests a side)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.rounds < 1:
        ap.error("--tokens must be >= 2 and --rounds >= 1")
    rows = [measure(w.strip(), args.tokens, args.rounds, args.threads) for w in args.weights.split(",") if w.strip()]
    print()
    print(f"{'weights':<8} {'plain tok/s':>11} {'steered tok/s':>13} {'overhead':>9} {'per-round steered/plain':>24}")
    for r in rows:
        spread = f"{r['ratio_min']:.3f} - {r['ratio_max']:.3f}"
        print(
            f"{r['weights']:<8} {r['plain_median']:>11.2f} {r['steered_median']:>13.2f} "
            f"{100 * r['overhead']:>8.1f}% {spread:>24}"
        )
    print(f"(median of {2 * args.rounds} requests a side, {args.tokens} tokens each, refusal at strength 1)")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "tokens": args.tokens, "rounds": args.rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
