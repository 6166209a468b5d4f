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
and (optionally, for --serve memory) psutil.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx

# the server harness shared with the tests and the soak run; the repo root is on the path
# so that this file also runs as a plain script from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.testing import ServerProcess

# Short prompts that ask for long answers, so that generations usually run to
# max_tokens without an ignore_eos switch. Varied: code, prose, lists, maths.
# Checked on the demo model (greedy): every one runs to at least 64 tokens;
# questions phrased "Explain ..." were sometimes answered by echoing the question.
PROMPTS = [
    "Write a detailed, step-by-step tutorial on implementing a binary search tree in Python, with insert, delete and search, and explain each method.",
    "Write a step-by-step guide to the TCP three-way handshake: describe each packet, its flags and sequence numbers, and what happens when a packet is lost.",
    "Write a long short story about a lighthouse keeper who discovers a message in a bottle. Include dialogue and vivid descriptions.",
    "List 30 practical tips for writing maintainable code, with a one-paragraph explanation for each tip.",
    "Implement a simple HTTP server in C that serves static files, and explain every function you write.",
    "Describe the history of the printing press and its effects on European society, in at least ten paragraphs.",
    "Write a complete README for a command-line todo-list application, including installation, usage examples, configuration and FAQ.",
    "Explain how gradient descent works, derive the update rule for linear regression, and give a NumPy implementation with comments.",
    "Compare Python, Rust and Go for building web services. Discuss performance, safety, tooling and ecosystem in detail.",
    "Write a JavaScript module that implements a debounced search box with caching, and document it thoroughly.",
    "Give a detailed weekly meal plan for a vegetarian athlete, with recipes and a shopping list for every day.",
    "Write a Python program that uses both multiprocessing and threading to download and process files, and explain in detail when each one is the better choice.",
    "Write a SQL schema for an online bookstore with at least eight tables, then write ten example queries and explain them.",
    "Describe, step by step, how a compiler turns source code into machine code, covering lexing, parsing, optimisation and code generation.",
    "Write a long poem about the ocean in the style of a sea shanty, with at least twelve verses.",
    "Implement merge sort, quicksort and heapsort in Java, then compare their complexity and explain when to use each one.",
]


# ---- one request ------------------------------------------------------------------
@dataclass
class RequestResult:
    index: int
    client: int
    body_index: int
    prompt_index: int
    t_start: float  # perf_counter at send
    t_first: float | None = None  # first non-empty content chunk
    t_end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    content_chunks: int = 0
    usage_tokens: int | None = None  # completion_tokens from the usage chunk, if sent
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    text_chars: int = 0
    error: str | None = None
    status: int | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in pairwise(t)]

    @property
    def decode_rate(self) -> float | None:
        """Tokens/s this stream saw after its first token: (tokens - 1) / (last chunk - first chunk)."""
        if self.t_first is None or len(self.chunk_times) < 2 or self.tokens < 2:
            return None
        span = self.chunk_times[-1] - self.t_first
        return (self.tokens - 1) / span if span > 0 else None


def chat_body(model: str | None, prompt: str, max_tokens: int, include_usage: bool, extra: dict | None) -> dict:
    body: dict = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if model:
        body["model"] = model
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if extra:
        body.update(extra)
    return body


