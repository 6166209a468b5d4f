"""Engine mechanics on a tiny random llama: conditional rows in one batch, cancellation, limits."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from directions.detection import LOOKAHEAD_JUDGES
from directions.fileformat import DirectionSet
from server.engine import (
    DirectionRequest,
    EngineConfig,
    EngineOverloaded,
    GenerationRequest,
    SamplingParams,
    TorchEngine,
)


class IdTokenizer:
    """Decodes ids as space-separated numbers; id 1 is EOS."""

    eos_token_id = 1
    pad_token_id = 0

    def decode(self, ids, **kw):
        return "".join(f" {i}" for i in ids)

    def __len__(self):
        return 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        bos_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def _run(engine, reqs, start: bool = False):
    """Submit all (then start the engine if ``start``: they are admitted together), wait;
    return {rid: (tokens, logprobs, reports)}."""
    out = {r.request_id: ([], [], {}) for r in reqs}
    left = threading.Semaphore(0)

    def emitter(rid):
        def emit(o):
            out[rid][0].extend(o.token_ids)
            out[rid][1].extend(x.logprob for x in (o.logprobs or []))
            if o.steering is not None:  # the first event's reports, as they were when it was sent
                out[rid][2].update({k: copy.copy(v) for k, v in o.steering.items()})
            if o.finished:
                left.release()

        return emit

    for r in reqs:
        engine.submit(r, emitter(r.request_id))
    if start:
        engine.start()
    for _ in reqs:
        assert left.acquire(timeout=60)
    return out


def _run_fresh(model, directions, reqs):
    """``reqs`` on a fresh engine, all submitted before it starts (admitted together, one prefill
    group): (outputs as :func:`_run`, the engine's batched prefill count)."""
    eng = TorchEngine(model, IdTokenizer(), directions, EngineConfig(max_batch_size=4))
    try:
        return _run(eng, reqs, start=True), eng.batched_prefills
    finally:
        eng.shutdown()


def _req(rid, ids, steering=None, n=6):
    sp = SamplingParams(max_tokens=n, temperature=0, logprobs=True, ignore_eos=True)
    return GenerationRequest(rid, ids, sp, steering or {})


def _scores(model, prompts, layer, v):
    res = []
    for ids in prompts:
        with torch.inference_mode():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        res.append(float(hs[layer][0, -1] @ v))
    return res


# Differently batched computations of one request (prefilled alone or in a group, decoded in
# batches of other sizes) run other float kernels and agree only to rounding: logprobs within
# LOGPROB_TOL and the same greedy tokens. On these fp32 tiny models the differences seen are a
# few ulps (up to ~1e-6); steering at strength 1 moves logprobs by more than 1e-2.
LOGPROB_TOL = 1e-5


def _close(a, b):
    """Same greedy tokens and logprobs within LOGPROB_TOL (for differently batched computations)."""
    assert a[0] == b[0], "greedy tokens differ"
    torch.testing.assert_close(torch.tensor(a[1]), torch.tensor(b[1]), atol=LOGPROB_TOL, rtol=0)


def test_conditional_rows_share_a_batch(tiny):
    """Conditional rows are prefilled in the same left-padded forward as plain rows; a row whose
    condition does not fire is bit-identical to the plain request computed the same way (same
    prefill group and padding, same decode batch), and a firing row is the always-on request."""
    g = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    prompts = [[5, 9, 13, 2, 7], [3, 4, 50, 61, 22, 8, 8]]
    s = _scores(tiny, prompts, 2, v)
    hi, lo = (0, 1) if s[0] > s[1] else (1, 0)
    ds = DirectionSet("d", r, torch.ones(3), detect_vector=v, detect_layer=2, detect_threshold=(s[0] + s[1]) / 2)
    auto, always = {"d": DirectionRequest(1.0, "auto")}, {"d": DirectionRequest(1.0)}
    prefills = {}

    def run(tag, reqs):
        out, prefills[tag] = _run_fresh(tiny, {"d": ds}, reqs)
        return out

    mixed = run("mixed", [_req("fire", prompts[hi], auto), _req("quiet", prompts[lo], auto)])
    plain = run("plain", [_req("p_hi", prompts[hi]), _req("p_lo", prompts[lo])])
    forced = run("forced", [_req("a_hi", prompts[hi], always), _req("a_lo", prompts[lo])])
    solo_quiet = run("solo_quiet", [_req("solo", prompts[lo])])
    solo_auto = run("solo_auto", [_req("s_auto", prompts[hi], auto)])
    solo_always = run("solo_always", [_req("s_always", prompts[hi], always)])
    assert prefills == {"mixed": 1, "plain": 1, "forced": 1, "solo_quiet": 0, "solo_auto": 0, "solo_always": 0}
    assert mixed["fire"][2]["d"].fired is True and mixed["fire"][2]["d"].applied == 1.0
    assert mixed["quiet"][2]["d"].fired is False and mixed["quiet"][2]["d"].applied == 0.0
    assert solo_auto["s_auto"][2]["d"].fired is True
    # Computed the same way: bit-identical. The quiet row is the plain row of the same group
    # (its prefill is that forward; in decode the other row's strength does not touch it)...
    assert mixed["quiet"][:2] == plain["p_lo"][:2] == forced["a_lo"][:2]
    # ...and a conditional request alone that fires is the always-on request alone.
    assert solo_auto["s_auto"][:2] == solo_always["s_always"][:2]
    # Computed differently (the firing row is prefilled again in a batch of the firing rows
    # only; alone vs in a group of two): within float tolerance, the same greedy tokens.
    _close(mixed["fire"], forced["a_hi"])
    _close(mixed["quiet"], solo_quiet["solo"])
    # the direction does something far above that tolerance
    assert max(abs(a - b) for a, b in zip(mixed["fire"][1], plain["p_hi"][1], strict=True)) > 1000 * LOGPROB_TOL


def test_queue_bound_and_cancel(tiny):
    eng = TorchEngine(tiny, IdTokenizer(), {}, EngineConfig(max_batch_size=1, max_queue=1))
    # not started: submissions stay queued, so the bound is deterministic
    eng.submit(_req("a", [5, 6]), lambda o: None)
    with pytest.raises(EngineOverloaded):
        eng.submit(_req("b", [5, 6]), lambda o: None)
    eng.start()
    got = []
    done = threading.Event()

    def emit(o):
        got.append(o)
        if o.finished:
            done.set()

    eng.cancel("a")
    eng.submit(_req("c", [5, 6], n=200), emit)
    eng.cancel("c")
    assert done.wait(30)
    assert got[-1].finish_reason == "cancelled"
    eng.shutdown()
    assert eng.num_running == 0 and eng.num_waiting == 0


def test_max_model_len_ends_with_length(tiny):
    eng = TorchEngine(tiny, IdTokenizer(), {}, EngineConfig(max_model_len=8))
    eng.start()
    try:
        out = _run(eng, [_req("x", [5, 6, 7, 8, 9], n=100)])
    finally:
        eng.shutdown()
    assert len(out["x"][0]) == 3


def test_batched_prefill_matches_one_by_one(tiny):
    """Requests waiting together are prefilled in one left-padded forward (per-row strengths,
    prompts of different lengths) and give the tokens and, within float tolerance, the
    logprobs of prefilling them one by one."""
    g = torch.Generator().manual_seed(2)
    ds = DirectionSet("d", torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1), torch.ones(3))
    prompts = [[5, 9, 13], [3, 4, 50, 61, 22, 8, 8, 17, 30], [7, 7], [11, 12, 13, 14, 15]]
    strengths = [0.0, 1.0, -0.5, 0.0]

    def reqs(tag):
        return [
            _req(f"{tag}{i}", p, {"d": DirectionRequest(s)} if s else {}, n=8)
            for i, (p, s) in enumerate(zip(prompts, strengths, strict=True))
        ]

    results = {}
    for batch in (1, 8):
        eng = TorchEngine(tiny, IdTokenizer(), {"d": ds}, EngineConfig(max_batch_size=4, prefill_batch=batch))
        try:
            results[batch] = _run(eng, reqs(f"b{batch}-"), start=True)
            assert (eng.batched_prefills > 0) == (batch > 1)
        finally:
            eng.shutdown()
    for i in range(len(prompts)):
        one, many = results[1][f"b1-{i}"], results[8][f"b8-{i}"]
        _close(many, one)
    assert results[8]["b8-1"][0] != results[8]["b8-0"][0]


