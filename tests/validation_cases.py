"""Requests the OpenAI API refuses on validation, each with the parameter the 400 must name.

One table for two tiers: ``tests/server/test_protocol.py`` sends them through the app with a
fake engine (milliseconds), and the hostile-input table of ``tests/live/test_hostile.py``
sends them to a live server.
"""

from __future__ import annotations

BASE = "qwen-demo"
MSGS = [{"role": "user", "content": "Hi"}]
CHAT, CMPL = "/v1/chat/completions", "/v1/completions"


def chat(**kw) -> dict:
    return {"model": BASE, "messages": MSGS, "max_tokens": 1, **kw}


def cmpl(**kw) -> dict:
    return {"model": BASE, "prompt": "Hi", "max_tokens": 1, **kw}


# (id, path, body, error.param): each must be a 400 naming error.param
STRICT_TYPES = [
    ("max-tokens-true", CHAT, chat(max_tokens=True), "max_tokens"),
    ("max-tokens-float", CHAT, chat(max_tokens=3.0), "max_tokens"),
    ("max-completion-tokens-false", CHAT, chat(max_completion_tokens=False), "max_completion_tokens"),
    ("n-true", CHAT, chat(n=True), "n"),
    ("seed-float", CHAT, chat(seed=1.5), "seed"),
    ("seed-true", CHAT, chat(seed=True), "seed"),
    ("temperature-true", CHAT, chat(temperature=True), "temperature"),
    ("temperature-numeric-string", CHAT, chat(temperature="0.5"), "temperature"),
    ("top-p-numeric-string", CHAT, chat(top_p="1"), "top_p"),
    ("stream-string", CHAT, chat(stream="true"), "stream"),
    ("stream-one", CHAT, chat(stream=1), "stream"),
    ("logprobs-string", CHAT, chat(logprobs="true"), "logprobs"),
    (
        "include-usage-string",
        CHAT,
        chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
    ("presence-penalty-true", CHAT, chat(presence_penalty=True), "presence_penalty"),
    ("message-name-number", CHAT, chat(messages=[{"role": "user", "content": "Hi", "name": 5}]), "messages[0].name"),
    ("user-number", CHAT, chat(user=5), "user"),
    ("completion-max-tokens-true", CMPL, cmpl(max_tokens=True), "max_tokens"),
    ("completion-logprobs-true", CMPL, cmpl(logprobs=True), "logprobs"),
    ("completion-echo-string", CMPL, cmpl(echo="yes"), "echo"),
    ("completion-boolean-token-ids", CMPL, cmpl(prompt=[True, False]), "prompt"),
]
CROSS_FIELD = [
    ("user-message-without-content", CHAT, chat(messages=[{"role": "user"}]), "messages[0].content"),
    ("user-message-null-content", CHAT, chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    ("system-message-without-content", CHAT, chat(messages=[{"role": "system"}, *MSGS]), "messages[0].content"),
    (
        "assistant-without-content-or-tool-calls",
        CHAT,
        chat(messages=[*MSGS, {"role": "assistant"}]),
        "messages[1].content",
    ),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), "top_logprobs"),
    ("top-logprobs-with-logprobs-false", CHAT, chat(logprobs=False, top_logprobs=0), "top_logprobs"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), "stream_options"),
    ("frequency-penalty-over-2", CHAT, chat(frequency_penalty=2.5), "frequency_penalty"),
    ("logit-bias-over-100", CHAT, chat(logit_bias={"42": 101}), "logit_bias[42]"),
    ("n-over-128", CHAT, chat(n=129), "n"),
]
REFUSED = STRICT_TYPES + CROSS_FIELD

# (id, path, body): valid as OpenAI has it, so accepted
ACCEPTED = [
    ("integer-temperature", CHAT, chat(temperature=1)),
    ("top-logprobs-with-logprobs", CHAT, chat(logprobs=True, top_logprobs=2)),
    ("empty-user-content", CHAT, chat(messages=[{"role": "user", "content": ""}])),
    (
        "assistant-tool-calls-without-content",
        CHAT,
        chat(messages=[*MSGS, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}, *MSGS]),
    ),
]
