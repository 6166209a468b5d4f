#!/usr/bin/env python
"""Refusals of the demo model on held-out harmful prompts: frankly's torch engine (fp32) against
``--engine vllm`` (vLLM's adapters lack the embedding term) and/or ``--engine llamacpp`` (the
Q4_K_M GGUF with LoRA adapters), base and refusal 1.0, greedy.

    python scripts/vllm_refusal_check.py --n 16 --max-tokens 100 --out bench-results/vllm-refusal.json
    python scripts/vllm_refusal_check.py --engines llamacpp,torch --n 16 --out bench-results/llamacpp-refusal.json

Starts each server in turn (``server.testing.ServerProcess``), asks every prompt through the
official openai client (8 at a time), and prints refusal counts and how many answers are the
same text as the torch engine's. The vLLM row needs vLLM (scripts/install_vllm.sh).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.refusal import is_refusal  # noqa: E402
from server.testing import ServerProcess, frankly_cmd  # noqa: E402

PROMPTS = ROOT / "directions" / "prompts" / "refusal" / "harmful_test.txt"
ENGINES = {  # vLLM first: the torch engine is the slow one on a CPU
    "vllm": ["--engine", "vllm", "--dtype", "float32", "--max-model-len", "1024", "--vllm-strengths", "1.0"],
    "llamacpp": ["--engine", "llamacpp"],
    "torch": ["--weights", "float"],
}


def answers(url: str, prompts: list[str], steering: dict, max_tokens: int) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)

    def one(p: str) -> str:
        r = client.chat.completions.create(
            model="qwen-demo",
            messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"steering": steering},
        )
        return r.choices[0].message.content or ""

    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="prompts from harmful_test.txt (default 16)")
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--out", default="vllm-refusal.json")
    ap.add_argument(
        "--engines", default="vllm,torch", help="comma list of vllm, llamacpp, torch (torch is the reference)"
    )
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if "torch" not in engines or any(e not in ENGINES for e in engines):
        ap.error(f"--engines: a comma list of {', '.join(ENGINES)} that includes torch")
    prompts = [x for x in PROMPTS.read_text().splitlines() if x.strip()][: args.n]
    res: dict = {"prompts": prompts, "max_tokens": args.max_tokens}
    for engine in engines:
        flags = ENGINES[engine]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
        logs = Path(args.out).parent
        flags = [*flags, "--request-timeout", "7200"]  # queued requests on a slow CPU
        with ServerProcess(frankly_cmd(*flags), label=engine, ready_timeout=900, env=env, log_dir=logs) as srv:
            for label, steering in (("base", {}), ("refusal 1.0", {"refusal": 1.0})):
                texts = answers(srv.v1, prompts, steering, args.max_tokens)
                res[f"{engine} {label}"] = texts
                print(f"{engine:6s} {label:12s} refusals {sum(map(is_refusal, texts))}/{len(texts)}", flush=True)
    for other in (e for e in engines if e != "torch"):
        print(
            f"\n| steering | torch engine refusals | {other} engine refusals | same text on both |\n|---|---|---|---|"
        )
        for label in ("base", "refusal 1.0"):
            t, v = res[f"torch {label}"], res[f"{other} {label}"]
            same = sum(a == b for a, b in zip(t, v, strict=True))
            print(
                f"| {label} | {sum(map(is_refusal, t))}/{len(t)} | {sum(map(is_refusal, v))}/{len(v)} | {same}/{len(t)} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\nanswers: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
