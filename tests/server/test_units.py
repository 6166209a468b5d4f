"""Fast unit tests: steering parsing, incremental detokenisation, KV cache join/leave, settings order."""

from __future__ import annotations

import pytest
import torch

from directions.fileformat import DirectionSet
from server.engine import kvcache
from server.engine.detok import IncrementalDetokenizer
from server.errors import InvalidRequest, ModelNotFound
from server.steering import SteeringPolicy, steering_header


def _ds(cond=False):
    ds = DirectionSet("x", torch.nn.functional.normalize(torch.randn(2, 4), dim=-1), torch.ones(2))
    if cond:
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = torch.tensor([1.0, 0, 0, 0]), 1, 0.5
    return ds


@pytest.fixture
def policy():
    return SteeringPolicy("base", {"refusal": _ds(cond=True), "slop": _ds()}, max_abs_strength=4.0, max_directions=2)


def test_model_suffixes(policy):
    assert policy.parse_model("base") == {}
    r = policy.parse_model("base+refusal+slop:0.5")
    assert r["refusal"].strength == 1.0 and r["slop"].strength == 0.5
    assert policy.parse_model("base+refusal:0.8@auto")["refusal"].when == "auto"
    with pytest.raises(ModelNotFound):
        policy.parse_model("other+refusal")
    with pytest.raises(ModelNotFound):
        policy.parse_model("base+nope")
    with pytest.raises(InvalidRequest) as e:
        policy.parse_model("base+refusal:abc")
    assert e.value.param == "model"


def test_body_wins_per_direction(policy):
    r = policy.resolve("base+refusal+slop:0.5", {"refusal": 0.25})
    assert r["refusal"].strength == 0.25 and r["slop"].strength == 0.5
    r = policy.resolve("base", '{"slop": {"strength": -0.5}}')
    assert r["slop"].strength == -0.5
    assert steering_header(r) == "slop=-0.5"
    assert steering_header({}) == "none"


@pytest.mark.parametrize(
    "value,param",
    [
        ({"nope": 1}, "steering.nope"),
        ({"refusal": float("nan")}, "steering.refusal"),
        ({"refusal": float("inf")}, "steering.refusal"),
        ({"refusal": 10}, "steering.refusal"),
        ({"refusal": "1"}, "steering.refusal"),
        ({"refusal": True}, "steering.refusal"),
        ({"slop": {"strength": 1, "when": "auto"}}, "steering.slop"),  # no condition calibrated
        ({"refusal": {"strength": 1, "when": "sometimes"}}, "steering.refusal"),
        ("not json", "steering"),
        ([1, 2], "steering"),
    ],
)
def test_bad_steering(policy, value, param):
    with pytest.raises(InvalidRequest) as e:
        policy.parse_body(value)
    assert e.value.param == param


def test_too_many_directions():
    p = SteeringPolicy("b", {"a": _ds(), "c": _ds()}, 4.0, max_directions=1)
    with pytest.raises(InvalidRequest):
        p.resolve("b+a", {"c": 1})


class _CharTok:
    """Each id is one character; id 0 is half of a two-id character (tests UTF-8 hold-back)."""

    def decode(self, ids, **kw):
        s, i = "", 0
        while i < len(ids):
            if ids[i] == 0:
                if i + 1 < len(ids):
                    s += "é"
                    i += 2
                    continue
                s += "\ufffd"
                i += 1
                continue
            s += chr(ids[i])
            i += 1
        return s


def test_detok_stop_string_and_holdback():
    d = IncrementalDetokenizer(_CharTok(), ["END"])
    out = "".join(d.add(ord(c)) for c in "hello E")
    assert out == "hello "  # 'E' held back: could start END
    out += d.add(ord("N")) + d.add(ord("D"))
    assert d.stopped and out == "hello "
    d2 = IncrementalDetokenizer(_CharTok(), ["END"])
    text = "".join(d2.add(ord(c)) for c in "EXIT")
    assert text + d2.flush() == "EXIT"


def test_detok_multibyte_holdback():
    d = IncrementalDetokenizer(_CharTok(), [])
    assert d.add(ord("a")) == "a"
    assert d.add(0) == ""
    assert d.add(1) == "é"


