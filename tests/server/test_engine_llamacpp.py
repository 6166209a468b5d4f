"""The llama.cpp engine on the demo model's original Q4_K_M GGUF: frankly's scheduler, steering by LoRA scales."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from directions.fileformat import load_direction
from directions.models import cache_root
from directions.prompting import user_prompt_ids
from directions.strengths import DirectionRequest
from server.engine.errors import EngineOverloaded
from server.engine.llamacpp_engine import LlamaCppConfig, LlamaCppEngine, ensure_adapters, steering_key
from server.engine.torch_engine import eos_ids
from server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "directions" / "shipped"
HARMFUL = "How do I pick a lock?"


def _req(rid, tok, prompt, steering=None, n=24, **kw):
    return GenerationRequest(
        rid, user_prompt_ids(tok, prompt), SamplingParams(max_tokens=n, temperature=0.0, **kw), steering or {}
    )


def _run(eng, reqs, timeout=600):
    out, done, lock = {}, threading.Event(), threading.Lock()
    for r in reqs:
        out[r.request_id] = {"text": "", "ids": [], "events": []}

    def make(rid):
        def emit(o):
            with lock:
                out[rid]["text"] += o.text
                out[rid]["ids"] += o.token_ids
                out[rid]["events"].append(o)
                if o.finished and all(v["events"] and v["events"][-1].finished for v in out.values()):
                    done.set()

        return emit

    for r in reqs:
        eng.submit(r, make(r.request_id))
    assert done.wait(timeout)
    return out


@pytest.fixture(scope="module")
def engine(demo_model):
    dirs = {n: load_direction(SHIPPED / f"qwen-demo-{n}.safetensors", name=n) for n in ("refusal", "slop")}
    base, adapters = ensure_adapters(Path(demo_model.gguf), dirs, cache_root())
    eos = eos_ids(demo_model.model, demo_model.tokenizer)
    eng = LlamaCppEngine(base, demo_model.tokenizer, adapters, eos, LlamaCppConfig(max_batch_size=4, max_model_len=512))
    eng.start()
    yield eng
    eng.shutdown()


def test_steering_changes_the_answer_and_is_reported(engine, demo_model):
    tok = demo_model.tokenizer
    out = _run(engine, [_req("plain", tok, HARMFUL), _req("steer", tok, HARMFUL, {"refusal": DirectionRequest(1.0)})])
    assert out["plain"]["ids"] != out["steer"]["ids"]
    first = out["steer"]["events"][0]
    assert first.steering["refusal"].applied == 1.0
    assert out["plain"]["events"][-1].finish_reason in ("stop", "length")


def test_mixed_strengths_share_a_step_and_equal_their_solo_runs(engine, demo_model):
    """Rows with different strengths decode in the same step, one llama_decode per strength group;
    each row's greedy tokens are those it gets alone."""
    tok = demo_model.tokenizer
    steer = {"refusal": DirectionRequest(1.0)}
    solo_plain = _run(engine, [_req("a", tok, HARMFUL)])["a"]["ids"]
    solo_steer = _run(engine, [_req("b", tok, HARMFUL, steer)])["b"]["ids"]
    passes0, steps0 = engine.passes, engine.steps
    mixed = _run(engine, [_req("p", tok, HARMFUL), _req("s", tok, HARMFUL, steer)])
    assert engine.passes - passes0 > engine.steps - steps0  # some steps ran two groups
    assert mixed["p"]["ids"] == solo_plain
    assert mixed["s"]["ids"] == solo_steer


def test_cancel_and_queue_bound(demo_model, engine):
    tok = demo_model.tokenizer
    got, done = [], threading.Event()

    def emit(o):
        got.append(o)
        if o.finished:
            done.set()

    engine.submit(_req("long", tok, "Write a long essay about the sea.", n=400), emit)
    engine.cancel("long")
    assert done.wait(60)
    assert got[-1].finish_reason == "cancelled"
    small = LlamaCppEngine(engine.gguf, tok, {}, {tok.eos_token_id}, LlamaCppConfig(max_batch_size=1, max_queue=1))
    small.submit(_req("q1", tok, "hi"), lambda o: None)  # not started: stays queued
    with pytest.raises(EngineOverloaded):
        small.submit(_req("q2", tok, "hi"), lambda o: None)


def test_steering_key_ignores_zero_strengths():
    assert steering_key({"a": 0.0, "b": 1}) == steering_key({"b": 1.0}) == (("b", 1.0),)
    assert steering_key({}) == ()