def test_firing_case_edit(tiny):
    """A file with a firing-case edit: a ``when: auto`` row that fires gets that edit (the same
    as the always-on request of a file whose own edit it is), a quiet row stays plain, and an
    ``always`` request keeps the file's own edit."""
    g = torch.Generator().manual_seed(2)
    own = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    fire_dirs = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    fire_w = torch.tensor([0.5, 1.0, 2.0])
    v = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    prompts = [[5, 9, 13, 2, 7], [3, 4, 50, 61, 22, 8, 8]]
    s = _scores(tiny, prompts, 2, v)
    hi, lo = (0, 1) if s[0] > s[1] else (1, 0)
    cond = {"detect_vector": v, "detect_layer": 2, "detect_threshold": (s[0] + s[1]) / 2}
    ds = DirectionSet("d", own, torch.ones(3), **cond)
    ds.auto_edit = DirectionSet("d@auto", fire_dirs, fire_w)
    as_own = DirectionSet("d", fire_dirs, fire_w)  # the firing-case edit as a plain file

    def run(dirs, reqs):
        return _run_fresh(tiny, {"d": dirs}, reqs)[0]

    auto, always = {"d": DirectionRequest(1.0, "auto")}, {"d": DirectionRequest(1.0)}
    fired = run(ds, [_req("f", prompts[hi], auto)])["f"]
    quiet = run(ds, [_req("q", prompts[lo], auto)])["q"]
    own_always = run(ds, [_req("a", prompts[hi], always)])["a"]
    other_always = run(as_own, [_req("o", prompts[hi], always)])["o"]
    plain = run(ds, [_req("p", prompts[lo])])["p"]
    plain_hi = run(ds, [_req("p", prompts[hi])])["p"]
    old_style = run(DirectionSet("d", own, torch.ones(3), **cond), [_req("f", prompts[hi], auto)])["f"]
    assert fired[2]["d"].fired is True and fired[2]["d"].applied == 1.0 and "d@auto" not in fired[2]
    assert quiet[2]["d"].fired is False
    assert fired[:2] == other_always[:2]  # the firing-case edit, bit for bit
    assert quiet[:2] == plain[:2]
    assert old_style[:2] == own_always[:2]  # without one, a firing row gets the file's own edit
    # the two edits differ by far more than rounding
    assert max(abs(a - b) for a, b in zip(fired[1], own_always[1], strict=True)) > 1000 * LOGPROB_TOL
    assert max(abs(a - b) for a, b in zip(fired[1], plain_hi[1], strict=True)) > 1000 * LOGPROB_TOL


