"""The engine on the real demo model: exactness at strength 0, batching invariance, joining mid-generation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from directions.fileformat import DirectionSet
from directions.prompting import user_prompt_ids
from server.engine import DirectionRequest, EngineConfig, GenerationRequest, SamplingParams, TorchEngine

pytestmark = pytest.mark.slow

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "List three prime numbers."]


@pytest.fixture(scope="module")
def random_direction(demo_model):
    g = torch.Generator().manual_seed(0)
    cfg = demo_model.model.config
    d = torch.nn.functional.normalize(torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=g), dim=-1)
    return DirectionSet("rand", d, torch.ones(cfg.num_hidden_layers))


@pytest.fixture(scope="module")
def engine(demo_model, random_direction):
    eng = TorchEngine(
        demo_model.model, demo_model.tokenizer, {"rand": random_direction}, EngineConfig(max_batch_size=8)
    )
    eng.start()
    yield eng
    eng.shutdown()


def _req(rid, ids, n=12, strength=0.0, logprobs=False):
    steering = {"rand": DirectionRequest(strength)} if strength else {}
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs), steering)


def _collect(engine, req):
    """Submit one request and return its token ids and logprobs."""
    toks, lps, done = [], [], threading.Event()

    def emit(out):
        toks.extend(out.token_ids)
        lps.extend(out.logprobs or [])
        if out.finished:
            done.set()

    engine.submit(req, emit)
    assert done.wait(300)
    return toks, lps


def test_strength_zero_matches_generate_bit_for_bit(engine, demo_model):
    tok, model = demo_model.tokenizer, demo_model.model
    ids = user_prompt_ids(tok, PROMPTS[0])
    with torch.inference_mode():
        g = model.generate(
            torch.tensor([ids]),
            max_new_tokens=12,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
    ref = g.sequences[0, len(ids) :].tolist()
    toks, lps = _collect(engine, _req("z", ids, logprobs=True))
    eos = engine.eos_ids
    assert toks == [t for t in ref if t not in eos][: len(toks)]
    assert len(toks) >= 5
    # logprob of every emitted token equals log_softmax of generate's raw logits exactly
    for step, lp in enumerate(lps):
        ref_lp = torch.log_softmax(g.logits[step][0].float(), dim=-1)[lp.token_id].item()
        assert lp.logprob == ref_lp, f"step {step}: {lp.logprob} != {ref_lp}"


def test_hooks_not_installed_at_strength_zero(engine):
    assert not engine.hooks.installed


def test_concurrent_rows_with_different_strengths_match_solo(engine, demo_model):
    tok = demo_model.tokenizer
    cases = [(PROMPTS[i % 3], s) for i, s in enumerate([0.0, 1.0, -0.5, 0.5])]
    solo = [
        _collect(engine, _req(f"solo{i}", user_prompt_ids(tok, p), strength=s))[0] for i, (p, s) in enumerate(cases)
    ]
    # now all at once, in one batch (prefilled together: one left-padded forward, per-row strengths)
    before = engine.batched_prefills
    results: dict[int, list[int]] = {}
    events = []
    for i, (p, s) in enumerate(cases):
        ev = threading.Event()
        events.append(ev)
        buf: list[int] = []
        results[i] = buf

        def emit(out, buf=buf, ev=ev):
            buf.extend(out.token_ids)
            if out.finished:
                ev.set()

        engine.submit(_req(f"batch{i}", user_prompt_ids(tok, p), strength=s), emit)
    for ev in events:
        assert ev.wait(300)
    for i in range(len(cases)):
        assert results[i] == solo[i], f"row {i} (strength {cases[i][1]}) differs in a batch"
    assert engine.batched_prefills > before, "simultaneous requests were not prefilled together"
    # the random direction at strength 1 must actually change something
    assert solo[0] != solo[1] or cases[0][0] != cases[1][0]


def test_new_request_joins_running_batch(engine, demo_model):
    tok = demo_model.tokenizer
    order: list[str] = []
    done = threading.Event()
    first_token_at: dict[str, float] = {}

    def emitter(name):
        def emit(out):
            if out.token_ids and name not in first_token_at:
                first_token_at[name] = time.monotonic()
            if out.finished:
                order.append(name)
                if len(order) == 2:
                    done.set()

        return emit

    long_req = _req("long", user_prompt_ids(tok, "Write a long story about a robot."), n=60)
    long_req.sampling.ignore_eos = True
    engine.submit(long_req, emitter("long"))
    while "long" not in first_token_at:
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    engine.submit(_req("short", user_prompt_ids(tok, "Say yes."), n=3), emitter("short"))
    assert done.wait(300)
    assert order == ["short", "long"], "the short request waited for the long one instead of joining the batch"
    assert first_token_at["short"] - t0 < 5.0
