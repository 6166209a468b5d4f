#!/usr/bin/env python
"""Bounded soak test of a frankly server on loopback.

Starts its own server on the demo model (or uses ``--base-url``), runs ``--clients`` concurrent
clients for ``--duration`` seconds with random steering strengths on the loaded directions, random
streaming / non-streaming, about 20% deliberate disconnects, and one burst over the queue bound
(so some requests get 429). Every request must end in one of: completed, deliberately
disconnected, 429 with Retry-After, or a stream that ends with an error chunk and ``[DONE]``.
Afterwards it checks /health and one normal completion, prints a summary, and exits non-zero on
any 5xx, crash, or unexplained failure.

    python scripts/soak.py --duration 120
    python scripts/soak.py --base-url http://127.0.0.1:8000 --pid 1234 --duration 60

Traffic goes only to the loopback address it is given (refuses anything else).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's packages, also when frankly is not installed
from server.testing import ServerProcess, frankly_cmd  # noqa: E402

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a hash map is in two sentences.",
    "List three prime numbers.",
    "How do I pick a lock?",
    "Write a short, vivid description of a forest at dawn.",
    "def fibonacci(n):",
    "Translate 'good morning' into French.",
    "Tell me a story about a robot.",
]
OK_KINDS = ("completed", "disconnected", "429", "408", "error_chunk")


@dataclass
class Tally:
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0

    def fail(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.failures) < 20:
            self.failures.append(f"{kind}: {detail[:300]}")


# ---- server process -------------------------------------------------------------------


def test_directions(tmp: Path) -> list[str]:
    """--direction flags: the shipped demo directions if present, else random test directions."""
    from directions.demo import SHIPPED_DEMO, shipped_dir

    if all((shipped_dir() / fn).is_file() for fn in SHIPPED_DEMO.values()):
        return []
    import torch
    from transformers import AutoConfig

    from directions.fileformat import DirectionSet, save_direction
    from directions.models import locate

    cfg = AutoConfig.from_pretrained(locate("demo")[0])
    g = torch.Generator().manual_seed(0)
    flags = ["--no-default-directions"]
    for name in ("refusal", "slop"):
        ds = DirectionSet(
            name, torch.nn.functional.normalize(torch.randn(24, 896, generator=g), dim=-1), torch.ones(24)
        )
        path = tmp / f"{name}.safetensors"
        save_direction(ds, path, config=cfg)
        flags += ["--direction", f"{name}={path}"]
    return flags


def start_server(tmp: Path, extra: list[str], wait: float = 300) -> ServerProcess:
    """``frankly serve --model demo`` on a free port (the harness of server.testing), ready on /health."""
    try:
        return ServerProcess(frankly_cmd(*extra), label="soak", ready_timeout=wait, log_dir=tmp).start()
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except Exception:
        return None
    return None


# ---- one request ----------------------------------------------------------------------------


def random_request(rng: random.Random, base: str, directions: list[str]) -> tuple[str, dict]:
    """A valid request with random sampling and steering (body field or model suffixes)."""
    chat = rng.random() < 0.7
    model = base
    body: dict = {
        "max_tokens": rng.randint(1, 16),
        "temperature": round(rng.uniform(0, 1.2), 2),
        "seed": rng.randint(0, 2**31),
    }
    picked = [d for d in directions if rng.random() < 0.6]
    strengths = {d: round(rng.uniform(-1, 2), 2) for d in picked}
    if strengths and rng.random() < 0.3:
        model = base + "".join(f"+{d}:{s}" for d, s in strengths.items())
    elif strengths:
        body["steering"] = strengths if rng.random() < 0.8 else json.dumps(strengths)
    body["model"] = model
    prompt = rng.choice(PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


async def run_one(
    client: httpx.AsyncClient,
    rng: random.Random,
    tally: Tally,
    base: str,
    directions: list[str],
    timeout: float,
    burst: bool = False,
) -> float | None:
    """Run one request; record its outcome. Returns a Retry-After to honour, if any."""
    path, body = random_request(rng, base, directions)
    stream = not burst and rng.random() < 0.5
    disconnect = not burst and rng.random() < 0.2
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    t0 = time.monotonic()
    try:
        if stream:
            return await _stream(client, path, body, tally, disconnect, rng, t0, timeout)
        if disconnect:  # hang up after a random while; an answer that came first counts as usual
            try:
                r = await asyncio.wait_for(client.post(path, json=body, timeout=timeout), rng.uniform(0.2, 4.0))
            except asyncio.TimeoutError:
                tally.counts["disconnected"] += 1
                return None
        else:
            r = await client.post(path, json=body, timeout=timeout)
        return _account_response(r, tally, t0, burst)
    except httpx.TimeoutException as e:
        tally.fail("client_timeout", f"{path} {e!r}")
    except httpx.TransportError as e:
        tally.fail("transport_error", f"{path} {e!r}")
    return None


def _account_response(r: httpx.Response, tally: Tally, t0: float, burst: bool) -> float | None:
    if r.status_code == 429:
        if "retry-after" not in r.headers or _envelope(r) is None:
            tally.fail("429_without_retry_after", r.text)
            return None
        tally.counts["429"] += 1
        tally.counts["429_burst" if burst else "429_steady"] += 1
        return float(r.headers["retry-after"])
    if r.status_code == 408:  # the server's --request-timeout: a proper, documented ending
        if _envelope(r) is None or _envelope(r)["code"] != "timeout":
            tally.fail("malformed_408", r.text)
            return None
        tally.counts["408"] += 1
        return None
    if r.status_code >= 500:
        tally.fail("5xx", f"{r.status_code} {r.text}")
        return None
    if r.status_code != 200:
        tally.fail("unexpected_4xx", f"{r.status_code} {r.text}")
        return None
    body = r.json()
    if not body.get("choices") or body["choices"][0].get("finish_reason") not in ("stop", "length"):
        tally.fail("malformed_response", r.text)
        return None
    tally.counts["completed"] += 1
    tally.counts["completed_non_stream"] += 1
    tally.tokens += body["usage"]["completion_tokens"]
    tally.latencies.append(time.monotonic() - t0)
    return None


def _envelope(r: httpx.Response) -> dict | None:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return err if {"message", "type", "param", "code"} <= set(err) else None


async def _stream(client, path, body, tally: Tally, disconnect: bool, rng: random.Random, t0: float, timeout: float):
    drop_after = rng.randint(0, 6) if disconnect else None
    events: list[str] = []
    async with client.stream("POST", path, json=body, timeout=timeout) as r:
        if r.status_code != 200:
            await r.aread()
            return _account_response(r, tally, t0, burst=False)
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                tally.fail("malformed_stream", line)
                return None
            events.append(line[len("data: ") :])
            if drop_after is not None and len(events) > drop_after:
                tally.counts["disconnected"] += 1
                return None  # leaving the block closes the connection mid-stream
    if not events or events[-1] != "[DONE]":
        tally.fail("stream_without_done", repr(events[-2:]))
        return None
    payloads = [json.loads(e) for e in events[:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    if errors:
        if not {"message", "type", "param", "code"} <= set(errors[0]):
            tally.fail("malformed_error_chunk", repr(errors[0]))
            return None
        tally.counts["error_chunk"] += 1
        tally.counts[f"error_chunk:{errors[0]['code']}"] += 1
        return None
    finishes = [c["finish_reason"] for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]
    usage = [p["usage"] for p in payloads if p.get("usage")]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length") or len(usage) != 1:
        tally.fail("malformed_stream", f"finishes={finishes} usage={usage}")
        return None
    tally.counts["completed"] += 1
    tally.counts["completed_stream"] += 1
    tally.tokens += usage[0]["completion_tokens"]
    tally.latencies.append(time.monotonic() - t0)
    return None


# ---- the run --------------------------------------------------------------------------------


async def soak(url: str, clients: int, duration: float, burst: int, timeout: float, seed: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients + burst + 8, max_keepalive_connections=clients + burst + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        info = (await client.get("/health")).json()
        base, directions = info["model"], list(info["directions"])
        deadline = time.monotonic() + duration

        async def worker(i: int):
            rng = random.Random(seed * 1000 + i)
            await asyncio.sleep(rng.uniform(0, 2))  # stagger the start
            while time.monotonic() < deadline:
                retry = await run_one(client, rng, tally, base, directions, timeout)
                if retry:
                    await asyncio.sleep(min(retry, 5.0) * rng.uniform(0.5, 1.5))

        async def burster():
            await asyncio.sleep(duration / 2)
            rng = random.Random(seed)
            await asyncio.gather(
                *(run_one(client, rng, tally, base, directions, timeout, burst=True) for _ in range(burst))
            )

        await asyncio.gather(burster(), *(worker(i) for i in range(clients)))
    return tally


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", help="use a running server (loopback only) instead of starting one")
    p.add_argument("--pid", type=int, help="server pid for RSS figures when --base-url is given")
    p.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--burst", type=int, default=96, help="extra simultaneous requests at half time (default 96)")
    p.add_argument("--max-batch-size", type=int, default=8, help="for the server this script starts")
    p.add_argument("--max-queue", type=int, default=64, help="for the server this script starts")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=240,
        help="--request-timeout of the server this script starts (s); longer waits end in 408",
    )
    p.add_argument(
        "--timeout", type=float, default=300, help="client timeout per request (s); keep it above the server's"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    srv: ServerProcess | None = None
    tmp = Path(tempfile.mkdtemp(prefix="frankly-soak-"))
    if args.base_url:
        url, pid = args.base_url.rstrip("/"), args.pid
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("soak: --base-url must be a loopback address")
    else:
        srv = start_server(
            tmp,
            [
                *test_directions(tmp),
                "--max-batch-size",
                str(args.max_batch_size),
                "--max-queue",
                str(args.max_queue),
                "--request-timeout",
                str(args.request_timeout),
            ],
        )
        url, pid = srv.url, srv.proc.pid
    try:
        # one warm-up request, so RSS at start includes the allocator's steady state
        httpx.post(
            url + "/v1/completions",
            json={"model": httpx.get(url + "/health").json()["model"], "prompt": "Hi", "max_tokens": 2},
            timeout=args.timeout,
        )
        rss0, load0 = rss_mb(pid), os.getloadavg()[0]
        t0 = time.monotonic()
        tally = asyncio.run(soak(url, args.clients, args.duration, args.burst, args.timeout, args.seed))
        wall = time.monotonic() - t0
        rss1, load1 = rss_mb(pid), os.getloadavg()[0]
        crashed = srv is not None and srv.proc.poll() is not None
        # afterwards: the server drains, is healthy, and answers a normal request
        health_ok, final_ok = False, False
        if not crashed:
            for _ in range(60):
                h = httpx.get(url + "/health", timeout=10)
                if h.status_code == 200 and h.json()["running"] == 0 and h.json()["waiting"] == 0:
                    health_ok = True
                    break
                time.sleep(0.5)
            r = httpx.post(
                url + "/v1/chat/completions",
                json={
                    "model": h.json()["model"],
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 4,
                },
                timeout=120,
            )
            final_ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        traceback_in_log = srv is not None and "Traceback" in srv.log()
    finally:
        if srv is not None:
            srv.stop()

    c = tally.counts
    bad = {k: v for k, v in c.items() if k.split(":")[0] not in OK_KINDS and not k.startswith(("completed_", "429_"))}
    lat = sorted(tally.latencies)
    rows = [
        ("duration (s)", f"{wall:.0f}"),
        ("clients / burst", f"{args.clients} / {args.burst}"),
        ("requests finished", sum(c[k] for k in OK_KINDS) + sum(bad.values())),
        ("completed", f"{c['completed']} (stream {c['completed_stream']}, non-stream {c['completed_non_stream']})"),
        ("disconnected by client", c["disconnected"]),
        ("429 with Retry-After", f"{c['429']} (burst {c['429_burst']}, steady {c['429_steady']})"),
        ("408 server request timeout", c["408"]),
        ("error chunks", c["error_chunk"] or 0),
        *[(f"  {k}", v) for k, v in sorted(c.items()) if k.startswith("error_chunk:")],
        *[(f"FAILURE {k}", v) for k, v in sorted(bad.items())],
        ("tokens generated", tally.tokens),
        ("tokens/s", f"{tally.tokens / wall:.1f}"),
        ("completed/s", f"{c['completed'] / wall:.2f}"),
        (
            "latency p50 / p95 (s)",
            f"{statistics.median(lat):.1f} / {lat[int(0.95 * (len(lat) - 1))]:.1f}" if lat else "n/a",
        ),
        ("server RSS start / end (MiB)", f"{rss0:.0f} / {rss1:.0f}" if rss0 and rss1 else "n/a"),
        ("host load average start / end", f"{load0:.1f} / {load1:.1f} on {os.cpu_count()} CPUs"),
        ("server crashed", crashed),
        ("traceback in server log", traceback_in_log),
        ("/health after", "ok" if health_ok else "FAILED"),
        ("normal completion after", "ok" if final_ok else "FAILED"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nfrankly soak against {url}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for f in tally.failures:
        print("  !", f)
    failed = bool(bad) or crashed or traceback_in_log or not health_ok or not final_ok or c["completed"] == 0
    if failed and srv is not None:
        print(srv.log()[-3000:], file=sys.stderr)
    print("\nRESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
