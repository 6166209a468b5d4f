"""The official openai client against a live server process on the real demo model."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HARMFUL_VAL = ROOT / "directions" / "prompts" / "refusal" / "harmful_val.txt"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key="unused", max_retries=0, timeout=300)


def test_models_lists_base_and_presets(client, demo_server):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == demo_server.base_id
    assert f"{demo_server.base_id}+refusal" in ids
    assert f"{demo_server.base_id}+slop" in ids


def test_chat_non_streamed(client, demo_server):
    r = client.chat.completions.create(
        model=demo_server.base_id,
        messages=[{"role": "user", "content": "What is 2 + 3? Answer with just the number."}],
        max_tokens=8,
        temperature=0,
    )
    assert "5" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    assert r.model_extra["steering"] == {}


def test_chat_streamed_with_usage(client, demo_server):
    stream = client.chat.completions.create(
        model=demo_server.base_id,
        messages=[{"role": "user", "content": "Count from 1 to 5."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "1" in text and "3" in text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_steering_header_and_echo(demo_server):
    r = httpx.post(
        demo_server.v1 + "/chat/completions",
        timeout=120,
        json={
            "model": demo_server.base_id + "+refusal:0.5",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "steering": '{"slop": 0.25}',
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-steering"] == "refusal=0.5,slop=0.25"
    st = r.json()["steering"]
    assert st["refusal"]["applied"] == 0.5 and st["slop"]["applied"] == 0.25


def _ask(client, model, prompt, extra=None, max_tokens=48):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=extra or {},
    )
    return r.choices[0].message.content


def test_refusal_direction_makes_the_model_comply(client, demo_server):
    from directions.refusal import is_refusal

    prompts = HARMFUL_VAL.read_text().splitlines()[:12]
    base = demo_server.base_id
    with cf.ThreadPoolExecutor(8) as ex:
        plain = list(ex.map(lambda p: _ask(client, base, p), prompts))
        refused = [p for p, a in zip(prompts, plain, strict=True) if is_refusal(a)]
        assert len(refused) >= 4, f"the demo model refused only {len(refused)} of {len(prompts)} harmful prompts"
        steered = list(ex.map(lambda p: _ask(client, base, p, {"steering": {"refusal": 1.0}}), refused))
    complied = sum(not is_refusal(a) for a in steered)
    assert complied >= 0.75 * len(refused), f"complied with {complied}/{len(refused)}: {steered}"
    # One request at a time, so both ways run the same computation: under concurrency the batch
    # composition differs between runs, and llama.cpp's kernels are not bit-stable across batch
    # sizes (a near-tie token flipped after ~30 tokens once), which is not what this checks.
    for p in refused[:2]:
        body = _ask(client, base, p, {"steering": {"refusal": 1.0}}, max_tokens=16)
        by_id = _ask(client, base + "+refusal", p, max_tokens=16)
        assert by_id == body, "model-id suffix and body field must give the same answers"


def test_conditional_steering_fires_on_harmful_prompts_only(client, demo_server):
    """``when: auto`` through the openai client, on each engine: the refusal condition fires on harmful
    validation prompts and stays quiet on harmless ones; the body field and the ``@auto`` model id agree."""
    harmless = (ROOT / "directions" / "prompts" / "refusal" / "harmless_val.txt").read_text().splitlines()[:4]
    harmful = HARMFUL_VAL.read_text().splitlines()[:4]
    auto = {"steering": {"refusal": {"strength": 1.0, "when": "auto"}}}

    def report(prompt, model=demo_server.base_id, extra=auto):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=2, temperature=0, extra_body=extra
        )
        return r.model_extra["steering"]["refusal"]

    with cf.ThreadPoolExecutor(4) as ex:
        pos = list(ex.map(report, harmful))
        neg = list(ex.map(report, harmless))
    for rep in pos + neg:
        # a score for the prefill probe (the shipped file's); none for a lookahead condition
        assert rep["when"] == "auto" and (rep["score"] is None or isinstance(rep["score"], float))
        assert rep["applied"] == (1.0 if rep["fired"] else 0.0)
    assert sum(r["fired"] for r in pos) >= 3, pos
    assert sum(r["fired"] for r in neg) <= 1, neg
    by_id = report(harmful[0], model=demo_server.base_id + "+refusal@auto", extra={})
    assert by_id["fired"] == pos[0]["fired"]
    if pos[0]["score"] is not None:
        assert abs(by_id["score"] - pos[0]["score"]) < 1e-3
