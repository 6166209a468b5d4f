#!/usr/bin/env python
"""Load generator for any OpenAI-compatible chat server (streaming).

N concurrent clients send streaming ``/v1/chat/completions`` requests over a
fixed mix of prompts, greedy (temperature 0), with a fixed ``max_tokens``.
``ignore_eos`` is not an OpenAI field, so the prompts are chosen to produce
long answers and the tokens actually generated are counted and reported.

Per run it reports aggregate generated tokens/s, per-stream tokens/s, time to
first token (TTFT) and inter-token latency (ITL) percentiles and errors, as a
markdown table row and as JSON.

It can also start and stop the servers it measures (``--serve``), waiting for
``/v1/models``, so one command produces one table::

    # a running server
    python clients/bench.py --url http://127.0.0.1:8000 --streams 1,8 --max-tokens 64

    # per-request steering, or strengths cycled across the concurrent clients
    python clients/bench.py --url ... --extra-body '{"steering": {"refusal": 1.0}}'
    python clients/bench.py --url ... --bodies '[{"steering": {"refusal": 0}}, {"steering": {"refusal": 1}}]'

    # start the servers itself ({port} is replaced by a free port)
    python clients/bench.py --serve 'frankly=frankly serve --model demo --port {port}' \\
        --serve 'hf=transformers serve /path/to/model --port {port} --continuous-batching' --streams 1,8

Only the standard library, httpx, frankly's server harness (``server.testing``, for --serve)
and (optionally, for --serve memory) psutil. This file is the command line; the load generator
is ``clients/bench_load.py``, the summaries and the table ``clients/bench_report.py``, the
started servers and the memory and CPU sampling ``clients/bench_servers.py`` (all importable
from here: ``from clients import bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

# the server harness shared with the tests and the soak run; the repo root is on the path
# so that this file also runs as a plain script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clients.bench_load import (
    PROMPTS,
    RequestResult,
    chat_body,
    first_model_id,
    join_latency,
    run_load,
    single_request,
    stream_request,
    warmup,
)
from clients.bench_report import _r, pct, summarize, table_header, table_row
from clients.bench_servers import BenchServer, CpuNoise, RssSampler, cpu_noise

__all__ = [
    "PROMPTS",
    "BenchServer",
    "CpuNoise",
    "RequestResult",
    "RssSampler",
    "bench_target",
    "chat_body",
    "cpu_noise",
    "first_model_id",
    "join_latency",
    "main",
    "parse_args",
    "pct",
    "run_load",
    "single_request",
    "stream_request",
    "summarize",
    "table_header",
    "table_row",
    "warmup",
]


# ---- CLI -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server (without /v1)")
    target.add_argument(
        "--serve",
        action="append",
        metavar="LABEL=CMD",
        help="start this server command ({port} is substituted), measure it, stop it (repeatable)",
    )
    p.add_argument("--model", help="model id to send (default: the first id of /v1/models)")
    p.add_argument("--streams", default="1", help="comma list of concurrent client counts, one run each (default 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requests", type=int, help="total requests per run")
    g.add_argument("--requests-per-stream", type=int, default=2, help="requests per run = streams x this (default 2)")
    g.add_argument("--duration", type=float, help="seconds to keep issuing requests per run")
    p.add_argument("--extra-body", type=json.loads, help="JSON object merged into every request body")
    p.add_argument("--bodies", type=json.loads, help="JSON list of objects cycled across the concurrent clients")
    p.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage (count chunks)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests before measuring (default 1)")
    p.add_argument("--timeout", type=float, default=900, help="per-request timeout in seconds")
    p.add_argument("--label", default="", help="label for the table rows")
    p.add_argument("--server-pid", type=int, help="pid of the --url server, for the 'other CPU' column")
    p.add_argument("--json-out", help="write all run summaries here")
    p.add_argument(
        "--log-dir", default="bench-results/logs", help="server logs for --serve (default bench-results/logs)"
    )
    return p.parse_args(argv)


async def bench_target(url: str, label: str, args, server: BenchServer | None = None) -> list[dict]:
    model = args.model or first_model_id(url)
    bodies = args.bodies or [args.extra_body or {}]
    if args.bodies and args.extra_body:
        bodies = [{**args.extra_body, **b} for b in bodies]
    if args.warmup:
        await warmup(url, model, args.warmup, extra=bodies[0])
    out = []
    for n in [int(x) for x in str(args.streams).split(",") if x]:
        if server and server.rss:
            server.rss.reset()
        pid = server.proc.pid if server and server.proc else args.server_pid
        noise = cpu_noise([pid]) if pid else None  # without the server's pid its own CPU would count as "other"
        requests = args.requests if args.requests else (None if args.duration else n * args.requests_per_stream)
        s = await run_load(
            url,
            model,
            n,
            args.max_tokens,
            requests=requests,
            duration=args.duration,
            bodies=bodies,
            include_usage=not args.no_usage,
            timeout=args.timeout,
            label=label,
        )
        if server and server.rss:
            s["peak_rss_mib"] = round(server.rss.peak / 2**20, 1)
        if noise:
            s.update(noise.stop())
        print(table_row(s), flush=True)
        out.append(s)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    print(table_header(), flush=True)
    runs: list[dict] = []
    servers: list[dict] = []
    if args.url:
        runs += asyncio.run(bench_target(args.url, args.label or args.url, args))
    else:
        for spec in args.serve:
            label, _, cmd = spec.partition("=")
            with BenchServer(label, cmd, log_dir=args.log_dir) as srv:
                runs += asyncio.run(bench_target(srv.url, (args.label + " " + label).strip(), args, srv))
                servers.append(
                    {
                        "label": label,
                        "cmd": srv.cmd,
                        "load_s": _r(srv.load_s),
                        "idle_rss_mib": round(srv.idle_rss / 2**20, 1) if srv.idle_rss else None,
                    }
                )
    result = {
        "argv": sys.argv,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "servers": servers,
        "prompts": len(PROMPTS),
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    else:
        print(json.dumps(result, indent=2))
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
