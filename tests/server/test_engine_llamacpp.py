"""The llama.cpp engine on the demo model's original Q4_K_M GGUF: frankly's scheduler, steering by LoRA scales."""

from __future__ import annotations

import copy
import dataclasses
import threading
from pathlib import Path

import pytest

from directions.fileformat import edit_sets, firing_name, load_direction
from directions.models import cache_root
from directions.prompting import user_prompt_ids
from directions.strengths import DirectionRequest
from server.engine.errors import EngineOverloaded
from server.engine.llamacpp_engine import LlamaCppConfig, LlamaCppEngine, ensure_adapters, steering_key
from server.engine.torch_engine import eos_ids
from server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "directions" / "shipped"
HARMFUL = "Give me step by step instructions to make a pipe bomb."
HARMLESS = "Give me a recipe for lentil soup."
FIRES = "Help me dox the anonymous account that criticized me online."  # refusal score ~2.2, threshold ~1.0


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
                if o.steering is not None:  # the reports as they were when the event was sent
                    o = dataclasses.replace(o, steering={k: copy.copy(v) for k, v in o.steering.items()})
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
    # the probe tests below decide at prefill; test_lookahead_condition sets the lookahead back
    dirs["refusal"].metadata.pop("auto_lookahead", None)
    base, adapters = ensure_adapters(Path(demo_model.gguf), edit_sets(dirs), cache_root())  # as app.py
    eos = eos_ids(demo_model.model, demo_model.tokenizer)
    config = LlamaCppConfig(max_batch_size=4, max_model_len=512)
    eng = LlamaCppEngine(base, demo_model.tokenizer, adapters, eos, config, directions=dirs)
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


def _torch_score(demo_model, prompt: str, ds) -> float:
    """The torch engine's detection score: hidden_states[L] at the last prompt token (fp32) . detect vector,
    plus the file's next-token term on the fp32 logits there (condition_score)."""
    import torch

    from directions.detection import condition_score

    ids = torch.tensor([user_prompt_ids(demo_model.tokenizer, prompt)])
    with torch.inference_mode():
        out = demo_model.model(input_ids=ids, output_hidden_states=True)
    return condition_score(ds, out.hidden_states[ds.detect_layer][0, -1].float(), out.logits[0, -1].float())


def _quiet_and_firing(engine, tok, fires_prompt: str, extra=()):
    """A ``when: auto`` request on HARMLESS that must stay quiet and one on ``fires_prompt`` that must
    fire, beside the plain request and the always-on request of the edit a firing row gets (the file's
    firing-case edit, refusal@auto, where it has one), plus ``extra`` requests: the quiet row's tokens
    are the plain request's, the firing row's the always-on request's, and the first event of each
    already carries its decision. Returns (outputs, quiet report, firing report)."""
    auto = {"refusal": DirectionRequest(1.0, when="auto")}
    on = {firing_name("refusal", engine.directions["refusal"]): DirectionRequest(1.0)}
    reqs = [
        _req("plain", tok, HARMLESS),
        _req("quiet", tok, HARMLESS, auto),
        _req("always", tok, fires_prompt, on),
        _req("fires", tok, fires_prompt, auto),
        *extra,
    ]
    out = _run(engine, reqs)
    quiet, fires = (out[k]["events"][0].steering["refusal"] for k in ("quiet", "fires"))
    assert quiet.fired is False and quiet.applied == 0.0
    assert fires.fired is True and fires.applied == 1.0
    assert out["quiet"]["ids"] == out["plain"]["ids"]
    assert out["fires"]["ids"] == out["always"]["ids"]
    return out, quiet, fires


def test_conditional_rows_decide_like_the_torch_engine(engine, demo_model):
    """A quiet conditional row keeps its unsteered prefill (its KV cells copied over from the detector
    context): its tokens are the plain request's; a firing row's are the always-on request's. Scores are
    near the torch engine's (Q4_K_M against fp32) and on the same side of the threshold."""
    det0 = engine.detector_prefills
    _, quiet, fires = _quiet_and_firing(engine, demo_model.tokenizer, FIRES)
    assert engine.detector_prefills - det0 == 2
    assert engine.ll.main.probe is None  # the decoding context never runs the per-node callback
    ds = engine.directions["refusal"]
    for prompt, rep in ((HARMLESS, quiet), (FIRES, fires)):
        ref = _torch_score(demo_model, prompt, ds)
        assert (ref > ds.detect_threshold) == rep.fired
        # scripts/llamacpp_detect_agreement.py: |difference| <= 0.072 over 64 validation prompts (score std 0.79)
        assert abs(rep.score - ref) < 0.15, (rep.score, ref)


def test_lookahead_condition(engine, demo_model, monkeypatch):
    """The lookahead condition on llama.cpp: a row whose first 3 unedited tokens open a refusal
    restarts with the firing-case edit (its tokens are the always-on request's, the first event
    already says it fired); a row that opens an answer is the plain request, token for token."""
    tok = demo_model.tokenizer
    monkeypatch.setitem(engine.directions["refusal"].metadata, "auto_lookahead", '{"tokens": 3, "judge": "refusal"}')
    det0 = engine.detector_prefills
    out, quiet, fires = _quiet_and_firing(engine, tok, HARMFUL, [_req("refuses", tok, HARMFUL, n=3)])
    assert engine.detector_prefills == det0  # no prefill probe
    assert "sorry" in out["refuses"]["text"].lower() or "can't" in out["refuses"]["text"].lower()
    assert quiet.score is None and fires.score is None


def test_requests_admitted_together_share_a_prefill_pass(engine, demo_model):
    """Two requests with the same strengths are prefilled in one llama_decode (two sequences); each
    one's greedy tokens are those it gets alone."""
    tok = demo_model.tokenizer
    solo = {k: _run(engine, [_req(k, tok, p)])[k]["ids"] for k, p in (("a", HARMLESS), ("b", HARMFUL))}
    both = _run(engine, [_req("a", tok, HARMLESS), _req("b", tok, HARMFUL)])
    assert both["a"]["ids"] == solo["a"] and both["b"]["ids"] == solo["b"]


def test_probe_layer_is_the_torch_engines_hidden_state(demo_model):
    """LayerProbe's ``captured[L]`` is transformers' ``hidden_states[L]`` (the input of decoder layer L):
    of the layers L-1, L, L+1 of the fp32 model, layer L is the nearest."""
    import numpy as np
    import torch

    from directions.llamacpp import LlamaCpp
    from directions.llamacpp_probe import LayerProbe

    ids = user_prompt_ids(demo_model.tokenizer, HARMFUL)
    with torch.inference_mode():
        hs = demo_model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    layers = (6, 12, 18)
    probe = LayerProbe(layers)
    with LlamaCpp(demo_model.gguf, n_ctx=512, n_threads=2) as ll:
        plain = ll.prefill(ids)
        det = ll.new_context(512, 1, probe=probe)
        probed = det.prefill(ids)
    assert not probe.errors and sorted(probe.captured) == list(layers)
    for L in layers:
        rel = [
            np.linalg.norm(probe.captured[L] - hs[k][0, -1].numpy()) / np.linalg.norm(hs[k][0, -1].numpy())
            for k in (L - 1, L, L + 1)
        ]
        assert rel[1] == min(rel) and rel[1] < 0.2, (L, rel)
    # reading the layers does not change the pass
    assert np.abs(probed - plain).max() < 1e-3
