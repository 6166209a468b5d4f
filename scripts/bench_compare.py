#!/usr/bin/env python
"""frankly against its peers, on the same model, dtype and machine: one command, one table.

Measures, one system at a time (each server is started, measured and stopped
before the next, so they never compete for the cores):

- memory bandwidth (scripts/bandwidth.py) and the bandwidth bound for
  single-stream decode: bytes of weights read per token / bandwidth;
- plain ``model.generate`` in a loop, no server: greedy decode tokens/s at
  batch 1 (and at the largest stream count, left-padded, as a static batch);
- frankly: steering off, refusal=1.0, and mixed strengths across the
  concurrent requests (cycling 0, 0.5, 1.0, -0.5), at each stream count;
  the "join latency" of a short request arriving during a long generation;
  peak RSS while serving ``--rss-streams`` x ``--rss-tokens``;
- frankly's llama.cpp engine (``--engine llamacpp``) on the original Q4_K_M GGUF, the
  same scenarios, and bare ``llama_cpp.server`` on that GGUF (needs the ``llamacpp``
  extra and ``pip install 'llama-cpp-python[server]'``);
- ``transformers serve`` on the same converted model directory, without and
  with ``--continuous-batching``, at each stream count, plus its join latency.

Prints one markdown table of throughput/latency rows, then the join-latency and
memory figures, and writes everything as JSON (``--out``).

    python scripts/bench_compare.py --quick                    # seconds-to-minutes smoke run
    python scripts/bench_compare.py --max-tokens 64 --streams 1,8
    python scripts/bench_compare.py --only frankly,generate --max-tokens 128

Keep the machine otherwise idle while it runs: every figure is CPU- and
memory-bandwidth-bound and shares the cores with the load generator itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "bandwidth",
    "generate",
    "frankly",
    "join",
    "rss",
    "frankly-packed",
    "frankly-int8",
    "frankly-int8-aten",
    "frankly-llamacpp",
    "llamacpp-server",
    "hf",
    "hf-cb",
)
OPT_IN_SECTIONS = {"frankly-packed", "frankly-int8-aten"}  # run only when named in --only
STRENGTH_CYCLE = (0.0, 0.5, 1.0, -0.5)


def steering_scenarios(streams: list[int]) -> list:
    """Steering off and refusal 1.0 at every stream count; mixed strengths at the largest (if > 1)."""
    scen = [
        ("steering off", [{}], streams),
        ("refusal=1.0", [{"steering": {"refusal": 1.0}}], streams),
    ]
    if max(streams) > 1:
        mixed = [{"steering": {"refusal": s}} for s in STRENGTH_CYCLE]
        scen.append((f"mixed {'/'.join(str(s) for s in STRENGTH_CYCLE)}", mixed, [max(streams)]))
    return scen


sys.path.insert(0, str(ROOT))
from clients import bench  # noqa: E402


# ---- static facts about the model ------------------------------------------------------
def model_dir() -> str:
    sys.path.insert(0, str(ROOT))
    from directions.models import locate

    return locate("demo")[0]


def weight_bytes(path: str) -> dict:
    """Parameter bytes from the safetensors header (no load), and the bytes one decode step reads."""
    from safetensors import safe_open

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
    cfg = json.loads((Path(path) / "config.json").read_text())
    total = embed = lm_head = 0
    dtypes = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not iterable
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                b = n * sizes[sl.get_dtype()]
                dtypes.add(sl.get_dtype())
                total += b
                if k.endswith("embed_tokens.weight"):
                    embed = b
                elif k.endswith("lm_head.weight"):
                    lm_head = b
    tied = bool(cfg.get("tie_word_embeddings")) or not lm_head
    # A decode step gathers one embedding row (negligible) but reads every other weight once, including the LM head
    # (which is the embedding matrix itself when tied).
    per_token = total - embed + (embed if tied else 0)
    layers = cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = 2 * layers * kv_heads * head_dim * 4
    return {
        "weight_bytes": total,
        "embedding_bytes": embed,
        "tied_embeddings": tied,
        "dtypes": sorted(dtypes),
        "bytes_read_per_decode_step": per_token,
        "kv_cache_bytes_per_token_fp32": kv_per_token,
    }


def ensure_direction(out_dir: Path, explicit: str | None) -> tuple[str, str]:
    """The refusal direction to steer with: explicit, else the shipped one, else a random unit direction."""
    if explicit:
        return explicit, "given"
    shipped = ROOT / "directions" / "shipped" / "qwen-demo-refusal.safetensors"
    if shipped.is_file():
        return str(shipped), "shipped"
    import torch
    from transformers import AutoConfig

    sys.path.insert(0, str(ROOT))
    from directions.fileformat import DirectionSet, save_direction

    cfg = AutoConfig.from_pretrained(model_dir())
    g = torch.Generator().manual_seed(0)
    d = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    d = d / d.norm(dim=-1, keepdim=True)
    ds = DirectionSet("refusal", d, torch.ones(cfg.num_hidden_layers), {"method": "random (benchmark only)"})
    path = save_direction(ds, out_dir / "bench-random-refusal.safetensors", cfg)
    return str(path), "random (no shipped direction found)"


# ---- model.generate baseline (run in a child process) ---------------------------------
def generate_worker(max_tokens: int, batch: int, n_prompts: int, threads: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from directions.models import load_model
    from directions.prompting import chat_prompt_ids

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    lm = load_model("demo")
    load_s = time.perf_counter() - t0
    model, tok = lm.model, lm.tokenizer
    ids = [chat_prompt_ids(tok, [{"role": "user", "content": p}]) for p in bench.PROMPTS]
    kw = {"do_sample": False, "pad_token_id": tok.pad_token_id}

    def timed(x, mask, n):
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t, out.shape[1] - x.shape[1]

    res: dict = {"load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(), "max_tokens": max_tokens}
    # Warm-up: the first forward passes allocate and pick kernels.
    x = torch.tensor([ids[0]])
    timed(x, torch.ones_like(x), 4)
    rows = []
    for p in ids[:n_prompts]:
        x = torch.tensor([p])
        m = torch.ones_like(x)
        t1, _ = timed(x, m, 1)
        tn, n = timed(x, m, max_tokens)
        rows.append(
            {
                "prompt_tokens": len(p),
                "prefill_s": round(t1, 4),
                "total_s": round(tn, 3),
                "tokens": n,
                "decode_tok_s": round((n - 1) / (tn - t1), 3),
                "e2e_tok_s": round(n / tn, 3),
            }
        )
    res["batch1"] = rows
    res["batch1_decode_tok_s"] = round(sum(r["decode_tok_s"] for r in rows) / len(rows), 3)
    res["batch1_e2e_tok_s"] = round(sum(r["e2e_tok_s"] for r in rows) / len(rows), 3)
    if batch > 1:
        tok.padding_side = "left"
        enc = tok.pad({"input_ids": [ids[i % len(ids)] for i in range(batch)]}, return_tensors="pt")
        t1, _ = timed(enc["input_ids"], enc["attention_mask"], 1)
        tn, n = timed(enc["input_ids"], enc["attention_mask"], max_tokens)
        res["batchN"] = {
            "batch": batch,
            "prefill_s": round(t1, 3),
            "total_s": round(tn, 3),
            "tokens_per_row": n,
            "agg_tok_s": round(batch * n / tn, 3),
            "decode_agg_tok_s": round(batch * (n - 1) / (tn - t1), 3),
        }
    return res


def run_generate(args, out_dir: Path) -> dict:
    dest = out_dir / "generate.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker-generate",
        str(dest),
        "--max-tokens",
        str(args.max_tokens),
        "--gen-batch",
        str(max(args.streams_list)),
        "--gen-prompts",
        str(args.gen_prompts),
    ]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(dest.read_text())


def run_bandwidth(args) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bandwidth.py"),
        "--json",
        "--mib",
        str(args.bw_mib),
        "--repeats",
        str(args.bw_repeats),
    ]
    if args.num_threads:
        cmd += ["--threads", str(args.num_threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- servers ---------------------------------------------------------------------------
def frankly_cmd(args, direction: str) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--max-batch-size",
        str(max(8, *args.streams_list, args.rss_streams)),
        "--direction",
        f"refusal={direction}",
        "--weights",  # the fp32 rows; the int8 ones add --weights int8 (a later flag wins)
        "float",
        # the default 600 s request timeout cuts the 8 x 512 memory load short on a slow or busy machine
        "--request-timeout",
        str(int(args.timeout)),
    ]
    if args.num_threads:
        cmd += ["--num-threads", str(args.num_threads)]
    return cmd


def llamacpp_server_cmd(args) -> list[str]:
    """Bare ``llama_cpp.server`` (llama-cpp-python's OpenAI server) on the demo model's original GGUF, with
    llama.cpp's extra CPU buffer types as frankly's engine sets them (scripts/bare_llamacpp_server.py)."""
    from directions.models import locate

    launcher = str(ROOT / "scripts" / "bare_llamacpp_server.py")
    cmd = [sys.executable, launcher, "--model", locate("demo")[1], "--host", "127.0.0.1"]
    cmd += ["--port", "{port}", "--n_ctx", "4096"]
    if args.num_threads:
        cmd += ["--n_threads", str(args.num_threads)]
    return cmd


def hf_cmd(args, cb: bool) -> list[str]:
    exe = shutil.which("transformers")
    base = [exe] if exe else [sys.executable, "-m", "transformers.cli.transformers"]
    cmd = [
        *base,
        "serve",
        model_dir(),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    if cb:
        # On CPU, transformers sizes the paged KV cache as 60% of free RAM unless told otherwise; cap it so the
        # benchmark does not take a shared machine's memory (blocks of 256 tokens, 64 blocks = 16k tokens).
        cmd += [
            "--continuous-batching",
            "--cb-num-blocks",
            str(args.cb_num_blocks),
            "--cb-max-batch-tokens",
            str(args.cb_max_batch_tokens),
        ]
    return cmd


async def measure_server(
    srv, name: str, args, scenarios: list[tuple[str, list[dict], list[int]]], join: bool, rss: bool
) -> tuple[list[dict], dict | None, dict | None]:
    """Run the load scenarios (label, bodies, stream counts) against a started server."""
    model = bench.first_model_id(srv.url)
    await bench.warmup(srv.url, model, n=2, max_tokens=4)
    rows = []
    for label, bodies, stream_counts in scenarios:
        for n in stream_counts:
            if srv.rss:
                srv.rss.reset()
            noise = bench.cpu_noise([srv.proc.pid])
            s = await bench.run_load(
                srv.url,
                model,
                n,
                args.max_tokens,
                requests=n * args.requests_per_stream,
                bodies=bodies,
                label=f"{name} {label}".strip(),
                timeout=args.timeout,
            )
            s["system"], s["scenario"] = name, label
            if srv.rss:
                s["peak_rss_mib"] = round(srv.rss.peak / 2**20, 1)
            if noise:
                s.update(noise.stop())
            print(bench.table_row(s), flush=True)
            rows.append(s)
    jl = None
    if join:
        noise = bench.cpu_noise([srv.proc.pid])
        jl = await bench.join_latency(
            srv.url, model, long_tokens=args.join_long_tokens, delay=args.join_delay, repeats=args.join_repeats
        )
        jl["system"] = name
        if noise:
            jl.update(noise.stop())
        print(
            f"  join latency [{name}]: alone {jl.get('short_ttft_alone_s')} s, "
            f"during a long generation {jl.get('short_ttft_joined_s')} s",
            flush=True,
        )
    mem = None
    if rss and srv.rss:
        srv.rss.reset()
        noise = bench.cpu_noise([srv.proc.pid])
        s = await bench.run_load(
            srv.url,
            model,
            args.rss_streams,
            args.rss_tokens,
            requests=args.rss_streams,
            label=f"{name} rss {args.rss_streams}x{args.rss_tokens}",
            timeout=args.timeout,
        )
        mem = {
            "system": name,
            "streams": args.rss_streams,
            "max_tokens": args.rss_tokens,
            "tokens": s["tokens"],
            "errors": s["errors"],
            "error_samples": s["error_samples"],
            "wall_s": s["wall_s"],
            "agg_tok_s": s["agg_tok_s"],
            "finish_reasons": s["finish_reasons"],
            "idle_rss_mib": round(srv.idle_rss / 2**20, 1) if srv.idle_rss else None,
            "peak_rss_mib": round(srv.rss.peak / 2**20, 1),
        }
        if noise:
            mem.update(noise.stop())
        print(
            f"  peak RSS [{name}] {args.rss_streams}x{args.rss_tokens}: {mem['peak_rss_mib']} MiB "
            f"(idle {mem['idle_rss_mib']} MiB, {s['tokens']} tokens, {s['errors']} errors "
            f"{s['error_samples'][:1]})",
            flush=True,
        )
    return rows, jl, mem


def serve_and_measure(label: str, cmd: list[str], args, out_dir: Path, scenarios, join: bool, rss: bool):
    srv = bench.BenchServer(label, cmd, log_dir=out_dir / "logs", cwd=ROOT, ready_timeout=args.ready_timeout)
    srv.start()
    try:
        print(f"  [{label}] ready in {srv.load_s:.1f} s, idle RSS {srv.idle_rss / 2**20:.0f} MiB", flush=True)
        rows, jl, mem = asyncio.run(measure_server(srv, label, args, scenarios, join, rss))
        info = {
            "label": label,
            "cmd": srv.cmd,
            "load_s": round(srv.load_s, 2),
            "idle_rss_mib": round(srv.idle_rss / 2**20, 1) if srv.idle_rss else None,
            "log": str(srv.log_path),
        }
        return rows, jl, mem, info
    finally:
        srv.stop()


# ---- report ----------------------------------------------------------------------------
def format_bytes() -> dict:
    """Bytes one decode step reads per weight format: fp32 (the converted directory), int8 as
    ``--weights int8`` holds it, and the GGUF as llama.cpp runs it (``directions.gguf_load``)."""
    from directions.demo import ensure_demo_gguf
    from directions.gguf_load import bytes_per_token

    b = bytes_per_token(ensure_demo_gguf())
    return {"fp32": weight_bytes(model_dir())["bytes_read_per_decode_step"], "int8": b["int8"], "gguf": b["gguf"]}


FORMAT_OF_SYSTEM = {
    "frankly": "fp32",
    "frankly --weights int8": "int8",
    "frankly --engine llamacpp": "gguf",
    "llama_cpp.server (bare)": "gguf",
}


def limit_report(res: dict) -> str:
    """Single-stream, steering-off speed of each system as a fraction of its own weight format's limit:
    measured read bandwidth (torch_read) / bytes read per token."""
    bw, fb = res.get("bandwidth"), (res.get("weights") or {}).get("format_bytes_per_token")
    if not bw or not fb:
        return ""
    rows = [("model.generate fp32", "fp32", (res.get("generate") or {}).get("batch1_decode_tok_s"))]
    for r in res.get("runs", []):
        if r.get("streams") == 1 and r.get("scenario") in ("steering off", "") and r["system"] in FORMAT_OF_SYSTEM:
            rows.append((r["system"], FORMAT_OF_SYSTEM[r["system"]], r.get("per_stream_tok_s")))
    out = f"\n\nSingle stream, steering off, against each format's bandwidth limit ({bw['torch_read_gbs']} GB/s read):\n\n"
    out += "| system | weights | MB read per token | limit tok/s | tok/s | fraction of limit |\n|---|---|---|---|---|---|\n"
    for system, fmt, tps in rows:
        if tps:
            limit = bw["torch_read_gbs"] * 1e9 / fb[fmt]
            out += f"| {system} | {fmt} | {fb[fmt] / 1e6:.0f} | {limit:.1f} | {tps} | {100 * tps / limit:.0f}% |\n"
    return out


def scaling_report(res: dict) -> str:
    """Each system's N-stream aggregate against its own single stream, counted two ways.

    Aggregate over aggregate compares like with like (both include prompt processing, at the
    same share of prompt tokens per generated token); aggregate over the single stream's decode
    rate (time to first token left out) is the stricter reading: it charges the N-stream run
    for its N prefills but not the single stream for its one.
    """
    runs = res.get("runs", [])
    single = {(r.get("system"), r.get("scenario")): r for r in runs if r.get("streams") == 1}
    base_off = {r.get("system"): r for r in runs if r.get("streams") == 1 and r.get("scenario") == "steering off"}
    rows = []
    for r in runs:
        n = r.get("streams") or 0
        if n <= 1 or not r.get("agg_tok_s"):
            continue
        one = single.get((r.get("system"), r.get("scenario"))) or base_off.get(r.get("system"))
        if not one or not one.get("agg_tok_s"):
            continue
        same = "" if one.get("scenario") == r.get("scenario") else f" (vs {one.get('scenario')})"
        dec = one.get("per_stream_tok_s")
        rows.append(
            f"| {r.get('system')} | {r.get('scenario')}{same} | {n} | {r['agg_tok_s']} | {one['agg_tok_s']} | "
            f"{r['agg_tok_s'] / one['agg_tok_s']:.2f}x | {dec} | "
            f"{(r['agg_tok_s'] / dec) if dec else float('nan'):.2f}x |"
        )
    if not rows:
        return ""
    res["scaling"] = rows
    return (
        "\n\nScaling (N-stream aggregate against the same system's single stream; the first ratio counts "
        "prompt processing on both sides, the second leaves it out of the single stream only):\n\n"
        "| system | steering | streams | aggregate tok/s | 1 stream aggregate | ratio | 1 stream decode tok/s "
        "| ratio to decode |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def report(res: dict) -> str:
    lines = [bench.table_header()]
    mt = res["config"]["max_tokens"]
    bw = res.get("bandwidth")
    wb = res.get("weights")
    if bw and wb:
        bound = bw["copy_gbs"] * 1e9 / wb["bytes_read_per_decode_step"]
        gemv = bw["torch_gemv_gbs"] * 1e9 / wb["bytes_read_per_decode_step"]
        res["bound"] = {"copy_bound_tok_s": round(bound, 2), "gemv_bound_tok_s": round(gemv, 2)}
        lines.append(
            bench.table_row(
                {
                    "label": f"bandwidth bound ({bw['copy_gbs']} GB/s copy / {wb['bytes_read_per_decode_step'] / 1e9:.2f} GB "
                    f"per token; GEMV-achieved {bw['torch_gemv_gbs']} GB/s -> {gemv:.2f})",
                    "streams": 1,
                    "per_stream_tok_s": round(bound, 2),
                    "other_cores": bw.get("other_cores"),
                }
            )
        )
    g = res.get("generate")
    if g:
        lines.append(
            bench.table_row(
                {
                    "label": f"model.generate batch 1 (greedy, {mt} tokens, decode only)",
                    "streams": 1,
                    "requests": len(g["batch1"]),
                    "tokens": sum(r["tokens"] for r in g["batch1"]),
                    "agg_tok_s": g["batch1_e2e_tok_s"],
                    "per_stream_tok_s": g["batch1_decode_tok_s"],
                    "ttft_p50_s": g["batch1"][0]["prefill_s"],
                    "other_cores": g.get("other_cores"),
                }
            )
        )
        if "batchN" in g:
            b = g["batchN"]
            lines.append(
                bench.table_row(
                    {
                        "label": f"model.generate static batch {b['batch']} (left-padded)",
                        "streams": b["batch"],
                        "requests": b["batch"],
                        "tokens": b["batch"] * b["tokens_per_row"],
                        "wall_s": b["total_s"],
                        "agg_tok_s": b["agg_tok_s"],
                        "per_stream_tok_s": round(b["decode_agg_tok_s"] / b["batch"], 3),
                        "ttft_p50_s": b["prefill_s"],
                        "other_cores": g.get("other_cores"),
                    }
                )
            )
    for r in res.get("runs", []):
        lines.append(bench.table_row(r))
    out = "\n".join(lines)
    if res.get("join"):
        out += "\n\nJoin latency (TTFT of a short request alone vs. arriving "
        out += f"{res['config']['join_delay']} s after the first token of a {res['config']['join_long_tokens']}"
        out += "-token generation):\n\n"
        out += (
            "| system | TTFT alone s | TTFT joined s | penalty s | long stream max gap near join s "
            "| long ITL p50 s | other CPU |\n|---|---|---|---|---|---|---|\n"
        )
        for j in res["join"]:
            ls = (j.get("long_stream") or [{}])[0]
            out += (
                f"| {j['system']} | {j.get('short_ttft_alone_s')} | {j.get('short_ttft_joined_s')} | "
                f"{j.get('join_penalty_s')} | {ls.get('max_gap_near_join_s')} | {ls.get('itl_p50_s')} | "
                f"{j.get('other_cores')} |\n"
            )
    out += scaling_report(res)
    out += limit_report(res)
    if res.get("memory") and wb:
        out += f"\n\nMemory (weights {wb['weight_bytes'] / 2**20:.0f} MiB on disk, {', '.join(wb['dtypes'])}; "
        out += f"KV cache {wb['kv_cache_bytes_per_token_fp32'] / 1024:.1f} KiB per token):\n\n"
        out += (
            "| system | load | tokens | errors | idle RSS MiB | peak RSS MiB | peak / weights |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for m in res["memory"]:
            out += (
                f"| {m['system']} | {m['streams']} x {m['max_tokens']} | {m['tokens']} | {m['errors']} | "
                f"{m['idle_rss_mib']} | {m['peak_rss_mib']} | {m['peak_rss_mib'] * 2**20 / wb['weight_bytes']:.2f} |\n"
            )
    return out


# ---- main ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark frankly against transformers serve and model.generate.")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for checking the harness (16 tokens, streams 1,2, short join, small RSS load)",
    )
    p.add_argument("--max-tokens", type=int, help="max_tokens per request (default 64; quick 16)")
    p.add_argument("--streams", help="comma list of concurrent streams (default 1,8; quick 1,2)")
    p.add_argument("--requests-per-stream", type=int, help="requests per run = streams x this (default 2; quick 1)")
    p.add_argument(
        "--only",
        help=f"comma list of sections to run, from {','.join(SECTIONS)} (frankly-packed and frankly-int8-aten only when named)",
    )
    p.add_argument("--skip", help="comma list of sections to leave out")
    p.add_argument("--join-long-tokens", type=int, help="length of the long generation (default 256; quick 48)")
    p.add_argument(
        "--join-delay",
        type=float,
        help="seconds after the long request's first token before the short one is sent (default 2; quick 1)",
    )
    p.add_argument("--join-repeats", type=int, default=1)
    p.add_argument("--rss-streams", type=int, help="streams for the peak-RSS load (default 8; quick 2)")
    p.add_argument("--rss-tokens", type=int, help="max_tokens for the peak-RSS load (default 512; quick 32)")
    p.add_argument("--gen-prompts", type=int, help="prompts for the batch-1 generate baseline (default 2; quick 1)")
    p.add_argument("--bw-mib", type=int, help="bandwidth buffer MiB (default 512; quick 128)")
    p.add_argument("--bw-repeats", type=int, default=5)
    p.add_argument("--num-threads", type=int, help="torch threads for every system (default: torch's default)")
    p.add_argument("--direction", help="refusal direction file (default: shipped, else a random one)")
    p.add_argument("--cb-num-blocks", type=int, default=64, help="transformers serve CB cache blocks (x256 tokens)")
    p.add_argument("--cb-max-batch-tokens", type=int, default=2048)
    p.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="per-request timeout s, client side and frankly's --request-timeout (default 3600)",
    )
    p.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for a server to load")
    p.add_argument("--out", default="bench-results", help="output folder (JSON, markdown, server logs)")
    # internal: the generate baseline runs in a child process so its memory and threads are its own
    p.add_argument("--worker-generate", help=argparse.SUPPRESS)
    p.add_argument("--gen-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "max_tokens": (64, 16),
        "streams": ("1,8", "1,2"),
        "requests_per_stream": (2, 1),
        "join_long_tokens": (256, 48),
        "join_delay": (2.0, 1.0),
        "rss_streams": (8, 2),
        "rss_tokens": (512, 32),
        "gen_prompts": (2, 1),
        "bw_mib": (512, 128),
    }
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if q and args.bw_repeats == 5:
        args.bw_repeats = 2
    args.streams_list = [int(x) for x in str(args.streams).split(",") if x]
    only = set(args.only.split(",")) if args.only else set(SECTIONS) - OPT_IN_SECTIONS
    skip = set(args.skip.split(",")) if args.skip else set()
    unknown = (only | skip) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.sections = only - skip
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker_generate:
        r = generate_worker(args.max_tokens, args.gen_batch, args.gen_prompts, args.num_threads)
        Path(args.worker_generate).write_text(json.dumps(r, indent=2))
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sec = args.sections
    res: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker_generate",)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "argv": sys.argv,
    }
    res["config"]["sections"] = sorted(sec)
    try:
        import torch
        import transformers

        res["machine"].update(
            torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads()
        )
    except ImportError:
        pass
    res["weights"] = weight_bytes(model_dir())
    res["weights"]["format_bytes_per_token"] = format_bytes()
    res["runs"], res["join"], res["memory"], res["servers"] = [], [], [], []

    if "bandwidth" in sec:
        print("== bandwidth", flush=True)
        noise = bench.cpu_noise([])
        res["bandwidth"] = run_bandwidth(args)
        if noise:
            res["bandwidth"].update(noise.stop())
        print(f"  {res['bandwidth']}", flush=True)
    if "generate" in sec:
        print("== model.generate", flush=True)
        noise = bench.cpu_noise([])
        res["generate"] = run_generate(args, out_dir)
        if noise:
            res["generate"].update(noise.stop())
        print(
            f"  batch 1 decode {res['generate']['batch1_decode_tok_s']} tok/s"
            + (
                f", static batch {res['generate']['batchN']['batch']}: {res['generate']['batchN']['agg_tok_s']} tok/s"
                if "batchN" in res["generate"]
                else ""
            ),
            flush=True,
        )

    print(bench.table_header(), flush=True)
    if sec & {"frankly", "join", "rss", "frankly-packed", "frankly-int8", "frankly-int8-aten"}:
        direction, origin = ensure_direction(out_dir, args.direction)
        res["direction"] = {"path": direction, "origin": origin}
        scen = []
        if "frankly" in sec:
            scen = steering_scenarios(args.streams_list)
        rows, jl, mem, info = serve_and_measure(
            "frankly", frankly_cmd(args, direction), args, out_dir, scen, "join" in sec, "rss" in sec
        )
        res["runs"] += rows
        res["servers"].append(info)
        res["join"] += [jl] if jl else []
        res["memory"] += [mem] if mem else []
        for name, flags in (
            ("frankly-packed", ["--packed-weights"]),
            ("frankly-int8", ["--weights", "int8"]),
            ("frankly-int8-aten", ["--weights", "int8", "--int8-kernel", "aten"]),
        ):
            if name not in sec:
                continue
            # the same server with other weights: oneDNN-prepacked fp32, or int8 weight-only (bf16 activations)
            # on frankly's kernel or on torch's (frankly-int8-aten, opt-in)
            rows, _, mem, info = serve_and_measure(
                f"frankly {' '.join(flags)}",
                [*frankly_cmd(args, direction), *flags],
                args,
                out_dir,
                steering_scenarios(args.streams_list),
                False,
                "rss" in sec,
            )
            res["runs"] += rows
            res["servers"].append(info)
            res["memory"] += [mem] if mem else []
    if "frankly-llamacpp" in sec:
        # frankly's llama.cpp engine on the original Q4_K_M GGUF: the same scenarios as the torch engine
        direction, _ = ensure_direction(out_dir, args.direction)
        rows, _, _, info = serve_and_measure(
            "frankly --engine llamacpp",
            [*frankly_cmd(args, direction), "--engine", "llamacpp"],
            args,
            out_dir,
            steering_scenarios(args.streams_list),
            False,
            False,
        )
        res["runs"] += rows
        res["servers"].append(info)
    if "llamacpp-server" in sec:
        rows, _, _, info = serve_and_measure(
            "llama_cpp.server (bare)",
            llamacpp_server_cmd(args),
            args,
            out_dir,
            [("", [{}], args.streams_list)],
            False,
            False,
        )
        res["runs"] += rows
        res["servers"].append(info)
    for key, cb in (("hf", False), ("hf-cb", True)):
        if key not in sec:
            continue
        label = "transformers serve" + (" --continuous-batching" if cb else "")
        scen = [("", [{}], args.streams_list)]
        rows, jl, _, info = serve_and_measure(label, hf_cmd(args, cb), args, out_dir, scen, "join" in sec, False)
        res["runs"] += rows
        res["servers"].append(info)
        res["join"] += [jl] if jl else []

    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    md = report(res)
    print("\n" + md)
    print(f"\ntotal wall time {res['wall_s']} s")
    (out_dir / "bench_compare.json").write_text(json.dumps(res, indent=2, default=str))
    (out_dir / "bench_compare.md").write_text(md + "\n")
    print(f"wrote {out_dir / 'bench_compare.json'} and {out_dir / 'bench_compare.md'}")
    failed = any(r["errors"] for r in res["runs"]) or any(m["errors"] for m in res["memory"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
