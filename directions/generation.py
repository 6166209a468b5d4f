"""Generating text for measurements: what to generate, what comes back, and who generates it.

``directions/`` measures what an engine generates but owns no engine: evaluation and
selection take a :class:`Generate` callable. frankly's torch engine provides one
(``server.engine.offline.engine_generate``: continuous batching, the server's hooks and
condition, so what is measured is what the server serves); tests may pass their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from directions.fileformat import DirectionSet
from directions.strengths import DirectionRequest

Steering = dict[str, DirectionRequest]


@dataclass
class Generation:
    """One greedy generation to run: a prompt, a token limit and its steering."""

    prompt_ids: list[int]
    max_tokens: int
    steering: Steering = field(default_factory=dict)


@dataclass
class GenResult:
    """The text and token ids generated, and for ``when="auto"`` directions whether the condition fired."""

    text: str
    token_ids: list[int]
    fired: dict[str, bool | None] = field(default_factory=dict)


class Generate(Protocol):
    def __call__(
        self, directions: dict[str, DirectionSet], generations: Sequence[Generation], desc: str | None = None
    ) -> list[GenResult]:
        """Run ``generations`` greedily with ``directions`` loaded; one result per generation, in order.

        ``desc`` labels a progress bar (None: no bar). Raises RuntimeError if a generation fails."""
        ...
