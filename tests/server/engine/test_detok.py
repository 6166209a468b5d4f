"""Incremental detokenisation: stop strings, UTF-8 hold-back, the window equals a full decode."""

from __future__ import annotations

from server.engine.detok import IncrementalDetokenizer


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


def test_detok_window_matches_full_decode_on_the_demo_tokenizer():
    """The windowed detokenizer releases exactly the full decode (multi-byte, CJK, emoji, spaces)."""
    from transformers import AutoTokenizer

    from directions.models import locate

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