def _lookahead_set(own, fire_dirs, fire_w, k, judge="test"):
    ds = DirectionSet("d", own, torch.ones(3), metadata={"auto_lookahead": json.dumps({"tokens": k, "judge": judge})})
    ds.auto_edit = DirectionSet("d@auto", fire_dirs, fire_w)
    return ds


def test_lookahead_condition(tiny, monkeypatch):
    """A file with a lookahead condition: a ``when: auto`` row decodes its first K tokens unedited
    and holds them back; where the judge flags them the row restarts with the firing-case edit
    (bit for bit the always-on request of that edit, prefilled alone), else the held tokens go
    out and the reply is the plain model's. Rows that restart share the batch with others."""
    g = torch.Generator().manual_seed(3)
    own = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    fire_dirs = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    fire_w = torch.tensor([1.0, 2.0, 2.0])
    as_own = DirectionSet("d", fire_dirs, fire_w)
    prompts = [[5, 9, 13, 2, 7], [3, 4, 50, 61, 22, 8, 8], [7, 7, 30]]
    plain = {i: _run_fresh(tiny, {"d": as_own}, [_req("p", p)])[0]["p"] for i, p in enumerate(prompts)}
    # the judge fires on the plain reply of prompt 0 (its first two tokens), on no other
    flag = "".join(f" {t}" for t in plain[0][0][:2])
    assert all("".join(f" {t}" for t in plain[i][0][:2]) != flag for i in (1, 2))
    seen: list[str] = []

    def judge(text):
        seen.append(text)
        return text == flag

    monkeypatch.setitem(LOOKAHEAD_JUDGES, "test", judge)
    ds = _lookahead_set(own, fire_dirs, fire_w, 2)
    assert ds.has_condition and not ds.has_probe and ds.lookahead == (2, "test")
    auto, always = {"d": DirectionRequest(1.0, "auto")}, {"d": DirectionRequest(1.0)}
    steered = _run_fresh(tiny, {"d": as_own}, [_req("s", prompts[0], always)])[0]["s"]

    alone = {i: _run_fresh(tiny, {"d": ds}, [_req("a", p, auto)])[0]["a"] for i, p in enumerate(prompts)}
    assert alone[0][:2] == steered[:2]  # fired: the firing-case edit from the prompt on, bit for bit
    assert alone[0][2]["d"].fired is True and alone[0][2]["d"].applied == 1.0 and alone[0][2]["d"].score is None
    for i in (1, 2):
        assert alone[i][:2] == plain[i][:2]  # quiet: the plain reply, bit for bit
        assert alone[i][2]["d"].fired is False and alone[i][2]["d"].applied == 0.0
    assert len(seen) == 3 and all(len(t.split()) == 2 for t in seen)  # the judge read two tokens each time

    # together in one batch, with a plain and an always row: each as alone, within rounding
    reqs = [_req(f"a{i}", p, auto) for i, p in enumerate(prompts)]
    reqs += [_req("plain", prompts[1]), _req("always", prompts[0], always, n=9)]
    out = _run_fresh(tiny, {"d": ds}, reqs)[0]
    first = {rid: o[2]["d"].fired for rid, o in out.items() if "d" in o[2]}  # the first event: decided already
    _close(out["a0"], steered)
    _close(out["a1"], plain[1])
    _close(out["a2"], plain[2])
    _close(out["plain"], plain[1])
    assert out["always"][0][:6] != plain[0][0]
    assert first == {"a0": True, "a1": False, "a2": False, "always": None}  # never sent before the decision


