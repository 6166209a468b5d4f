"""What every endpoint family shares: limits, engine requests, and answering (JSON or SSE).

An endpoint family (chat, text completions) subclasses :class:`OpenAIServing` with its
``prepare`` (request model -> :class:`Prepared`) and gives it a :class:`Renderer` that
builds its response models. No route logic here (see server/api/) and no model logic (see
server/engine/).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from directions.strengths import DirectionRequest
from server.engine.errors import EngineOverloaded, EngineStopped
from server.engine.protocol import Engine
from server.engine.types import GenerationRequest, SamplingParams, StepOutput, TokenLogprob
from server.errors import ClientDisconnected, InvalidRequest, failure, refusal
from server.metrics import Metrics
from server.protocol import SamplingFields
from server.responses import Answer, Chunk, ResponseModel, SteeringApplied, Usage, new_id, now
from server.serving.streams import Events, drain_watching, first_event, merged
from server.settings import ServerSettings
from server.steering import SteeringPolicy, steering_header

log = logging.getLogger("frankly.serving")

# Below this, dividing fp32 logits by the temperature can overflow to inf and make sampling
# fail (a tiny temperature is greedy decoding in all but name): such requests run greedy.
MIN_TEMPERATURE = 1e-5
# A top_p that rounds to 0 in fp32 keeps no token at all (0/0 in sampling); this small a
# nucleus keeps only the top token, which is what such a request asks for.
MIN_TOP_P = 1e-6
REJECTED = {EngineOverloaded: "queue_full", EngineStopped: "shutting_down"}


@dataclass
class Prepared:
    """A validated request, ready for the engine: one SamplingParams per choice."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: list[SamplingParams]
    steering: dict[str, DirectionRequest]
    stream: bool
    include_usage: bool


@dataclass
class Choice:
    """What one choice of a non-streamed answer collected."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Renderer:
    """Builds one endpoint family's response models (a subclass per family)."""

    chunk_cls: ClassVar[type[Chunk]]

    def opening(self, p: Prepared, created: int) -> Chunk | None:
        """The chunk a stream starts with (chat: the assistant role), or None."""
        return None

    def chunk(
        self, p: Prepared, created: int, index: int, out: StepOutput, steering: SteeringApplied | None = None
    ) -> Chunk:
        """A stream chunk of choice ``index`` with ``out``'s text, logprobs and (stop/length) finish."""
        raise NotImplementedError

    def usage_chunk(self, p: Prepared, created: int, usage: Usage, steering: SteeringApplied) -> Chunk:
        """The last chunk before ``[DONE]`` when the client asked for usage: no choices."""
        return self.chunk_cls(
            id=p.request_id, created=created, model=p.model, choices=[], usage=usage, steering=steering
        )

    def response(self, p: Prepared, choices: list[Choice], usage: Usage, steering: SteeringApplied) -> Answer:
        """The non-streamed answer."""
        raise NotImplementedError


def sse(model: ResponseModel) -> str:
    """One server-sent event carrying ``model`` as JSON (one data line: JSON has no raw newlines)."""
    return f"data: {json.dumps(model.model_dump(mode='json'), ensure_ascii=False)}\n\n"


