"""POST /v1/chat/completions: messages through the chat template; chat-shaped answers and chunks."""

from __future__ import annotations

from directions.prompting import PromptError, chat_prompt_ids
from server.engine.types import StepOutput, TokenLogprob
from server.errors import InvalidRequest
from server.protocol import ChatCompletionRequest
from server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    SteeringApplied,
    TopLogprob,
    Usage,
    now,
)
from server.serving.base import Choice, OpenAIServing, Prepared, Renderer


def chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=x.token,
                logprob=x.logprob,
                bytes=list(x.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, _, lp in x.top],
            )
            for x in items
        ]
    )


def _finish(out: StepOutput) -> str | None:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


class ChatRenderer(Renderer):
    chunk_cls = ChatCompletionChunk

    def opening(self, p: Prepared, created: int) -> ChatCompletionChunk:
        roles = [
            ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(len(p.sampling))
        ]
        return ChatCompletionChunk(id=p.request_id, created=created, model=p.model, choices=roles)

    def chunk(
        self, p: Prepared, created: int, index: int, out: StepOutput, steering: SteeringApplied | None = None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=out.text or None),
            logprobs=chat_logprobs(out.logprobs) if out.logprobs else None,
            finish_reason=_finish(out),
        )
        return ChatCompletionChunk(id=p.request_id, created=created, model=p.model, choices=[choice], steering=steering)

    def response(self, p: Prepared, choices: list[Choice], usage: Usage, steering: SteeringApplied) -> ChatCompletion:
        out = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(c.text)),
                logprobs=chat_logprobs(c.logprobs) if p.sampling[i].logprobs else None,
                finish_reason=c.finish_reason,
            )
            for i, c in enumerate(choices)
        ]
        return ChatCompletion(
            id=p.request_id, created=now(), model=p.model, choices=out, usage=usage, steering=steering
        )


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: text only, ``developer`` as ``system``."""
    out = []
    for i, m in enumerate(req.messages):
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
    return out


class ChatServing(OpenAIServing):
    endpoint = "chat"
    id_prefix = "chatcmpl"
    renderer = ChatRenderer()

    def prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Template and tokenise the messages, resolve steering, apply the server's limits."""
        try:
            ids = chat_prompt_ids(self.tok, template_messages(req))
        except PromptError as e:
            raise InvalidRequest(str(e), param="messages") from None
        mt = req.max_completion_tokens or req.max_tokens
        mt_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        top = req.top_logprobs or 0  # the protocol model allows it only with logprobs
        return self._prepare(req, ids, mt, req.logprobs, top, "messages", max_tokens_param=mt_param)
