"""The vLLM engine: frankly's engine protocol forwarded to a ``vllm serve`` over HTTP.

Each request goes to vLLM's ``/v1/completions`` as token ids (frankly applied the chat
template and tokenised it), streaming, with ``return_token_ids`` (and, when the client asked
for logprobs, ``logprobs`` with ``return_tokens_as_token_ids``). The tokens that come back go
through frankly's own :class:`~server.engine.rows.RowOutput`: detokenisation, stop strings
(vLLM gets none; when frankly stops, it closes the stream and vLLM aborts the request), EOS,
limits, usage, the steering report and the metrics are the torch engine's own.

Steering: a request's nonzero strengths are a combination (:mod:`server.engine.vllm_adapters`)
and run as the model name of that combination's adapter; a combination that was not exported
never reaches the engine (the serving layer answers 400 from :attr:`EngineCapabilities.steering_combinations`).

Threads: the engine has one thread running an asyncio loop (its "engine thread"): ``emit``
and the observer are called there. ``submit``/``cancel``/``shutdown`` may come from any thread.
At most ``max_batch_size`` requests are forwarded at once (vLLM batches them, several LoRA
adapters in one batch); up to ``max_queue`` more wait here, beyond that ``EngineOverloaded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass

import httpx

from server.engine.errors import EngineOverloaded, EngineStopped, GenerationFailed, RequestTimedOut
from server.engine.protocol import AsyncBridge, Emit, EngineCapabilities, EngineObserver, EngineStats, NullObserver
from server.engine.rows import Row, RowOutput
from server.engine.types import GenerationRequest, SteeringReport, StepOutput, TokenLogprob
from server.engine.vllm_adapters import BASE, Combination, combination

log = logging.getLogger("frankly.engine.vllm")

CAPABILITIES = EngineCapabilities(
    name="vllm",
    supports_conditional=False,  # vLLM does not expose the detector layer's output
    per_row_strengths=True,  # vLLM batches requests of different adapters together (multi-LoRA)
    logprobs=True,
    bit_identical_at_zero=False,  # strength 0 is vLLM's base model: its kernels, not transformers'
    quantized_weights=False,
)


class VllmUnavailable(GenerationFailed):
    """vLLM could not be reached (not running, died, or the connection broke)."""


@dataclass
class VllmConfig:
    max_batch_size: int = 8  # requests forwarded to vLLM at once
    max_queue: int = 64  # more waiting here; beyond: EngineOverloaded
    max_model_len: int = 4096
    num_threads: int | None = None  # unused here: vLLM sizes its own threads
    connect_timeout_s: float = 10.0


class _Output(RowOutput):
    """RowOutput whose logprobs come from vLLM instead of being computed from logits."""

    def accept_scored(self, row: Row, tok: int, entry: TokenLogprob | None) -> None:
        self._entry = entry
        self.accept(row, tok, None)

    def _logprob(self, tok, logits, top) -> TokenLogprob:
        return self._entry

    def end(self, row: Row, reason: str) -> None:
        """vLLM ended the request without a token frankly counts as the end (its EOS, its limit)."""
        if row.done:
            return
        row.done = True
        text = row.detok.flush()
        self.observer.finished(row.prompt_len, len(row.generated), reason, time.monotonic() - row.t_arrival)
        out = StepOutput(
            row.request_id,
            text=text,
            finish_reason=reason,
            prompt_tokens=row.prompt_len,
            completion_tokens=len(row.generated),
        )
        self._emit(row, out)


class VllmEngine(AsyncBridge):
    """frankly's engine protocol (:class:`server.engine.protocol.Engine`) on a vLLM OpenAI server."""

    def __init__(
        self,
        base_url: str,
        tokenizer,
        models: dict[Combination, str],
        eos_ids: set[int],
        config: VllmConfig,
        observer: EngineObserver | None = None,
        supervisor=None,
    ):
        """``models``: combination -> vLLM model name (``()`` is the base); ``supervisor`` (optional):
        the :class:`~server.engine.vllm_supervisor.VllmSupervisor` started and stopped with the engine."""
        self.base_url = base_url.rstrip("/")
        self.tok = tokenizer
        self.models = dict(models)
        self.config = config
        self.observer = observer or NullObserver()
        self.supervisor = supervisor
        self.output = _Output(tokenizer, eos_ids, config.max_model_len, self.observer)
        combos = tuple(c for c in self.models if c != BASE)
        self.capabilities = dataclasses.replace(CAPABILITIES, steering_combinations=combos)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._rows: dict[str, Row] = {}  # submitted and not finished
        self._tasks: dict[str, asyncio.Task] = {}
        self._running = 0
        self._stop_error: EngineStopped | None = None
        self.stopping = False
        self.forwarded = 0  # requests sent to vLLM

    # ---- the protocol, any thread ----------------------------------------------------------
    @property
    def alive(self) -> bool:
        up = self._thread is not None and self._thread.is_alive()
        return up and (self.supervisor is None or self.supervisor.running)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return max(0, len(self._rows) - self._running)

    def stats(self) -> EngineStats:
        return EngineStats(self.num_running, self.num_waiting)

    def start(self) -> None:
        """Start vLLM (when supervised; blocks until it is ready) and the engine thread."""
        if self.supervisor is not None:
            self.supervisor.start()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="frankly-vllm", daemon=True)
        self._thread.start()
        ready.wait()

    def submit(self, req: GenerationRequest, emit: Emit) -> None:
        if self.stopping or self._loop is None:
            raise EngineStopped("the server is shutting down")
        with self._lock:
            if len(self._rows) >= self.config.max_batch_size + self.config.max_queue:
                raise EngineOverloaded()
            row = Row(req, emit, self.tok, "cpu")
            self._rows[req.request_id] = row
        self._loop.call_soon_threadsafe(self._launch, row)

    def cancel(self, request_id: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self._loop.call_soon_threadsafe(self._cancel, request_id, None)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; in-flight requests get ``timeout`` seconds, the rest end with an error; stop vLLM."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self._rows and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            for rid in list(self._rows):
                self.cancel_with(rid, EngineStopped("the server stopped before this request finished"))
            end = time.monotonic() + 10
            while self._rows and time.monotonic() < end:
                time.sleep(0.05)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self.supervisor is not None:
            self.supervisor.stop()

    def cancel_with(self, request_id: str, error: Exception) -> None:
        """End a request with ``error`` (finish_reason "error") instead of "cancelled"."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel, request_id, error)

    # ---- engine thread -----------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        timeout = httpx.Timeout(None, connect=self.config.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.config.max_batch_size + 4)
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)
        self._slots = asyncio.Semaphore(self.config.max_batch_size)
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._client.aclose())
            loop.close()

    def _launch(self, row: Row) -> None:
        task = self._loop.create_task(self._serve(row))
        self._tasks[row.request_id] = task

    def _cancel(self, request_id: str, error: Exception | None) -> None:
        row, task = self._rows.get(request_id), self._tasks.get(request_id)
        if row is None:
            return
        row.cancelled = True
        row.cancel_error = error
        if task is not None:
            task.cancel()

    async def _serve(self, row: Row) -> None:
        """One request, start to end: wait for a slot, forward, end it exactly once, whatever happens."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if row.deadline is not None:
                    await stack.enter_async_context(asyncio.timeout_at(row.deadline))
                async with self._slots:
                    self._running += 1
                    try:
                        self.observer.queue_time(time.monotonic() - row.t_arrival)
                        await self._forward(row)
                    finally:
                        self._running -= 1
        except asyncio.CancelledError:
            err = getattr(row, "cancel_error", None)
            self.output.finish(row, "error" if err else "cancelled", error=err)
        except TimeoutError:
            self.output.finish(row, "error", error=RequestTimedOut("the request ran past the server's time limit"))
        except GenerationFailed as e:
            log.warning("request %s failed: %s", row.request_id, e)
            self.output.finish(row, "error", error=e)
        except Exception as e:  # never leave a request without its ending
            log.exception("request %s failed", row.request_id)
            self.output.finish(row, "error", error=GenerationFailed(f"vLLM request failed: {type(e).__name__}: {e}"))
        finally:
            self._rows.pop(row.request_id, None)
            self._tasks.pop(row.request_id, None)

    def _start_row(self, row: Row) -> str:
        """The row's strengths and report; the vLLM model name they run as."""
        row.strengths, row.report = {}, {}
        for n, d in row.req.steering.items():
            row.report[n] = SteeringReport(strength=d.strength, when=d.when, applied=d.strength)
            if d.strength != 0:
                row.strengths[n] = d.strength
        model = self.models.get(combination(row.strengths))
        if model is None:  # the serving layer refuses these; a direct caller may not have
            raise GenerationFailed(f"no vLLM adapter for steering {combination(row.strengths)}")
        for n in row.strengths:
            self.observer.steering_used(n)
        return model

    def request_body(self, row: Row, model: str) -> dict:
        """The /v1/completions body for ``row`` (see the module docstring)."""
        sp = row.req.sampling
        body = {
            "model": model,
            "prompt": list(row.req.prompt_ids),
            "request_id": row.request_id,
            "max_tokens": sp.max_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "stream": True,
            "return_token_ids": True,
            "ignore_eos": sp.ignore_eos,
        }
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.logprobs:
            body["logprobs"] = max(sp.top_logprobs, 1)
            body["return_tokens_as_token_ids"] = True
        return body

    async def _forward(self, row: Row) -> None:
        if self.supervisor is not None and not self.supervisor.running:
            raise VllmUnavailable(self.supervisor.describe())
        body = self.request_body(row, self._start_row(row))
        self.forwarded += 1
        finish = None
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise GenerationFailed(f"vLLM answered {resp.status_code}: {_message(await resp.aread())}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise GenerationFailed(f"vLLM: {_message(chunk)}")
                    for choice in chunk.get("choices") or []:
                        self._accept(row, choice)
                        finish = choice.get("finish_reason") or finish
                    if row.done:
                        return  # frankly ended it (stop string, EOS, limit): closing the stream aborts it in vLLM
        except httpx.TransportError as e:
            why = self.supervisor.describe() if self.supervisor is not None and not self.supervisor.running else e
            raise VllmUnavailable(f"lost the vLLM server: {why}") from e
        self.output.end(row, "length" if finish == "length" else "stop")

    def _accept(self, row: Row, choice: dict) -> None:
        ids = choice.get("token_ids") or []
        lp = choice.get("logprobs") or {}
        top = lp.get("top_logprobs") or []
        chosen = lp.get("token_logprobs") or []
        for k, tok in enumerate(ids):
            if row.done:
                return
            now = time.monotonic()
            if row.t_last is None:
                self.observer.first_token(now - row.t_arrival)
            else:
                self.observer.inter_token(now - row.t_last)
            row.t_last = now
            entry = None
            if row.req.sampling.logprobs:
                if k >= len(chosen):
                    raise GenerationFailed("vLLM sent a token without the logprobs frankly asked for")
                entry = self._logprob(
                    int(tok), chosen[k], top[k] if k < len(top) else None, row.req.sampling.top_logprobs
                )
            self.output.accept_scored(row, int(tok), entry)

    def _logprob(self, tok: int, logprob: float | None, top: dict | None, k: int) -> TokenLogprob:
        entry = TokenLogprob(token=self.tok.decode([tok]), token_id=tok, logprob=float(logprob or 0.0))
        if k and top:
            best = sorted(((_token_id(t), float(v)) for t, v in top.items()), key=lambda x: -x[1])[:k]
            entry.top = [(self.tok.decode([i]), i, v) for i, v in best]
        return entry


def _token_id(token: str) -> int:
    """vLLM's ``token_id:123`` (with return_tokens_as_token_ids) -> 123."""
    return int(token.rsplit(":", 1)[-1])


def _message(body) -> str:
    """The message of a vLLM error (its OpenAI envelope), or the body itself."""
    try:
        data = json.loads(body) if isinstance(body, bytes | str) else body
        err = data.get("error", data)
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        return (body.decode(errors="replace") if isinstance(body, bytes) else str(body))[:500]
