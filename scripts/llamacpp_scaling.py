#!/usr/bin/env python
"""How far can batching raise llama.cpp's decode throughput on this machine? The ceiling of the
llama.cpp engine's 8-stream figure, measured on llama.cpp alone (no frankly scheduler, no HTTP).

Loads the GGUF through the same bindings as the engine (:mod:`directions.llamacpp`), prefills
``k`` sequences of a ``--context``-token prompt, then times ``--steps`` decode passes of one
token per sequence, for every ``k`` in ``--batches``, with the engine's thread settings (one-row
passes: ``default_threads()``; several rows: ``default_threads_batch()``). Prints, per ``k``, the
median milliseconds per pass, tokens per second and the ratio to ``k = 1``: what a perfect
scheduler on llama.cpp could reach at that many streams. ``--adapter`` runs every pass with the
shipped refusal adapter at scale 1 (as a steered strength group).

    python scripts/llamacpp_scaling.py [--model demo] [--batches 1,2,4,8] [--steps 24] [--adapter]

``--engine`` measures frankly's llama.cpp engine instead, in process (no HTTP, no client):
``--repeats`` times, 1 request and then ``max(--batches)`` concurrent requests of ``--tokens``
greedy tokens (prompts, prefill and the ramp included), steering off and refusal 1.0; it prints
each aggregate rate, the ratio, and the engine's measured pass times (its pass planner's means).

    python scripts/llamacpp_scaling.py --engine [--batches 1,8] [--tokens 64] [--repeats 2]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo", help="a .gguf file or demo (the demo model's Q4_K_M)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=24, help="decode passes timed per batch size")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per sequence before timing")
    ap.add_argument("--adapter", action="store_true", help="run with the shipped refusal adapter at scale 1")
    ap.add_argument("--threads", type=int, default=None, help="threads of one-row passes (default: the engine's)")
    ap.add_argument("--threads-batch", type=int, default=None, help="threads of several-row passes")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--engine", action="store_true", help="measure frankly's llama.cpp engine (in process) instead")
    ap.add_argument("--tokens", type=int, default=64, help="--engine: tokens per request")
    ap.add_argument("--repeats", type=int, default=2, help="--engine: rounds of (1 stream, k streams) per setting")
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    if not batches or min(batches) < 1 or args.steps < 2:
        ap.error("--batches: positive integers; --steps >= 2")
    if args.engine:
        return engine_scaling(args.model, max(batches), args.tokens, args.repeats, args.out)

    from directions.llamacpp import LlamaCpp
    from directions.models import locate_gguf
    from server.engine.llamacpp_engine import default_threads, default_threads_batch

    gguf = locate_gguf(args.model)
    if gguf is None:
        ap.error(f"{args.model}: not a GGUF model")
    kmax = max(batches)
    t1 = args.threads or default_threads()
    tb = args.threads_batch or default_threads_batch()
    ll = LlamaCpp(gguf, n_ctx=(args.context + args.steps + 8) * kmax, n_seq_max=kmax, n_threads=t1, n_threads_batch=tb)
    try:
        if args.adapter:
            from directions.fileformat import load_direction
            from directions.models import cache_root
            from server.engine.llamacpp_engine import ensure_adapters

            ds = load_direction(ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors", name="refusal")
            _, adapters = ensure_adapters(Path(gguf), {"refusal": ds}, cache_root())
            ll.load_adapter("refusal", adapters["refusal"])
            ll.set_scales({"refusal": 1.0})
        prompt = [(17 * i + 100) % 5000 + 100 for i in range(args.context)]
        rows = []
        for k in batches:
            ll.clear()
            for s in range(k):
                ll.prefill(prompt, seq=s)
            toks, pos = [prompt[-1]] * k, [args.context] * k
            times = []
            for step in range(args.steps + 1):
                t0 = time.perf_counter()
                logits = ll.decode(toks, pos, list(range(k)), [True] * k, copy=False)
                dt = time.perf_counter() - t0
                if step:  # the first pass after a prefill reserves graphs: not timed
                    times.append(dt)
                toks = [int(x) for x in logits.argmax(axis=1)]
                pos = [p + 1 for p in pos]
            ms = 1000 * statistics.median(times)
            rows.append({"rows": k, "ms_per_pass": ms, "tok_s": 1000 * k / ms})
            print(f"  measured {k} rows", flush=True)
    finally:
        ll.close()
    base = rows[0]["tok_s"] if rows[0]["rows"] == 1 else None
    print(
        f"\nllama.cpp {Path(gguf).name}: threads {t1} (one row) / {tb} (several){', refusal adapter on' if args.adapter else ''}"
    )
    print(f"{'rows':>4} {'ms/pass':>8} {'tok/s':>7} {'x 1 row':>8}")
    for r in rows:
        ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
        r["x_one_row"] = r["tok_s"] / base if base else None
        print(f"{r['rows']:>4} {r['ms_per_pass']:>8.1f} {r['tok_s']:>7.1f} {ratio:>8}")
    if args.out:
        args.out.write_text(
            json.dumps({"rows": rows, "threads": t1, "threads_batch": tb, "adapter": args.adapter}, indent=1)
        )
    return 0


PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how rainbows form, in detail.",
    "Describe a busy night market.",
    "Write an essay about trains.",
    "Tell me about the history of tea.",
    "Explain photosynthesis step by step.",
    "Write a poem about winter.",
    "Describe the ocean at night.",
]


def engine_scaling(model: str, k: int, tokens: int, repeats: int, out: Path | None) -> int:
    """1 and k concurrent requests on frankly's llama.cpp engine, in process, off and refusal 1.0."""
    import threading

    from directions.fileformat import edit_sets, load_direction
    from directions.files import cache_root
    from directions.prompting import user_prompt_ids
    from directions.strengths import DirectionRequest
    from server.engine.llamacpp_engine import LlamaCppConfig, LlamaCppEngine, ensure_adapters
    from server.engine.torch_engine import eos_ids
    from server.engine.types import GenerationRequest, SamplingParams
    from server.settings import ModelSettings
    from server.startup import _load_for_llamacpp

    loaded = _load_for_llamacpp(ModelSettings(model=model, engine="llamacpp"))  # as frankly serve does
    tok = loaded.tokenizer
    dirs = {
        "refusal": load_direction(ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors", name="refusal")
    }
    base, adapters = ensure_adapters(Path(loaded.gguf), edit_sets(dirs), cache_root())
    eos = eos_ids(loaded.model, tok)
    eng = LlamaCppEngine(base, tok, adapters, eos, LlamaCppConfig(max_batch_size=k, max_model_len=512), directions=dirs)
    eng.start()
    ids = [user_prompt_ids(tok, PROMPTS[i % len(PROMPTS)]) for i in range(k)]
    serial = iter(range(10**9))

    def rate(n: int, steer: dict) -> float:
        done, lock, got = threading.Semaphore(0), threading.Lock(), [0]

        def emit(o):
            with lock:
                got[0] += len(o.token_ids)
            if o.finished:
                done.release()

        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for i in range(n):
            eng.submit(GenerationRequest(f"s{next(serial)}", ids[i], sp, steer), emit)
        for _ in range(n):
            if not done.acquire(timeout=600):
                raise RuntimeError("a request did not finish in 600 s")
        return got[0] / (time.perf_counter() - t0)

    rows = []
    try:
        rate(1, {})  # warm-up
        for r in range(repeats):
            for name, steer in (("off", {}), ("refusal 1.0", {"refusal": DirectionRequest(1.0)})):
                one, many = rate(1, steer), rate(k, steer)
                passes = {n: round(1000 * v, 1) for n, v in sorted(eng.planner.cost.items())}
                rows.append(
                    {"round": r + 1, "steering": name, "one": one, "many": many, "ratio": many / one, "pass_ms": passes}
                )
                print(f"  round {r + 1} {name}: measured", flush=True)
    finally:
        eng.shutdown()
    print(f"\nfrankly llama.cpp engine, in process: 1 and {k} requests of {tokens} tokens")
    print(
        f"{'round':>5} {'steering':<12} {'1 stream tok/s':>14} {f'{k} streams tok/s':>16} {'ratio':>6}  pass ms by rows (planner means)"
    )
    for x in rows:
        print(
            f"{x['round']:>5} {x['steering']:<12} {x['one']:>14.1f} {x['many']:>16.1f} {x['ratio']:>6.2f}  {x['pass_ms']}"
        )
    if out:
        out.write_text(json.dumps({"engine": rows, "streams": k, "tokens": tokens}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
