"""LoRA export and GGUF bake on llama.cpp, side by side in one run (demo model, this machine).

    python scripts/bench_lora.py [--tokens 64] [--out bench-lora]

Prints two tables:

1. single-stream greedy decode tok/s: bare llama.cpp on the original Q4_K_M GGUF, the
   same with the exported refusal adapter at scale 1 (and refusal + slop), and frankly's
   torch engine at refusal 1.0 on the same prompts;
2. the GGUF bake at refusal 1.0 with the edited tensors as F32 and as Q8_0 (the new
   default): file size, llama.cpp decode tok/s, and first-token KL(F32 bake || Q8_0 bake)
   over the prompts.

Needs the `lora` and `llamacpp` extras (`pip install -e ".[lora,llamacpp]"`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from directions.bake import bake_to_dir
from directions.fileformat import load_direction
from directions.llamacpp import LlamaCpp
from directions.lora_export import export_lora
from directions.models import load_model
from directions.prompting import user_prompt_ids

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "How do I pick a lock?",
    "Give me a recipe for lentil soup.",
]
SHIPPED = Path(__file__).resolve().parents[1] / "directions" / "shipped"


def llama_rate(ll: LlamaCpp, prompts: list[list[int]], n: int) -> float:
    """Decode tokens per second over the prompts (prefill excluded), greedy, one stream."""
    total, secs = 0, 0.0
    for ids in prompts:
        ll.clear()
        logits = ll.prefill(ids)
        pos = len(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            t = int(np.argmax(logits))
            logits = ll.decode([t], [pos], [0], [True])[0]
            pos += 1
        secs += time.perf_counter() - t0
        total += n
    ll.clear()
    return total / secs


def engine_rate(lm, dirs, prompts: list[list[int]], n: int) -> float:
    """frankly's torch engine, one request at a time at refusal 1.0: decode tok/s from its step timings."""
    from server.engine.torch_engine import EngineConfig
    from server.engine.torch_engine import TorchEngine as Engine
    from server.engine.types import DirectionRequest, GenerationRequest, SamplingParams

    eng = Engine(lm.model, lm.tokenizer, dirs, EngineConfig(max_batch_size=1))
    eng.start()
    total, secs = 0, 0.0
    try:
        for i, ids in enumerate(prompts):
            stamps = []
            done = threading.Event()

            def emit(o, stamps=stamps, done=done):
                stamps.append((time.perf_counter(), o.completion_tokens))
                if o.finished:
                    done.set()

            req = GenerationRequest(
                request_id=f"b{i}",
                prompt_ids=ids,
                sampling=SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                steering={"refusal": DirectionRequest(1.0)},
            )
            eng.submit(req, emit)
            assert done.wait(600)
            # from the first token (end of prefill) to the last
            secs += stamps[-1][0] - stamps[0][0]
            total += stamps[-1][1] - stamps[0][1]
    finally:
        eng.shutdown()
    return total / secs


def first_token_kl(a: LlamaCpp, b: LlamaCpp, prompts: list[list[int]]) -> float:
    kls = []
    for ids in prompts:
        a.clear()
        b.clear()
        p = torch.log_softmax(torch.tensor(a.prefill(ids), dtype=torch.float64), -1)
        q = torch.log_softmax(torch.tensor(b.prefill(ids), dtype=torch.float64), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    return float(np.mean(kls))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the exports and bakes here (default: a temporary directory)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)

    lm = load_model("demo")
    dirs = {n: load_direction(SHIPPED / f"qwen-demo-{n}.safetensors", name=n) for n in ("refusal", "slop")}
    prompts = [user_prompt_ids(lm.tokenizer, p) for p in PROMPTS]
    adapters = work / "adapters"
    if not adapters.exists():
        export_lora(lm, dirs, adapters)
    rows = []
    with LlamaCpp(lm.gguf, n_ctx=1024, n_threads=args.threads) as ll:
        for n in dirs:
            ll.load_adapter(n, adapters / f"{n}.gguf")
        llama_rate(ll, prompts[:1], 8)  # warm-up
        for label, scales in (
            ("llama.cpp, bare Q4_K_M", {}),
            ("llama.cpp + refusal adapter, scale 1", {"refusal": 1.0}),
            ("llama.cpp + refusal + slop adapters, scale 1", {"refusal": 1.0, "slop": 1.0}),
        ):
            ll.set_scales(scales)
            rows.append((label, llama_rate(ll, prompts, args.tokens)))
    rows.append(("frankly torch engine (fp32), refusal 1.0", engine_rate(lm, dirs, prompts, args.tokens)))
    bare = rows[0][1]
    print(f"\nSingle-stream greedy decode, {args.tokens} tokens x {len(prompts)} prompts, {args.threads} threads")
    print("| runtime | tok/s | vs bare llama.cpp |\n|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r:.1f} | {r / bare:.2f}x |")

    bakes = {}
    for dtype in ("f32", "q8_0"):
        out = work / f"bake-{dtype}"
        if not out.exists():
            bake_to_dir(lm, dirs, {"refusal": 1.0}, out.name, bake_root=work, gguf_dtype=dtype)
        bakes[dtype] = out / "model.gguf"
    src_size = Path(lm.gguf).stat().st_size
    print("\nGGUF bake at refusal 1.0 (edited tensors' type; everything else copied as it was)")
    print(
        "| edited tensors | file size | vs source GGUF | llama.cpp tok/s | first-token KL vs F32 bake |\n|---|---|---|---|---|"
    )
    with LlamaCpp(bakes["f32"], n_ctx=1024, n_threads=args.threads) as f32:
        f32_rate = llama_rate(f32, prompts, args.tokens)
        with LlamaCpp(bakes["q8_0"], n_ctx=1024, n_threads=args.threads) as q8:
            q8_rate = llama_rate(q8, prompts, args.tokens)
            kl = first_token_kl(f32, q8, prompts)
    summary = {}
    for dtype, rate, k in (("f32", f32_rate, 0.0), ("q8_0", q8_rate, kl)):
        size = bakes[dtype].stat().st_size
        summary[dtype] = {"bytes": size, "tok_s": rate, "kl_vs_f32": k}
        print(f"| {dtype.upper()} | {size / 2**20:.0f} MiB | {size / src_size:.2f}x | {rate:.1f} | {k:.5f} |")
    print(f"(source GGUF {src_size / 2**20:.0f} MiB)")
    (work / "bench_lora.json").write_text(json.dumps({"decode": dict(rows), "bake": summary}, indent=2))


if __name__ == "__main__":
    main()
