"""POST /v1/completions: one prompt (text or token ids); text-completion answers and chunks."""

from __future__ import annotations

from server.engine.types import StepOutput, TokenLogprob
from server.errors import InvalidRequest
from server.protocol import CompletionRequest
from server.responses import Completion, CompletionChoice, CompletionChunk, SteeringApplied, TextLogprobs, Usage, now
from server.serving.base import Choice, OpenAIServing, Prepared, Renderer


def text_logprobs(items: list[TokenLogprob]) -> TextLogprobs:
    offs, pos = [], 0
    for x in items:
        offs.append(pos)
        pos += len(x.token)
    return TextLogprobs(
        tokens=[x.token for x in items],
        token_logprobs=[x.logprob for x in items],
        top_logprobs=[{t: lp for t, _, lp in x.top} for x in items],
        text_offset=offs,
    )


class CompletionRenderer(Renderer):
    chunk_cls = CompletionChunk  # no opening chunk: text completions have no role

    def chunk(
        self, p: Prepared, created: int, index: int, out: StepOutput, steering: SteeringApplied | None = None
    ) -> CompletionChunk:
        choice = CompletionChoice(
            index=index,
            text=out.text,
            logprobs=text_logprobs(out.logprobs) if out.logprobs else None,
            finish_reason=out.finish_reason if out.finish_reason in ("stop", "length") else None,
        )
        return CompletionChunk(id=p.request_id, created=created, model=p.model, choices=[choice], steering=steering)

    def usage_chunk(self, p: Prepared, created: int, usage: Usage, steering: SteeringApplied) -> CompletionChunk:
        return CompletionChunk(
            id=p.request_id, created=created, model=p.model, choices=[], usage=usage, steering=steering
        )

    def response(self, p: Prepared, choices: list[Choice], usage: Usage, steering: SteeringApplied) -> Completion:
        out = [
            CompletionChoice(
                index=i,
                text="".join(c.text),
                logprobs=text_logprobs(c.logprobs) if p.sampling[i].logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ]
        return Completion(id=p.request_id, created=now(), model=p.model, choices=out, usage=usage, steering=steering)


class CompletionServing(OpenAIServing):
    endpoint = "completion"
    id_prefix = "cmpl"
    renderer = CompletionRenderer()

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, str):
            ids = self.tok(p)["input_ids"]
        elif len(p) == 0:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        elif all(isinstance(x, int) for x in p):
            vocab = len(self.tok)
            if any(x < 0 or x >= vocab for x in p):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            ids = list(p)
        elif len(p) == 1 and isinstance(p[0], str):
            ids = self.tok(p[0])["input_ids"]
        else:
            raise InvalidRequest("batched prompts are not supported; send one prompt per request", param="prompt")
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return ids

    def prepare(self, req: CompletionRequest) -> Prepared:
        """Tokenise the prompt, resolve steering, apply the server's limits."""
        ids = self._prompt_ids(req)
        if req.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        lp = req.logprobs is not None
        return self._prepare(req, ids, req.max_tokens, lp, req.logprobs or 0, "prompt", logprobs_param="logprobs")
