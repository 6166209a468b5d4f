"""Serving classes: turn validated OpenAI requests into engine requests and engine events into OpenAI responses.

No route logic here (see server/api/) and no model logic (see server/engine/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.engine import Engine, EngineOverloaded, GenerationRequest, SamplingParams, StepOutput
from server.engine.types import DirectionRequest, EngineStopped
from server.errors import (
    APIError,
    ClientDisconnected,
    EngineFailure,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    Unavailable,
)
from server.metrics import Metrics
from server.prompting import PromptError, chat_prompt_ids
from server.protocol import ChatCompletionRequest, CompletionRequest, new_id, now
from server.settings import ServerSettings
from server.steering import SteeringPolicy, steering_header

log = logging.getLogger("frankly.serving")

ROLES = {"system", "developer", "user", "assistant"}
# Below this, dividing fp32 logits by the temperature can overflow to inf and make sampling
# fail (a tiny temperature is greedy decoding in all but name): such requests run greedy.
MIN_TEMPERATURE = 1e-5
# A top_p that rounds to 0 in fp32 keeps no token at all (0/0 in sampling); this small a
# nucleus keeps only the top token, which is what such a request asks for.
MIN_TOP_P = 1e-6


@dataclass
class Prepared:
    """A validated request, ready for the engine: one GenerationRequest per choice."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: list[SamplingParams]
    steering: dict[str, DirectionRequest]
    stream: bool
    include_usage: bool