def test_kvcache_join_and_leave():
    def cache(b, t, fill):
        c = kvcache.new_cache()
        c.update(torch.full((b, 2, t, 3), fill), torch.full((b, 2, t, 3), fill), 0)
        return c, torch.ones(b, t, dtype=torch.long)

    a, ma = cache(2, 5, 1.0)
    b, mb = cache(1, 3, 2.0)
    c, m = kvcache.merge(a, ma, b, mb)
    assert c.layers[0].keys.shape == (3, 2, 5, 3)
    assert m.tolist()[2] == [0, 0, 1, 1, 1]
    assert torch.all(c.layers[0].keys[2, :, :2] == 0) and torch.all(c.layers[0].keys[2, :, 2:] == 2.0)
    c, m = kvcache.select(c, m, [2])  # only the short row left: padding columns dropped
    assert m.tolist() == [[1, 1, 1]] and c.layers[0].keys.shape == (1, 2, 3, 3)


def test_kvcache_growable_layer_matches_concatenation():
    """In-place appends give the same tensors as DynamicLayer's concatenation, across
    regrowth and after a row leave replaced the tensors from outside."""
    from transformers.cache_utils import DynamicLayer

    kvcache.GrowableLayer.headroom = 4
    try:
        g, ref = kvcache.GrowableLayer(), DynamicLayer()
        gen = torch.Generator().manual_seed(0)
        for step, q in enumerate([5, 1, 1, 1, 1, 1, 1, 3, 1]):
            k, v = torch.randn(2, 2, q, 3, generator=gen), torch.randn(2, 2, q, 3, generator=gen)
            gk, gv = g.update(k, v)
            rk, rv = ref.update(k, v)
            assert torch.equal(gk, rk) and torch.equal(gv, rv), step
        assert g.keys.shape[2] == 15 and g._kbuf.shape[2] > 15  # spare room left
        buf = g._kbuf
        g.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3))
        assert g._kbuf is buf  # a decode step writes in place
        g.keys, g.values = g.keys[1:, :, 2:], g.values[1:, :, 2:]  # what kvcache.select does
        expect_k, expect_v = g.keys.clone(), g.values.clone()
        k = torch.ones(1, 2, 1, 3)
        gk, gv = g.update(k, 2 * k)
        assert g._kbuf is not buf and gk.shape == (1, 2, 15, 3)
        assert torch.equal(gk[:, :, :-1], expect_k) and torch.equal(gv[:, :, :-1], expect_v)
        assert torch.equal(gk[:, :, -1:], k) and torch.equal(gv[:, :, -1:], 2 * k)
    finally:
        kvcache.GrowableLayer.headroom = 128


def test_settings_source_order(tmp_path, monkeypatch):
    from server.settings import CONFIG_ENV, ServerSettings

    cfg = tmp_path / "f.toml"
    cfg.write_text("port = 7001\nmax_n = 3\nmax_queue = 5\n")
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    monkeypatch.setenv("FRANKLY_MAX_N", "2")
    monkeypatch.setenv("FRANKLY_API_KEYS", "a,b")
    s = ServerSettings(max_queue=9)
    assert (s.port, s.max_n, s.max_queue) == (7001, 2, 9)  # file < env < init (CLI)
    assert s.api_keys == ["a", "b"]


def test_detok_window_matches_full_decode_on_the_demo_tokenizer():
    """The windowed detokenizer releases exactly the full decode (multi-byte, CJK, emoji, spaces)."""
    from transformers import AutoTokenizer

    from server.modelio import locate

    tok = AutoTokenizer.from_pretrained(locate("demo")[0])
    text = "Naïve café — 東京タワー 🚀🔥 and \u2019quotes\u2019,\n\n  indented  code: x = 1 # ok 😀"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [])
    out = "".join(d.add(i) for i in ids) + d.flush()
    assert out == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    d = IncrementalDetokenizer(tok, ["タワー"])
    out = ""
    for i in ids:
        out += d.add(i)
        if d.stopped:
            break
    assert out == "Naïve café — 東京"
