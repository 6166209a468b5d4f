#!/usr/bin/env python3
"""frankly with the official ``openai`` client: models, chat, streaming, and per-request steering.

    pip install openai
    frankly serve --model demo            # in another terminal
    python clients/python_openai.py --base-url http://127.0.0.1:8000/v1

Steering is not part of the OpenAI schema, so it travels in ``extra_body``
(the body field ``steering``) or in the model id (``qwen-demo+refusal``,
``qwen-demo+refusal:0.5``, ``qwen-demo+slop@auto``). What was applied comes
back in the response field ``steering`` (``response.model_extra``, since
the SDK does not know the field) and in the ``X-Steering`` header.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx
from openai import APIError, OpenAI


def show(title: str) -> None:
    print(f"\n== {title}", flush=True)


def applied(obj) -> dict:
    """The ``steering`` field frankly adds to responses and final stream chunks ({} when none)."""
    return (getattr(obj, "model_extra", None) or {}).get("steering") or {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY") or "none",
        help="bearer key (default: $OPENAI_API_KEY, or 'none' for a server without keys)",
    )
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--direction", default=None, help="direction to steer (default: refusal if loaded, else the first)")
    ap.add_argument("--prompt", default="In one sentence, what is a residual stream in a transformer?")
    return ap.parse_args(argv)


def list_models(client: OpenAI) -> str:
    """Print the served model ids (the base id and one ``+direction`` id per direction); return the base id."""
    show("models")
    models = [m.id for m in client.models.list()]
    for m in models:
        print(" ", m)
    return models[0].split("+")[0]


def list_directions(base_url: str, api_key: str) -> dict[str, dict]:
    """``GET /v1/directions``: not an OpenAI route, so plain HTTP (same key)."""
    r = httpx.get(base_url.rstrip("/") + "/directions", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    r.raise_for_status()
    directions = {d["name"]: d for d in r.json()["data"]}
    show("directions")
    for name, d in directions.items():
        print(f"  {name}: conditional={d.get('conditional')}, method={d.get('method', '?')}")
    return directions


def chat(client: OpenAI, base: str, common: dict) -> None:
    show(f"chat ({base}, no steering)")
    resp = client.chat.completions.create(model=base, **common)
    print(" ", resp.choices[0].message.content)
    print("  steering applied:", applied(resp))


def chat_streaming(client: OpenAI, base: str, common: dict) -> None:
    """A stream; what was applied rides on the final chunk, the token count on the usage chunk."""
    show("streaming chat")
    final, usage = {}, None
    stream = client.chat.completions.create(model=base, stream=True, stream_options={"include_usage": True}, **common)
    print("  ", end="")
    for chunk in stream:
        for c in chunk.choices:
            if c.delta and c.delta.content:
                print(c.delta.content, end="", flush=True)
        if applied(chunk) or (chunk.choices and chunk.choices[0].finish_reason):
            final = applied(chunk)
        if chunk.usage:
            usage = chunk.usage
    print(f"\n  tokens: {usage.completion_tokens if usage else '?'}; steering applied (final chunk): {final}")


def steer_extra_body(client: OpenAI, base: str, name: str, common: dict) -> None:
    """Steering in the body field ``steering``; the raw response gives the ``X-Steering`` header too."""
    show(f'steering via extra_body={{"steering": {{"{name}": 1.0}}}}')
    raw = client.chat.completions.with_raw_response.create(model=base, extra_body={"steering": {name: 1.0}}, **common)
    resp = raw.parse()
    print(" ", resp.choices[0].message.content)
    print("  X-Steering:", raw.headers.get("x-steering"))
    print("  steering applied:", json.dumps(applied(resp)))


def steer_model_id(client: OpenAI, base: str, name: str, common: dict) -> None:
    """Steering in the model id, for clients that can only pick a model: ``base+name`` is strength 1."""
    show(f"steering via model id {base}+{name}")
    resp = client.chat.completions.create(model=f"{base}+{name}", **common)
    print(" ", resp.choices[0].message.content)
    print("  steering applied:", json.dumps(applied(resp)))


def steer_model_id_streamed(client: OpenAI, base: str, name: str, common: dict) -> None:
    """``base+name:0.5``: a strength in the model id, streamed."""
    show(f"steering via model id {base}+{name}:0.5, streamed")
    final = {}
    for chunk in client.chat.completions.create(model=f"{base}+{name}:0.5", stream=True, **common):
        if applied(chunk):
            final = applied(chunk)
    print("  steering applied (final chunk):", json.dumps(final))


def steer_conditional(client: OpenAI, base: str, name: str, direction: dict, common: dict) -> None:
    """``when: auto``: steer only when the direction's calibrated condition fires on the prompt."""
    show(f'conditional steering {{"{name}": {{"strength": 1.0, "when": "auto"}}}}')
    if not direction.get("conditional"):
        print(f"  skipped: direction '{name}' has no calibrated condition (conditional=false)")
        return
    resp = client.chat.completions.create(
        model=base, extra_body={"steering": {name: {"strength": 1.0, "when": "auto"}}}, **common
    )
    print(" ", resp.choices[0].message.content)
    rep = applied(resp).get(name, {})
    print(f"  steering applied: {json.dumps(applied(resp))} (fired={rep.get('fired')}, score={rep.get('score')})")


def show_error(client: OpenAI, base: str, common: dict) -> None:
    """A bad request comes back as an OpenAI error body, which the SDK raises."""
    show("an error, as the SDK raises it")
    try:
        client.chat.completions.create(model=base, extra_body={"steering": {"no-such-direction": 1.0}}, **common)
    except APIError as e:
        print(f"  {type(e).__name__}: {getattr(e, 'status_code', '')} {e.body}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    common = {"messages": [{"role": "user", "content": args.prompt}], "max_tokens": args.max_tokens, "temperature": 0}

    base = list_models(client)
    directions = list_directions(args.base_url, args.api_key)
    chat(client, base, common)
    chat_streaming(client, base, common)

    name = args.direction or ("refusal" if "refusal" in directions else next(iter(directions), None))
    if name is None:
        print("\nno directions are loaded on this server: skipping the steering examples")
        return 0
    if name not in directions:
        print(f"direction '{name}' is not loaded (loaded: {', '.join(directions)})", file=sys.stderr)
        return 2
    steer_extra_body(client, base, name, common)
    steer_model_id(client, base, name, common)
    steer_model_id_streamed(client, base, name, common)
    steer_conditional(client, base, name, directions[name], common)
    show_error(client, base, common)
    print("\nok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
