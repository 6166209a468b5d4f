"""frankly's decode-step ops against the torch code they replace, in one process on this machine.

Prints a table: each op (``directions/kernels/int8_linear.cpp``) beside the torch ops it stands in for
on the demo model's decode shapes (microseconds a call, median of rounds), then the int8 demo model's
decode step (the engine's way: 2-D mask, position ids, its bf16 KV cache) with the one-pass attention
and with SDPA, interleaved round by round so the machine's drift hits both alike.

    python scripts/decode_ops.py [--rounds 5] [--steps 30] [--out docs/int8/decode-ops-s18.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from directions import kernels, models  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    for _ in range(max(3, calls // 20)):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def op_rows(rounds: int) -> list[dict]:
    ops = torch.ops.frankly
    g = torch.Generator().manual_seed(0)
    rows = []

    def add(name, shape, ours, theirs, calls):
        a = [per_call_us(theirs, calls) for _ in range(rounds)]
        b = [per_call_us(ours, calls) for _ in range(rounds)]
        rows.append(
            {
                "op": name,
                "shape": shape,
                "torch_us": round(statistics.median(a), 1),
                "frankly_us": round(statistics.median(b), 1),
            }
        )
        r = rows[-1]
        print(f"| {name} | {shape} | {r['torch_us']} | {r['frankly_us']} | {r['torch_us'] / r['frankly_us']:.2f} |")

    print("| op | shape | torch µs | frankly µs | speed-up |\n|---|---|---|---|---|")
    attn = type("Attn", (), {"is_causal": True, "training": False, "num_key_value_groups": 7})()
    for b, length in ((1, 150), (8, 300)):
        q = torch.randn(b, 14, 1, 64, generator=g)
        k = torch.randn(b, 2, length, 64, generator=g).bfloat16()
        v = torch.randn(b, 2, length, 64, generator=g).bfloat16()

        def theirs(q=q, k=k, v=v):  # what models._mixed_sdpa did before: widen the cache, SDPA
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            sdpa_attention_forward(attn, q, k.float(), v.float(), None, dropout=0.0, scaling=0.125)

        add(
            "decode_attention",
            f"{b}x14 heads, 2 KV heads, {length} bf16 positions",
            lambda q=q, k=k, v=v: ops.decode_attention(q, k, v, None, 0.125),
            theirs,
            400,
        )
    for b in (1, 8):
        gu = torch.randn(b, 1, 2 * 4864, generator=g)
        add(
            "silu_mul",
            f"{b}x{2 * 4864}",
            lambda gu=gu: ops.silu_mul(gu),
            lambda gu=gu: F.silu(gu[..., :4864]) * gu[..., 4864:],
            1000,
        )
        x = torch.randn(b, 151936, generator=g)
        add("argmax_rows", f"{b}x151936", lambda x=x: ops.argmax_rows(x), lambda x=x: torch.argmax(x, dim=-1), 300)
    return rows


def step_rows(rounds: int, steps: int) -> list[dict]:
    from server.engine import kvcache

    lm = models.load_model("demo", device="cpu", dtype="float32", weights="int8")
    m = lm.model
    text = "Tell me about the sea, the ships on it and the people who sail them, at some length."
    ids0 = lm.tokenizer(text, return_tensors="pt")["input_ids"]

    def step_ms(b: int) -> float:
        ids = ids0.repeat(b, 1)
        with torch.no_grad():
            cache = kvcache.new_cache(models.kv_cache_dtype(m))
            n = ids.shape[1]
            mask = torch.ones(b, n, dtype=torch.long)
            pos = torch.arange(n).repeat(b, 1)
            out = m(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            for i in range(100 + steps):  # 100 steps of context first, then the timed ones
                if i == 100:
                    t = time.perf_counter()
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
                p = torch.full((b, 1), n + i)
                out = m(input_ids=nxt, attention_mask=mask, position_ids=p, cache=cache, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1).view(b, 1)
            return (time.perf_counter() - t) / steps * 1e3

    real = models._one_pass_decode
    rows = []
    print("\n| batch | attention | decode step ms (median) | min |\n|---|---|---|---|")
    for b in (1, 8):
        got = {"sdpa": [], "one pass": []}
        for _ in range(rounds):
            for name in got:
                models._one_pass_decode = real if name == "one pass" else (lambda *a: False)
                got[name].append(step_ms(b))
        models._one_pass_decode = real
        for name, xs in got.items():
            rows.append(
                {
                    "batch": b,
                    "attention": name,
                    "median_ms": round(statistics.median(xs), 2),
                    "min_ms": round(min(xs), 2),
                }
            )
            print(f"| {b} | {name} | {rows[-1]['median_ms']} | {rows[-1]['min_ms']} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps a round (after 100 of context)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    kernels.choose("frankly")
    res = {"threads": torch.get_num_threads(), "ops": op_rows(args.rounds), "steps": step_rows(args.rounds, args.steps)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
