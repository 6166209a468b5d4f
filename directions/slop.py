"""Slop score: slop-phrase matches per 1,000 words.

Phrases (prompts/slop/phrases.txt) are matched case-insensitively on word
boundaries, longest phrase first and without overlaps, so "rich tapestry"
counts once, not also as "tapestry". Curly apostrophes are normalised.
Words are whitespace-separated tokens.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from directions.files import read_lines
from directions.refusal import PROMPTS_DIR

DEFAULT_PHRASES = PROMPTS_DIR / "slop" / "phrases.txt"
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'"})


@lru_cache(maxsize=8)
def _compile(phrases: tuple[str, ...]) -> re.Pattern:
    uniq = sorted({" ".join(p.translate(_QUOTES).lower().split()) for p in phrases if p.strip()}, key=len, reverse=True)
    if not uniq:
        return re.compile(r"(?!x)x")  # matches nothing
    # (?<!\w)/(?!\w) instead of \b so phrases that start or end with punctuation still work;
    # inner spaces match any run of whitespace.
    alts = "|".join(r"\s+".join(re.escape(w) for w in p.split(" ")) for p in uniq)
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[str, ...]:
    return tuple(read_lines(path))


def load_phrases(path: str | Path | None = None) -> tuple[str, ...]:
    """Slop phrases (default: prompts/slop/phrases.txt)."""
    return _load(str(path or DEFAULT_PHRASES))


def count_matches(text: str, phrases: tuple[str, ...] | None = None) -> int:
    """Non-overlapping phrase matches in ``text``."""
    pat = _compile(tuple(phrases) if phrases is not None else load_phrases())
    return len(pat.findall(text.translate(_QUOTES)))


def count_words(text: str) -> int:
    return len(text.split())


def slop_score(text: str, phrases: tuple[str, ...] | None = None) -> float:
    """Matches per 1,000 words of one text (0.0 for an empty text)."""
    n = count_words(text)
    return 1000.0 * count_matches(text, phrases) / n if n else 0.0


def corpus_slop_score(texts: list[str], phrases: tuple[str, ...] | None = None) -> float:
    """Matches per 1,000 words pooled over ``texts`` (long texts weigh more than short ones)."""
    words = sum(count_words(t) for t in texts)
    hits = sum(count_matches(t, phrases) for t in texts)
    return 1000.0 * hits / words if words else 0.0
