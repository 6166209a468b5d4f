"""The engine streams of one HTTP request: its choices merged, and its client watched.

A request with ``n`` choices is ``n`` engine requests; their events are interleaved as they
come. While a request waits for its first event (queued behind others), the client is
polled: one that hung up is cancelled in the queue instead of being prefilled for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
from fastapi import Request

from server.engine.protocol import Engine
from server.engine.types import GenerationRequest, StepOutput
from server.errors import ClientDisconnected

Events = AsyncIterator[tuple[int, StepOutput]]  # (choice index, event)
POLL_S = 0.5  # how often a waiting request checks that its client is still there


async def merged(engine: Engine, reqs: list[GenerationRequest]) -> Events:
    """Events of all ``reqs`` (choice ``i`` is ``reqs[i]``), interleaved as they come.

    Closing this iterator early cancels every engine request that has not finished."""
    gens = [engine.generate(r) for r in reqs]
    try:
        if len(gens) == 1:
            async for out in gens[0]:
                yield 0, out
                if out.finished:
                    return
            return
        async for item in _interleave(gens):
            yield item
    finally:
        for g in gens:
            await g.aclose()


async def _interleave(gens: list[AsyncIterator[StepOutput]]) -> Events:
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for out in g:
                await q.put((i, out))
        except BaseException as e:  # forwarded to the consumer
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out = await q.get()
            if isinstance(out, BaseException):
                raise out
            yield i, out
            if out.finished:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        # Let the pumps unwind (which cancels their engine requests) before the generators are
        # closed: closing one a pump still runs raises RuntimeError. Shielded, as Starlette
        # cancels the stream of a gone client level-triggered.
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def first_event(stream: Events, raw: Request) -> tuple[int, StepOutput]:
    """The first event (submission happens here, so engine refusals raise here), watching the
    client meanwhile: raises :class:`ClientDisconnected` if it hangs up first (the engine
    request is cancelled as the stream closes)."""
    task = asyncio.ensure_future(stream.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await raw.is_disconnected():
                break
    except BaseException:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await stream.aclose()
        raise
    task.cancel()  # the engine request is cancelled as its generator unwinds
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    await stream.aclose()
    raise ClientDisconnected("client disconnected while the request was queued")


async def drain_watching(consume, raw: Request) -> None:
    """Run ``consume()`` (reads the rest of a stream) to the end, polling the client: raises
    :class:`ClientDisconnected` if it hangs up first (an error response rather than
    CancelledError, which uvicorn logs as a crash)."""
    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=POLL_S)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected("client disconnected before the response was ready")
    task.result()
