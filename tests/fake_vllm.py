"""A stand-in for ``vllm serve``: the same command line, vLLM 0.32's streamed /v1/completions shape.

``python tests/fake_vllm.py serve MODEL --port P --served-model-name NAME --lora-modules a=PATH ...``
answers every known model name (the base, each LoRA module) with scripted token ids, one per
chunk, the way vLLM 0.32 streams with ``return_token_ids`` (and logprobs with
``return_tokens_as_token_ids``). It writes what it saw, one JSON object a line, to
``$FAKE_VLLM_RECORD``: its argv at start, every request body, and every stream it was cut off
in (``aborted``: the client closed it, which is how frankly cancels).

Environment: ``FAKE_VLLM_TOKENS`` (JSON: model name -> token ids; default ``[1, 2, 3]`` for any
model), ``FAKE_VLLM_DELAY`` (seconds between chunks, default 0.01), ``FAKE_VLLM_EXIT`` (exit with
this code at once, to test a failed start; a negative code: kill itself with that signal, as a
vLLM build for another CPU dies with SIGILL).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


def record(event: dict) -> None:
    path = os.environ.get("FAKE_VLLM_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event) + "\n")


def parse(argv: list[str]) -> tuple[int, set[str]]:
    port, models, i = 8000, set(), 0
    while i < len(argv):
        a = argv[i]
        if a == "--port":
            port = int(argv[i + 1])
        elif a == "--served-model-name":
            models.add(argv[i + 1])
        elif a == "--lora-modules":
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                models.add(argv[j].split("=", 1)[0])
                j += 1
        i += 1
    return port, models


def app(models: set[str]):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    scripted = json.loads(os.environ.get("FAKE_VLLM_TOKENS", "{}"))
    delay = float(os.environ.get("FAKE_VLLM_DELAY", "0.01"))

    async def health(_: Request):
        return JSONResponse({})

    async def completions(request: Request):
        body = await request.json()
        record({"request": body})
        model = body.get("model")
        if model not in models:
            err = {
                "message": f"The model `{model}` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
            return JSONResponse({"error": err}, status_code=404)
        ids = scripted.get(model, [1, 2, 3])[: body.get("max_tokens") or 16]

        async def stream():
            done = False
            try:
                for k, t in enumerate(ids):
                    await asyncio.sleep(delay)
                    choice = {"index": 0, "text": "", "token_ids": [t], "finish_reason": None}
                    if body.get("logprobs"):
                        top = {f"token_id:{t}": -0.5, f"token_id:{t + 1}": -1.5, f"token_id:{t + 2}": -2.5}
                        choice["logprobs"] = {
                            "tokens": [f"token_id:{t}"],
                            "token_logprobs": [-0.5],
                            "top_logprobs": [top],
                            "text_offset": [0],
                        }
                    if k == len(ids) - 1:
                        choice["finish_reason"] = "length" if len(ids) == body.get("max_tokens") else "stop"
                    yield f"data: {json.dumps({'id': 'cmpl-1', 'object': 'text_completion', 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"
                done = True
            finally:
                if not done:
                    record({"aborted": body.get("request_id") or model})

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"])])


def main() -> None:
    record({"argv": sys.argv[1:]})
    if os.environ.get("FAKE_VLLM_EXIT"):
        print("fake vllm: failing on purpose", flush=True)
        code = int(os.environ["FAKE_VLLM_EXIT"])
        if code < 0:
            import signal

            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        sys.exit(code)
    import uvicorn

    port, models = parse(sys.argv[1:])
    uvicorn.run(app(models), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
