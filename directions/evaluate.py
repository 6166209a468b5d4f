"""Evaluation over strengths: refusal rate, first-token KL, long-continuation KL,
slop score, capability, and (conditional mode) how often the condition fires.

Generations go through the server's own engine (continuous batching, the
server's hooks); KLs go through :mod:`directions.metrics` with the same hooks.
Everything is greedy. Strength 0 is the unedited model and is computed once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from directions import metrics
from directions.fileformat import DirectionSet
from directions.refusal import PROMPTS_DIR, refusal_rate
from directions.slop import corpus_slop_score
from server.engine import DirectionRequest, Engine, EngineConfig, GenerationRequest, SamplingParams
from server.prompting import user_prompt_ids

log = logging.getLogger("frankly.eval")

Steering = dict[str, DirectionRequest]


def read_lines(path: str | Path) -> list[str]:
    return [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def read_capability(path: str | Path) -> list[dict]:
    return [json.loads(x) for x in read_lines(path)]


def capability_correct(text: str, accept: Sequence[str]) -> bool:
    """A reply is correct if any accepted string occurs in its lowercased text."""
    low = text.lower()
    return any(a.lower() in low for a in accept)


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    fired: dict[str, bool | None] = field(default_factory=dict)


def run_generations(
    engine: Engine,
    prompts: Sequence[list[int]],
    max_tokens: int,
    steering: Sequence[Steering] | Steering | None = None,
    desc: str | None = None,
) -> list[GenResult]:
    """Greedy generations through ``engine``; one steering dict per prompt (or one for all).

    Returns texts, token ids and, for ``when="auto"`` directions, whether the
    engine's condition fired for that row.
    """
    if steering is None or isinstance(steering, dict):
        steering = [dict(steering or {})] * len(prompts)
    results: list[GenResult | None] = [None] * len(prompts)
    parts: list[list] = [[[], [], {}] for _ in prompts]
    done = threading.Semaphore(0)
    errors: list[str] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, leave=False)

    def make_emit(i: int):
        def emit(out):
            p = parts[i]
            p[0].append(out.text)
            p[1].extend(out.token_ids)
            if out.steering:
                p[2].update({n: r.fired for n, r in out.steering.items()})
            if out.finished:
                if out.error:
                    errors.append(out.error)
                results[i] = GenResult("".join(p[0]), list(p[1]), dict(p[2]))
                bar.update(1)
                done.release()

        return emit

    pending = list(range(len(prompts)))
    inflight = 0
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    tag = f"{time.monotonic_ns()}"
    while pending or inflight:
        while pending and engine.num_waiting < engine.config.max_queue // 2:
            i = pending.pop(0)
            req = GenerationRequest(f"{tag}-{i}", list(prompts[i]), sp, steering=dict(steering[i]))
            engine.submit(req, make_emit(i))
            inflight += 1
        done.acquire()
        inflight -= 1
    bar.close()
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return results  # type: ignore[return-value]


@dataclass
class EvalSets:
    """The prompt sets ``frankly eval`` measures on (validation splits only)."""

    harmful: list[str]
    harmless: list[str]
    long: list[str]
    creative: list[str]
    capability: list[dict]

    @classmethod
    def load(cls, limit: int | None = None, n_long: int = 8, root: Path = PROMPTS_DIR) -> EvalSets:
        cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        return cls(
            harmful=cut(read_lines(root / "refusal" / "harmful_val.txt")),
            harmless=cut(read_lines(root / "refusal" / "harmless_val.txt")),
            long=read_lines(root / "refusal" / "harmless_long.txt")[: min(n_long, limit or n_long)],
            creative=cut(read_lines(root / "slop" / "creative_val.txt")),
            capability=cut(read_capability(root / "capability" / "questions.jsonl")),
        )

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("harmful", "harmless", "long", "creative", "capability")}