class OpenAIServing:
    """Limits, engine requests and answers shared by the endpoint families (see the module docstring)."""

    endpoint: ClassVar[str]  # metrics label
    id_prefix: ClassVar[str]
    renderer: Renderer

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

    # ---- validation the protocol models cannot do (server limits, tokens) ---------------------
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

    def _max_tokens(self, prompt_ids: list[int], max_tokens: int | None, param: str, prompt_param: str) -> int:
        s = self.settings
        if max_tokens is not None and max_tokens > s.max_tokens_cap:
            raise InvalidRequest(f"{param} must be at most {s.max_tokens_cap}", param=param)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        # Clamp to the room left in the context (frontends send large defaults); the
        # answer then ends with finish_reason 'length'.
        return min(max_tokens or s.default_max_tokens, room)

    def _check_logprobs(self, logprobs: bool, top: int, param: str) -> None:
        if top > self.settings.max_logprobs:
            raise InvalidRequest(f"{param} must be at most {self.settings.max_logprobs}", param=param)
        caps = self.engine.capabilities
        if logprobs and not caps.logprobs:
            raise InvalidRequest(
                f"the {caps.name} engine does not return logprobs", param="logprobs", code="unsupported_by_engine"
            )

    def _prepare(
        self,
        req: SamplingFields,
        prompt_ids: list[int],
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        prompt_param: str,
        max_tokens_param: str = "max_tokens",
        logprobs_param: str = "top_logprobs",
    ) -> Prepared:
        steering = self.policy.resolve(req.model, req.steering)
        if req.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}", param="n")
        self._check_logprobs(logprobs, top_logprobs, logprobs_param)
        mt = self._max_tokens(prompt_ids, max_tokens, max_tokens_param, prompt_param)
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
        if self.settings.log_unknown_fields and req.unknown_fields():
            log.info("ignoring unknown request fields: %s", ", ".join(req.unknown_fields()))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        rid = new_id(self.id_prefix)
        return Prepared(rid, req.model, prompt_ids, sampling, steering, req.stream, include_usage)

    # ---- answering ------------------------------------------------------------------------------
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

    async def respond(self, p: Prepared, raw: Request) -> JSONResponse | StreamingResponse:
        """Run ``p`` and answer: a JSON response, or an SSE stream when ``p.stream``."""
        headers = {"X-Steering": steering_header(p.steering), "X-Request-Id": p.request_id}
        stream = merged(self.engine, self._engine_requests(p))
        # The first event comes before the answer, so queue-full and shutdown become proper HTTP errors.
        try:
            first = await first_event(stream, raw)
        except (EngineOverloaded, EngineStopped) as e:
            self.metrics.rejected.labels(reason=REJECTED[type(e)]).inc()
            raise refusal(e) from None
        except ClientDisconnected:
            self.metrics.request_done(self.endpoint, "disconnected")
            raise
        if p.stream:
            return StreamingResponse(
                self._sse(p, first, stream),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        body = await self._collect(p, first, stream, raw)
        return JSONResponse(body.model_dump(mode="json"), headers=headers)

    async def _collect(self, p: Prepared, first, stream: Events, raw: Request) -> ResponseModel:
        choices = [Choice() for _ in p.sampling]
        reports: SteeringApplied = {}
        completion_tokens, failed = 0, []

        def take(i: int, out: StepOutput) -> None:
            nonlocal completion_tokens
            choices[i].text.append(out.text)
            choices[i].logprobs.extend(out.logprobs or [])
            if out.steering is not None and not reports:
                reports.update({k: v.to_dict() for k, v in out.steering.items()})
            if out.finished:
                choices[i].finish_reason = out.finish_reason
                completion_tokens += out.completion_tokens
                if out.failed:
                    failed.append(out)

        async def consume():
            take(*first)
            if first[1].finished and len(choices) == 1:
                return
            async for i, out in stream:
                take(i, out)

        try:
            await drain_watching(consume, raw)
        except ClientDisconnected:
            self.metrics.request_done(self.endpoint, "disconnected")
            raise
        finally:
            await stream.aclose()
        if failed:
            self.metrics.request_done(self.endpoint, "error")
            raise failure(failed[0].error, failed[0].finish_reason)
        self.metrics.request_done(self.endpoint, "ok")
        n_prompt = len(p.prompt_ids)
        usage = Usage(
            prompt_tokens=n_prompt, completion_tokens=completion_tokens, total_tokens=n_prompt + completion_tokens
        )
        return self.renderer.response(p, choices, usage, reports)

    async def _sse(self, p: Prepared, first, stream: Events) -> AsyncIterator[str]:
        created, r = now(), self.renderer
        completion_tokens, reports = 0, {}
        outcome = "ok"
        try:
            opening = r.opening(p, created)
            if opening is not None:
                yield sse(opening)

            async def events():
                yield first
                async for ev in stream:
                    yield ev

            async for i, out in events():
                if out.steering is not None and not reports:
                    reports.update({k: v.to_dict() for k, v in out.steering.items()})
                if out.finished:
                    completion_tokens += out.completion_tokens
                    if out.failed:
                        outcome = "error"
                        for event in self._error_events(p, created, i, out):
                            yield event
                        continue
                    yield sse(r.chunk(p, created, i, out, steering=reports))
                elif out.text or out.logprobs:
                    yield sse(r.chunk(p, created, i, out))
            if p.include_usage:
                n = len(p.prompt_ids)
                usage = Usage(prompt_tokens=n, completion_tokens=completion_tokens, total_tokens=n + completion_tokens)
                yield sse(r.usage_chunk(p, created, usage, reports))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:  # the client went away
            outcome = "disconnected"
            raise
        finally:
            self.metrics.request_done(self.endpoint, outcome)
            await stream.aclose()

    def _error_events(self, p: Prepared, created: int, i: int, out: StepOutput) -> list[str]:
        """A failed choice inside a stream: the text that came with the failure, then an error chunk."""
        events = []
        if out.text:
            events.append(sse(self.renderer.chunk(p, created, i, StepOutput(out.request_id, text=out.text))))
        err = {
            "message": str(out.error) if out.error else "generation cancelled",
            "type": "server_error",
            "param": None,
            "code": out.error.code if out.error else "engine_error",
        }
        events.append(f"data: {json.dumps({'error': err}, ensure_ascii=False)}\n\n")
        return events