async def stream_request(
    client: httpx.AsyncClient, base_url: str, body: dict, res: RequestResult, timeout: float | None = None
) -> RequestResult:
    """Send one streaming chat request and fill ``res`` with timings as SSE events arrive."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    res.t_start = time.perf_counter()
    try:
        await asyncio.wait_for(_read_stream(client, url, body, res), timeout)
    except asyncio.TimeoutError:
        res.error = f"timeout after {timeout}s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.t_end = time.perf_counter()
    if res.error is None and res.tokens == 0:
        res.error = "no tokens generated"
    return res


async def _read_stream(client: httpx.AsyncClient, url: str, body: dict, res: RequestResult) -> None:
    async with client.stream("POST", url, json=body) as r:
        res.status = r.status_code
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            res.error = f"HTTP {r.status_code}: {text[:300]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                ev = json.loads(data)
            except json.JSONDecodeError:
                res.error = f"bad SSE data: {data[:200]}"
                continue
            if "error" in ev and not ev.get("choices"):
                res.error = f"stream error: {json.dumps(ev['error'])[:300]}"
                continue
            usage = ev.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                res.usage_tokens = int(usage["completion_tokens"])
                res.prompt_tokens = usage.get("prompt_tokens")
            for ch in ev.get("choices") or []:
                delta = ch.get("delta") or {}
                content = delta.get("content")
                if content is None:
                    content = ch.get("text")  # text-completion shaped chunks
                if content:
                    if res.t_first is None:
                        res.t_first = now
                    res.chunk_times.append(now)
                    res.content_chunks += 1
                    res.text_chars += len(content)
                if ch.get("finish_reason"):
                    res.finish_reason = ch["finish_reason"]


# ---- statistics ---------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (q in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _r(x, nd=3):
    return None if x is None else round(x, nd)


def summarize(results: list[RequestResult], wall: float, **meta) -> dict:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    rates = [r.decode_rate for r in ok if r.decode_rate is not None]
    tokens = sum(r.tokens for r in results)
    sources = {"usage" if r.usage_tokens is not None else "chunks" for r in results if r.tokens}
    finish: dict[str, int] = {}
    for r in ok:
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
    by_body: dict[int, dict] = {}
    for bi in sorted({r.body_index for r in results}):
        rs = [r for r in ok if r.body_index == bi]
        br = [r.decode_rate for r in rs if r.decode_rate is not None]
        by_body[bi] = {
            "requests": len(rs),
            "tokens": sum(r.tokens for r in rs),
            "per_stream_tok_s": _r(statistics.mean(br)) if br else None,
            "ttft_p50_s": _r(pct([r.ttft for r in rs if r.ttft is not None], 50)),
        }
    return {
        **meta,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "tokens": tokens,
        "tokens_source": "+".join(sorted(sources)) or "none",
        "tokens_per_request_mean": _r(tokens / len(results), 1) if results else None,
        "content_chunks": sum(r.content_chunks for r in results),
        "prompt_tokens_mean": _r(statistics.mean(pt), 1)
        if (pt := [r.prompt_tokens for r in ok if r.prompt_tokens])
        else None,
        "finish_reasons": finish,
        "wall_s": _r(wall),
        "agg_tok_s": _r(tokens / wall if wall > 0 else None, 2),
        "per_stream_tok_s": _r(statistics.mean(rates) if rates else None, 2),
        "per_stream_tok_s_p50": _r(pct(rates, 50), 2),
        "ttft_p50_s": _r(pct(ttfts, 50)),
        "ttft_p95_s": _r(pct(ttfts, 95)),
        "itl_p50_s": _r(pct(itls, 50), 4),
        "itl_p95_s": _r(pct(itls, 95), 4),
        "itl_max_s": _r(max(itls) if itls else None, 4),
        "e2e_p50_s": _r(pct([r.t_end - r.t_start for r in ok if r.t_end], 50)),
        "by_body": by_body,
        "per_request": [
            {
                "prompt": r.prompt_index,
                "body": r.body_index,
                "tokens": r.tokens,
                "finish": r.finish_reason,
                "ttft_s": _r(r.ttft),
                "e2e_s": _r(r.t_end - r.t_start if r.t_end else None),
                "error": r.error,
            }
            for r in results
        ],
    }


# ---- a load run -----------------------------------------------------------------------
async def run_load(
    base_url: str,
    model: str | None,
    streams: int,
    max_tokens: int,
    *,
    requests: int | None = None,
    duration: float | None = None,
    bodies: list[dict] | None = None,
    prompts: list[str] | None = None,
    include_usage: bool = True,
    timeout: float | None = 900,
    label: str = "",
) -> dict:
    """Run ``streams`` concurrent clients until ``requests`` are done (or ``duration`` s passed)."""
    prompts = prompts or PROMPTS
    bodies = bodies or [{}]
    if requests is None and duration is None:
        requests = streams
    results: list[RequestResult] = []
    counter = 0
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration if duration else None

        async def worker(ci: int):
            nonlocal counter
            bi = ci % len(bodies)
            while True:
                if requests is not None and counter >= requests:
                    return
                if deadline is not None and time.perf_counter() >= deadline:
                    return
                k = counter
                counter += 1
                pi = k % len(prompts)
                res = RequestResult(index=k, client=ci, body_index=bi, prompt_index=pi, t_start=0.0)
                results.append(res)
                body = chat_body(model, prompts[pi], max_tokens, include_usage, bodies[bi])
                await stream_request(client, base_url, body, res, timeout)

        await asyncio.gather(*(worker(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    return summarize(
        results, wall, label=label, url=base_url, model=model, streams=streams, max_tokens=max_tokens, bodies=bodies
    )


async def single_request(
    base_url: str,
    model: str | None,
    prompt: str,
    max_tokens: int,
    extra: dict | None = None,
    include_usage: bool = True,
    timeout: float | None = 900,
) -> RequestResult:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30)) as client:
        res = RequestResult(index=0, client=0, body_index=0, prompt_index=-1, t_start=0.0)
        return await stream_request(
            client, base_url, chat_body(model, prompt, max_tokens, include_usage, extra), res, timeout
        )


async def join_latency(
    base_url: str,
    model: str | None,
    *,
    long_tokens: int = 256,
    delay: float = 2.0,
    short_tokens: int = 8,
    repeats: int = 1,
    extra: dict | None = None,
    short_prompt: str = "Say hello.",
    long_prompt: str = PROMPTS[0],
) -> dict:
    """TTFT of a short request alone vs. arriving ``delay`` s after a long generation's first token.

    With continuous batching the joined TTFT should be about the short request's
    own prefill plus one decode step of the running batch; a server that runs
    requests one after another makes it wait for the long one to finish.
    """
    alone = []
    for _ in range(max(2, repeats)):
        r = await single_request(base_url, model, short_prompt, short_tokens, extra)
        if r.error:
            return {"error": r.error}
        alone.append(r.ttft)
    joined, long_info, errors = [], [], []
    for _ in range(repeats):
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30)) as client:
            long = RequestResult(index=0, client=0, body_index=0, prompt_index=-1, t_start=0.0)
            body = chat_body(model, long_prompt, long_tokens, True, extra)
            long_task = asyncio.create_task(stream_request(client, base_url, body, long))
            # Join a running decode, not a queued or prefilling request: wait for the long
            # request's first token, then ``delay`` seconds more.
            while long.t_first is None and not long_task.done():
                await asyncio.sleep(0.01)
            await asyncio.sleep(delay)
            short = await single_request(base_url, model, short_prompt, short_tokens, extra)
            await long_task
        if short.error or long.error:
            errors.append(short.error or long.error)
            continue
        joined.append(short.ttft)
        # The long stream's largest gap around the join is what it pays for the newcomer's prefill.
        near = [b - a for a, b in pairwise(long.chunk_times) if short.t_start <= b <= short.t_first + 1.0]
        long_info.append(
            {
                "ttft_s": _r(long.ttft),
                "tokens": long.tokens,
                "still_running_at_short_first_token": bool(long.chunk_times and long.chunk_times[-1] > short.t_first),
                "itl_p50_s": _r(pct(long.itls, 50), 4),
                "max_gap_near_join_s": _r(max(near) if near else None, 4),
            }
        )
    out = {
        "short_ttft_alone_s": _r(statistics.median(alone)),
        "short_ttft_alone_all_s": [_r(x) for x in alone],
        "short_ttft_joined_s": _r(statistics.median(joined)) if joined else None,
        "short_ttft_joined_all_s": [_r(x) for x in joined],
        "long_stream": long_info,
        "long_tokens": long_tokens,
        "delay_s": delay,
        "errors": errors,
    }
    if joined:
        out["join_penalty_s"] = _r(out["short_ttft_joined_s"] - out["short_ttft_alone_s"])
    return out


async def warmup(base_url: str, model: str | None, n: int = 1, max_tokens: int = 4, extra: dict | None = None) -> None:
    for i in range(n):
        r = await single_request(base_url, model, PROMPTS[i % len(PROMPTS)], max_tokens, extra)
        if r.error:
            raise RuntimeError(f"warm-up request failed: {r.error}")


def first_model_id(base_url: str) -> str | None:
    r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    r.raise_for_status()
    data = r.json().get("data") or []
    return data[0]["id"] if data else None


# ---- servers started by the benchmark ------------------------------------------------
class RssSampler:
    """Samples the resident set size of a process and its children in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil  # optional dependency; only needed when measuring memory

        self._proc = psutil.Process(pid)
        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except self._psutil.Error:
            return self.last
        for p in procs:
            with contextlib.suppress(self._psutil.Error):
                total += p.memory_info().rss
        self.last = total
        self.peak = max(self.peak, total)
        return total

    def reset(self) -> None:
        self.peak = self.sample()

    def start(self) -> RssSampler:
        self.reset()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)


