"""Slop score: phrase matches per 1,000 words, word boundaries, case-insensitive."""

from __future__ import annotations

import pytest

from directions.slop import corpus_slop_score, count_matches, count_words, load_phrases, slop_score

P = ("tapestry", "rich tapestry", "delve", "it's important to note", "sun-dappled")


def test_word_boundaries_and_case():
    assert count_matches("A TAPESTRY of tapestries", P) == 1  # "tapestries" is not "tapestry"
    assert count_matches("delve delved delves", P) == 1
    assert count_matches("Undelve", P) == 0


def test_longest_phrase_wins_without_double_counting():
    assert count_matches("a rich tapestry and a tapestry", P) == 2


def test_curly_apostrophe_and_punctuation_phrases():
    assert count_matches("It’s important to note that...", P) == 1
    assert count_matches("a sun-dappled glade, sun-dappled.", P) == 2
    assert count_matches("it's  important\nto note", P) == 1  # any whitespace between words


def test_score_per_thousand_words():
    text = "tapestry " + "word " * 99  # 1 match in 100 words
    assert count_words(text) == 100
    assert slop_score(text, P) == pytest.approx(10.0)
    assert slop_score("", P) == 0.0


def test_corpus_score_pools_words():
    texts = ["tapestry " + "w " * 9, "w " * 90]  # 1 match / 100 words pooled
    assert corpus_slop_score(texts, P) == pytest.approx(10.0)
    assert corpus_slop_score([], P) == 0.0


def test_shipped_phrase_list():
    ph = load_phrases()
    assert "tapestry" in ph and "delve" in ph
    assert slop_score("The rich tapestry of the bustling city was a testament to its vibrant past.") > 0
    assert slop_score("The city has a port and two train stations.") == 0.0
