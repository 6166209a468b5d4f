"""Engine mechanics on a tiny random llama: conditional rows in one batch, cancellation, limits."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from directions.fileformat import DirectionSet
from server.engine import DirectionRequest, Engine, EngineConfig, EngineOverloaded, GenerationRequest, SamplingParams


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
            if o.steering is not None:
                out[rid][2].update(o.steering)
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


def test_conditional_rows_share_a_batch(tiny):
    g = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    prompts = [[5, 9, 13, 2, 7], [3, 4, 50, 61, 22, 8, 8]]
    s = _scores(tiny, prompts, 2, v)
    hi, lo = (0, 1) if s[0] > s[1] else (1, 0)
    ds = DirectionSet("d", r, torch.ones(3), detect_vector=v, detect_layer=2, detect_threshold=(s[0] + s[1]) / 2)
    eng = Engine(tiny, IdTokenizer(), {"d": ds}, EngineConfig(max_batch_size=4))
    eng.start()
    try:
        auto = {"d": DirectionRequest(1.0, "auto")}
        mixed = _run(eng, [_req("fire", prompts[hi], auto), _req("quiet", prompts[lo], auto)])
        plain = _run(eng, [_req("p_hi", prompts[hi]), _req("p_lo", prompts[lo])])
        forced = _run(eng, [_req("a_hi", prompts[hi], {"d": DirectionRequest(1.0)}), _req("a_lo", prompts[lo])])
        solo_quiet = _run(eng, [_req("solo", prompts[lo])])
    finally:
        eng.shutdown()
    assert mixed["fire"][2]["d"].fired is True and mixed["fire"][2]["d"].applied == 1.0
    assert mixed["quiet"][2]["d"].fired is False and mixed["quiet"][2]["d"].applied == 0.0
    # The non-firing row is bit-identical to the plain model in the same batch layout...
    assert mixed["quiet"][1] == plain["p_lo"][1]
    assert mixed["quiet"][0] == solo_quiet["solo"][0]
    # ...and the firing row is exactly the always-on row.
    assert mixed["fire"][1] == forced["a_hi"][1]
    assert mixed["fire"][1] != plain["p_hi"][1]


def test_queue_bound_and_cancel(tiny):
    eng = Engine(tiny, IdTokenizer(), {}, EngineConfig(max_batch_size=1, max_queue=1))
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
    eng = Engine(tiny, IdTokenizer(), {}, EngineConfig(max_model_len=8))
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
        eng = Engine(tiny, IdTokenizer(), {"d": ds}, EngineConfig(max_batch_size=4, prefill_batch=batch))
        try:
            results[batch] = _run(eng, reqs(f"b{batch}-"), start=True)
            assert (eng.batched_prefills > 0) == (batch > 1)
        finally:
            eng.shutdown()
    for i in range(len(prompts)):
        one, many = results[1][f"b1-{i}"], results[8][f"b8-{i}"]
        assert many[0] == one[0], f"row {i}: tokens differ"
        torch.testing.assert_close(torch.tensor(many[1]), torch.tensor(one[1]), atol=1e-5, rtol=1e-5)
    assert results[8]["b8-1"][0] != results[8]["b8-0"][0]