def test_lookahead_short_and_cancelled(tiny, monkeypatch):
    """With max_tokens below the lookahead the condition still reads K tokens and the reply is cut
    at max_tokens; a row cancelled while its tokens are held ends with one cancelled event."""
    seen: list[str] = []
    monkeypatch.setitem(LOOKAHEAD_JUDGES, "count", lambda text: seen.append(text) or False)
    monkeypatch.setitem(LOOKAHEAD_JUDGES, "never", lambda text: False)
    monkeypatch.setitem(LOOKAHEAD_JUDGES, "always", lambda text: True)
    g = torch.Generator().manual_seed(4)
    own = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    p = [5, 9, 13, 2, 7]
    plain = _run_fresh(tiny, {}, [_req("p", p, n=3)])[0]["p"]
    for judge in ("never", "always", "count"):
        ds = _lookahead_set(own, own, torch.ones(3), 8, judge)
        got = _run_fresh(tiny, {"d": ds}, [_req("a", p, {"d": DirectionRequest(1.0, "auto")}, n=3)])[0]["a"]
        assert len(got[0]) == 3 and got[2]["d"].fired is (judge == "always")
        assert got[2]["d"].applied == (1.0 if judge == "always" else 0.0)
        if judge != "always":
            assert got[:2] == plain[:2]
    assert [len(t.split()) for t in seen] == [8]
    ds = _lookahead_set(own, own, torch.ones(3), 8, "never")
    eng = TorchEngine(tiny, IdTokenizer(), {"d": ds}, EngineConfig(max_batch_size=4))
    events = []
    done = threading.Event()

    def emit(o):
        events.append(o)
        if o.finished:
            done.set()

    eng.start()
    try:
        eng.submit(_req("c", p, {"d": DirectionRequest(1.0, "auto")}, n=50), emit)
        eng.cancel("c")
        assert done.wait(60)
    finally:
        eng.shutdown()
    assert [e.finish_reason for e in events if e.finished] == ["cancelled"]
