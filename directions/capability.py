"""Capability questions: a short answer is correct when it contains an accepted string.

A cheap check that an edit has not broken ordinary work (arithmetic, facts, code), measured
beside the refusal rate and the slop score by ``frankly eval`` and ``frankly extract``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from directions.files import read_jsonl


def read_capability(path: str | Path) -> list[dict]:
    """Questions from a JSON-lines file: ``{"question": ..., "answer": ..., "accept": [...]}`` per line."""
    return read_jsonl(path)


def capability_correct(text: str, accept: Sequence[str]) -> bool:
    """A reply is correct if any accepted string occurs in its lowercased text."""
    low = text.lower()
    return any(a.lower() in low for a in accept)


def capability_rate(texts: Sequence[str], questions: Sequence[dict]) -> float:
    """Fraction of ``texts`` that answer their question correctly (0.0 for none)."""
    ok = [capability_correct(t, q["accept"]) for t, q in zip(texts, questions, strict=True)]
    return sum(ok) / max(len(ok), 1)
