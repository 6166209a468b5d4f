"""The load generator of ``clients/bench.py``: one streaming chat request, timed as its SSE
events arrive; ``streams`` concurrent clients over a fixed mix of prompts; and the TTFT of a
short request joining a running generation. Summaries and tables: :mod:`clients.bench_report`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from itertools import pairwise

import httpx

from clients.bench_report import join_report, long_stream_report, summarize

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
        short, long = await _join_once(
            base_url, model, (short_prompt, short_tokens), (long_prompt, long_tokens), delay, extra
        )
        if short.error or long.error:
            errors.append(short.error or long.error)
            continue
        joined.append(short.ttft)
        long_info.append(long_stream_report(long, short))
    return join_report(alone, joined, long_info, long_tokens=long_tokens, delay=delay, errors=errors)


async def _join_once(
    base_url: str,
    model: str | None,
    short_req: tuple[str, int],
    long_req: tuple[str, int],
    delay: float,
    extra: dict | None,
) -> tuple[RequestResult, RequestResult]:
    """(short, long): a short request (prompt, max_tokens) sent ``delay`` s after the long one's first token."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30)) as client:
        long = RequestResult(index=0, client=0, body_index=0, prompt_index=-1, t_start=0.0)
        body = chat_body(model, long_req[0], long_req[1], True, extra)
        long_task = asyncio.create_task(stream_request(client, base_url, body, long))
        # Join a running decode, not a queued or prefilling request: wait for the long
        # request's first token, then ``delay`` seconds more.
        while long.t_first is None and not long_task.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(delay)
        short = await single_request(base_url, model, short_req[0], short_req[1], extra)
        await long_task
    return short, long


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