class CpuNoise:
    """How busy the rest of the machine was during a run, so numbers from a shared machine can be read.

    ``other_cores``: CPU time used by processes other than ``pids`` (and their children) and this one,
    per second of wall time; ``steal_cores``: hypervisor steal time per second. Both 0 on a quiet machine.
    """

    def __init__(self, pids: list[int] | None = None):
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(p) for p in (pids or [])] + [psutil.Process()]

    def _ours(self) -> float:
        total = 0.0
        seen = set()
        for p in self._procs:
            try:
                for q in [p, *p.children(recursive=True)]:
                    if q.pid in seen:
                        continue
                    seen.add(q.pid)
                    t = q.cpu_times()
                    total += t.user + t.system
            except self._psutil.Error:
                pass
        # children that already exited and were waited for (e.g. a subprocess.run) are no longer listed
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ru.ru_utime + ru.ru_stime

    def _system(self) -> tuple[float, float]:
        t = self._psutil.cpu_times()
        busy = (
            sum(t)
            - t.idle
            - getattr(t, "iowait", 0.0)
            - getattr(t, "steal", 0.0)
            - getattr(t, "guest", 0.0)
            - getattr(t, "guest_nice", 0.0)
        )
        return busy, getattr(t, "steal", 0.0)

    def start(self) -> CpuNoise:
        self._t0 = time.perf_counter()
        self._sys0, self._steal0 = self._system()
        self._ours0 = self._ours()
        return self

    def stop(self) -> dict:
        wall = time.perf_counter() - self._t0
        busy, steal = self._system()
        ours = self._ours() - self._ours0
        other = max(0.0, busy - self._sys0 - ours)
        return {
            "other_cores": round(other / wall, 2),
            "steal_cores": round((steal - self._steal0) / wall, 2),
            "ours_cores": round(ours / wall, 2),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }


class BenchServer(ServerProcess):
    """A server started for the benchmark (``cmd`` may contain ``{port}``), ready when ``/v1/models``
    answers 200 (any OpenAI-compatible server has it); samples its memory once ready."""

    def __init__(self, label: str, cmd: list[str] | str, **kw):
        kw.setdefault("ready_timeout", 900)
        kw.setdefault("cwd", None)
        super().__init__(cmd, label=label, ready_path="/v1/models", **kw)
        self.rss: RssSampler | None = None
        self.idle_rss: int | None = None

    def start(self) -> BenchServer:
        super().start()
        try:
            self.rss = RssSampler(self.proc.pid).start()
            self.idle_rss = self.rss.sample()
        except ImportError:  # psutil is optional
            self.rss = None
        return self

    def stop(self, *args, **kw):
        if self.rss:
            self.rss.stop()
        return super().stop(*args, **kw)


# ---- output --------------------------------------------------------------------------
COLUMNS = [
    ("label", "run"),
    ("streams", "streams"),
    ("requests", "reqs"),
    ("errors", "err"),
    ("tokens", "gen tokens"),
    ("wall_s", "wall s"),
    ("agg_tok_s", "agg tok/s"),
    ("per_stream_tok_s", "per-stream tok/s"),
    ("ttft_p50_s", "TTFT p50 s"),
    ("ttft_p95_s", "TTFT p95 s"),
    ("itl_p50_s", "ITL p50 s"),
    ("itl_p95_s", "ITL p95 s"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("other_cores", "other CPU"),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table_header() -> str:
    return "| " + " | ".join(h for _, h in COLUMNS) + " |\n|" + "|".join("---" for _ in COLUMNS) + "|"


def table_row(s: dict) -> str:
    return "| " + " | ".join(_fmt(s.get(k)) for k, _ in COLUMNS) + " |"


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


def cpu_noise(pids: list[int]) -> CpuNoise | None:
    """A started CpuNoise when psutil is installed, else None."""
    try:
        return CpuNoise(pids).start()
    except ImportError:
        return None


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
