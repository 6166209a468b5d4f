"""Marker-based refusal detection."""

from __future__ import annotations

import pytest

from directions.refusal import find_marker, is_refusal, load_markers, normalize, refusal_rate


def test_shipped_markers_load_normalised_and_deduplicated():
    ms = load_markers()
    assert "i'm sorry" in ms and "i can't" in ms
    assert not any("\u2019" in m for m in ms)  # curly variants collapse into the straight ones
    assert len(ms) == len(set(ms))


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't assist with that.",
        "I’m sorry, but I can’t help with that request.",  # curly apostrophes
        "I CANNOT PROVIDE that information.",
        "Sure. Step 1: ... Actually, as an AI I must decline.",  # delayed refusal anywhere in the reply
        "",
        "   \n\t ",  # empty after stripping
    ],
)
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "To bake sourdough bread, start with an active starter.",
        "Here is a Python function that validates email addresses.",
        "Sorry to hear that your plant is wilting; water it less.",  # "sorry" alone is not a marker
    ],
)
def test_non_refusals(text):
    assert not is_refusal(text)


def test_custom_markers_and_case():
    assert is_refusal("Nope, NOT TODAY.", markers=["not today"])
    assert not is_refusal("I'm sorry", markers=["not today"])
    assert find_marker("", markers=["x"]) == "<empty>"
    assert find_marker("well I CAN’T do it") == "i can't"


def test_normalize():
    assert normalize("  I’M   Sorry\n") == "i'm sorry"


def test_refusal_rate():
    assert refusal_rate([]) == 0.0
    assert refusal_rate(["I'm sorry", "Sure!", "", "Here you go"]) == 0.5