class OpenAIServing:
    """Chat and text completions over an :class:`Engine`."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        policy: SteeringPolicy,
        settings: ServerSettings,
        metrics: Metrics,
        max_model_len: int,
    ):
        self.engine = engine
        self.tok = tokenizer
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.max_model_len = max_model_len

    # ---- validation -----------------------------------------------------------
    def _messages(self, req: ChatCompletionRequest) -> list[dict]:
        out = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise InvalidRequest(
                    f"unsupported role '{m.role}' (supported: {', '.join(sorted(ROLES))})", param=f"messages[{i}].role"
                )
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise InvalidRequest(
                            f"content part type '{part.type}' is not supported (text only)",
                            param=f"messages[{i}].content[{j}]",
                        )
                    texts.append(part.text)
                content = "".join(texts)
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content or ""})
        if all(m["role"] != "user" for m in out) and all(m["role"] != "assistant" for m in out):
            raise InvalidRequest("messages must contain at least one user or assistant message", param="messages")
        return out

    def _stop(self, stop) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > self.settings.max_stop:
            raise InvalidRequest(f"at most {self.settings.max_stop} stop sequences", param="stop")
        for s in stops:
            if len(s) > self.settings.max_stop_len:
                raise InvalidRequest(
                    f"stop sequences are limited to {self.settings.max_stop_len} characters", param="stop"
                )
        return [s for s in stops if s]

    def _prepare(
        self,
        req,
        prompt_ids: list[int],
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        prefix: str,
        prompt_param: str,
        max_tokens_param: str = "max_tokens",
        logprobs_param: str = "top_logprobs",
    ) -> Prepared:
        s = self.settings
        steering = self.policy.resolve(req.model, req.steering)
        if req.n > s.max_n:
            raise InvalidRequest(f"n must be at most {s.max_n}", param="n")
        if top_logprobs > s.max_logprobs:
            raise InvalidRequest(f"{logprobs_param} must be at most {s.max_logprobs}", param=logprobs_param)
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            raise InvalidRequest(f"{max_tokens_param} must be at most {s.max_tokens_cap}", param=max_tokens_param)
        n_prompt = len(prompt_ids)
        room = self.max_model_len - n_prompt
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {n_prompt} tokens; this model's context is {self.max_model_len}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        # Clamp to the room left in the context (frontends send large defaults); the
        # answer then ends with finish_reason 'length'.
        mt = min(max_tokens or s.default_max_tokens, room)
        stop = self._stop(req.stop)
        sampling = [
            SamplingParams(
                max_tokens=mt,
                temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0,
                top_p=max(req.top_p, MIN_TOP_P),
                seed=None if req.seed is None else req.seed + i,
                stop=stop,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
            for i in range(req.n)
        ]
        if s.log_unknown_fields and req.unknown_fields():
            log.info("ignoring unknown request fields: %s", ", ".join(req.unknown_fields()))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(new_id(prefix), req.model, prompt_ids, sampling, steering, req.stream, include_usage)

    def prepare_chat(self, req: ChatCompletionRequest) -> Prepared:
        msgs = self._messages(req)
        try:
            ids = chat_prompt_ids(self.tok, msgs)
        except PromptError as e:
            raise InvalidRequest(str(e), param="messages") from None
        mt = req.max_completion_tokens or req.max_tokens
        mt_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        # the cap applies to top_logprobs even without logprobs=true, so the limit is never silent
        if (req.top_logprobs or 0) > self.settings.max_logprobs:
            raise InvalidRequest(f"top_logprobs must be at most {self.settings.max_logprobs}", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else 0
        return self._prepare(req, ids, mt, req.logprobs, top, "chatcmpl", "messages", max_tokens_param=mt_param)

    def prepare_completion(self, req: CompletionRequest) -> Prepared:
        p = req.prompt
        if isinstance(p, list):
            if len(p) == 0:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            if all(isinstance(x, int) for x in p):
                vocab = len(self.tok)
                if any(x < 0 or x >= vocab for x in p):
                    raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
                ids = list(p)
            elif len(p) == 1 and isinstance(p[0], str):
                ids = self.tok(p[0])["input_ids"]
            else:
                raise InvalidRequest("batched prompts are not supported; send one prompt per request", param="prompt")
        else:
            ids = self.tok(p)["input_ids"]
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        lp = req.logprobs is not None
        return self._prepare(
            req, ids, req.max_tokens, lp, req.logprobs or 0, "cmpl", "prompt", logprobs_param="logprobs"
        )

    # ---- running ------------------------------------------------------------------
    def _engine_requests(self, p: Prepared) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                request_id=f"{p.request_id}-{i}",
                prompt_ids=p.prompt_ids,
                sampling=sp,
                steering=p.steering,
                timeout_s=self.settings.request_timeout_s,
            )
            for i, sp in enumerate(p.sampling)
        ]

    async def _streams(self, p: Prepared) -> AsyncIterator[tuple[int, StepOutput]]:
        """Events of all choices, interleaved as they come."""
        reqs = self._engine_requests(p)
        gens = []
        try:
            for r in reqs:
                g = self.engine.generate(r)
                gens.append(g)
            if len(gens) == 1:
                # Submit happens on the first __anext__; do it now so overload is an HTTP error.
                first = await gens[0].__anext__()
                yield 0, first
                if first.finished:
                    return
                async for out in gens[0]:
                    yield 0, out
                return
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
                # Let the pumps unwind (which cancels their engine requests) before the generators
                # are closed below: closing one a pump still runs raises RuntimeError. Shielded, as
                # Starlette cancels the stream of a gone client level-triggered.
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for g in gens:
                await g.aclose()

    def _check_submit(self, exc: BaseException) -> APIError:
        if isinstance(exc, EngineOverloaded):
            self.metrics.rejected.labels(reason="queue_full").inc()
            return Overloaded(
                "the server is at capacity; retry later", headers={"Retry-After": str(int(exc.retry_after) or 1)}
            )
        if isinstance(exc, EngineStopped):
            self.metrics.rejected.labels(reason="shutting_down").inc()
            return Unavailable("the server is shutting down", headers={"Retry-After": "5"})
        raise exc

    async def respond(self, p: Prepared, raw: Request, kind: str) -> JSONResponse | StreamingResponse:
        headers = {"X-Steering": steering_header(p.steering), "X-Request-Id": p.request_id}
        stream = self._streams(p)
        # Pull the first event before answering, so queue-full and shutdown become proper HTTP errors.
        try:
            first = await self._first_event(stream, raw, kind)
        except (EngineOverloaded, EngineStopped) as e:
            raise self._check_submit(e) from None
        if p.stream:
            return StreamingResponse(
                self._sse(p, kind, first, stream),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        body = await self._collect(p, kind, first, stream, raw)
        return JSONResponse(body, headers=headers)

    async def _first_event(self, stream, raw: Request, kind: str):
        """The first event, watching the client meanwhile: a request waiting in the queue whose
        client hung up is cancelled there, instead of being prefilled for nobody and holding a
        queue slot that live clients are refused for."""
        task = asyncio.ensure_future(stream.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
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
        self.metrics.request_done(kind, "disconnected")
        raise ClientDisconnected("client disconnected while the request was queued")

    async def _collect(self, p: Prepared, kind: str, first, stream, raw: Request) -> dict:
        n = len(p.sampling)
        texts = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        finish = [None] * n
        reports: dict = {}
        usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": 0}
        errors: list[StepOutput] = []

        def take(i, out: StepOutput):
            texts[i].append(out.text)
            if out.logprobs:
                lps[i].extend(out.logprobs)
            if out.steering is not None and not reports:
                reports.update({k: v.to_dict() for k, v in out.steering.items()})
            if out.finished:
                finish[i] = out.finish_reason
                usage["completion_tokens"] += out.completion_tokens
                if out.error or out.finish_reason in ("error", "cancelled"):
                    errors.append(out)

        async def consume():
            take(*first)
            if first[1].finished and n == 1:
                return
            async for i, out in stream:
                take(i, out)

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await raw.is_disconnected():
                    task.cancel()
                    self.metrics.request_done(kind, "disconnected")
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    # an error response rather than CancelledError, which uvicorn logs as a crash
                    raise ClientDisconnected("client disconnected before the response was ready")
            task.result()
        finally:
            await stream.aclose()
        if errors:
            e = errors[0]
            self.metrics.request_done(kind, "error")
            if e.error_code == "timeout":
                raise RequestTimeout(e.error or "request timed out")
            if e.finish_reason == "cancelled":
                raise Unavailable(e.error or "request cancelled")
            raise EngineFailure(e.error or "generation failed")
        self.metrics.request_done(kind, "ok")
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = []
        for i in range(n):
            text = "".join(texts[i])
            if kind == "chat":
                c = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish[i],
                }
                if p.sampling[i].logprobs:
                    c["logprobs"] = {"content": [self._chat_lp(x) for x in lps[i]]}
            else:
                c = {"index": i, "text": text, "logprobs": None, "finish_reason": finish[i]}
                if p.sampling[i].logprobs:
                    c["logprobs"] = self._text_lp(lps[i])
            choices.append(c)
        return {
            "id": p.request_id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": now(),
            "model": p.model,
            "choices": choices,
            "usage": usage,
            "steering": reports,
        }

    @staticmethod
    def _chat_lp(x) -> dict:
        return {
            "token": x.token,
            "logprob": x.logprob,
            "bytes": list(x.token.encode()),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, _, lp in x.top],
        }

    @staticmethod
    def _text_lp(items) -> dict:
        offs, pos = [], 0
        for x in items:
            offs.append(pos)
            pos += len(x.token)
        return {
            "tokens": [x.token for x in items],
            "token_logprobs": [x.logprob for x in items],
            "top_logprobs": [{t: lp for t, _, lp in x.top} for x in items],
            "text_offset": offs,
        }

    async def _sse(self, p: Prepared, kind: str, first, stream) -> AsyncIterator[str]:
        n = len(p.sampling)
        created = now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        usage = {"prompt_tokens": len(p.prompt_ids), "completion_tokens": 0}
        reports: dict = {}

        def chunk(choices, **extra) -> str:
            body = {"id": p.request_id, "object": obj, "created": created, "model": p.model, "choices": choices}
            body.update(extra)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(i, out: StepOutput | None, role=False):
            fin = out.finish_reason if out is not None and out.finish_reason in ("stop", "length") else None
            text = out.text if out is not None else ""
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": fin}
                if out is not None and out.logprobs:
                    c["logprobs"] = {"content": [self._chat_lp(x) for x in out.logprobs]}
            else:
                c = {"index": i, "text": text, "logprobs": None, "finish_reason": fin}
                if out is not None and out.logprobs:
                    c["logprobs"] = self._text_lp(out.logprobs)
            return c

        outcome = "ok"
        try:
            if kind == "chat":
                yield chunk([choice(i, None, role=True) for i in range(n)])

            async def events():
                yield first
                async for ev in stream:
                    yield ev

            async for i, out in events():
                if out.steering is not None and not reports:
                    reports.update({k: v.to_dict() for k, v in out.steering.items()})
                if out.finished:
                    usage["completion_tokens"] += out.completion_tokens
                    if out.error or out.finish_reason in ("error", "cancelled"):
                        outcome = "error"
                        if out.text:
                            yield chunk([choice(i, StepOutput(out.request_id, text=out.text))])
                        err = {
                            "message": out.error or "generation cancelled",
                            "type": "server_error",
                            "param": None,
                            "code": out.error_code or "engine_error",
                        }
                        yield f"data: {json.dumps({'error': err})}\n\n"
                        continue
                    yield chunk([choice(i, out)], steering=reports)
                elif out.text or out.logprobs:
                    yield chunk([choice(i, out)])
            if p.include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield chunk([], usage=usage, steering=reports)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            outcome = "disconnected"
            raise
        finally:
            self.metrics.request_done(kind, outcome)
            await stream.aclose()
