#!/usr/bin/env python
"""How much can batching raise decode throughput on this machine? And what do
the engine's cache and prefill choices cost?

Times bare model forwards on the demo (or any) model, outside any server:

- decode: one decode step at batch sizes 1..N over a context of ``--context``
  tokens, with transformers' DynamicLayer (concatenates the whole cache every
  step) and frankly's GrowableLayer (writes one position in place). The
  ``x b=1`` column is the aggregate-throughput ratio a perfect server could
  reach at that batch size: it bounds what any continuous-batching engine gets
  from concurrency here.
- prefill: ``--streams`` prompts of ``--prompt-len`` tokens, one forward each
  (what the engine does: exact per-row logits) vs one batched forward.

    python scripts/decode_scaling.py [--model demo] [--batches 1,2,4,8] [--context 128] [--steps 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decode_ms(model, layer_cls, batch: int, context: int, steps: int) -> float:
    """Median ms per decode step at ``batch`` rows after a ``context``-token prefill."""
    import torch
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(100, 1000, (batch, context))
    cache = DynamicCache()
    cache.layer_class_to_replicate = layer_cls
    mask = torch.ones(batch, context, dtype=torch.long)
    model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    times = []
    for i in range(steps):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        pos = torch.full((batch, 1), context + i)
        t0 = time.perf_counter()
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:] or times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", help="float32 (the demo figures), bfloat16, float16")
    args = ap.parse_args(argv)

    import torch
    from transformers.cache_utils import DynamicLayer

    from directions.models import load_model
    from server.engine.kvcache import GrowableLayer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=args.dtype).model
    print(f"torch threads: {torch.get_num_threads()}  dtype: {args.dtype}  context: {args.context} tokens", flush=True)
    rows = []
    with torch.inference_mode():
        decode_ms(model, GrowableLayer, 1, args.context, 4)  # warm-up: allocator, kernels
        for b in [int(x) for x in args.batches.split(",")]:
            dyn = decode_ms(model, DynamicLayer, b, args.context, args.steps)
            gro = decode_ms(model, GrowableLayer, b, args.context, args.steps)
            rows.append((b, dyn, gro))
            print(f"  measured batch {b}", flush=True)
        base = rows[0][2] / rows[0][0]
        print()
        print("batch  ms/step concat  ms/step in-place  in-place gain  tok/s in-place  x b=1")
        for b, dyn, gro in rows:
            print(
                f"{b:>5}  {dyn:>14.1f}  {gro:>16.1f}  {100 * (dyn - gro) / dyn:>12.1f}%  {1000 * b / gro:>14.1f}  {base * b / gro:>5.2f}"
            )

        ids = torch.randint(100, 1000, (args.streams, args.prompt_len))

        def one_by_one():
            for i in range(args.streams):
                model(
                    input_ids=ids[i : i + 1],
                    attention_mask=torch.ones_like(ids[i : i + 1]),
                    use_cache=True,
                    logits_to_keep=1,
                )

        def batched():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)

        t1, t2 = _time(one_by_one, 3), _time(batched, 3)
        print()
        print(
            f"prefill of {args.streams} x {args.prompt_len} tokens: one by one {1000 * t1:.0f} ms, batched {1000 * t2:.0f} ms ({t1 / t2:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
