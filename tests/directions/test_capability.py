"""Capability questions: accepted strings, case-insensitive."""

from __future__ import annotations

from directions.capability import capability_correct, capability_rate, read_capability
from directions.refusal import PROMPTS_DIR


def test_correct_when_an_accepted_string_occurs():
    assert capability_correct("The answer is PARIS.", ["paris"])
    assert not capability_correct("Lyon", ["paris", "Paris, France"])
    qs = [{"accept": ["4"]}, {"accept": ["blue"]}]
    assert capability_rate(["2 + 2 = 4", "red"], qs) == 0.5
    assert capability_rate([], []) == 0.0


def test_shipped_questions_have_accepted_answers():
    qs = read_capability(PROMPTS_DIR / "capability" / "questions.jsonl")
    assert len(qs) > 20 and all(q["question"] and q["accept"] for q in qs)
