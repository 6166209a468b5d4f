"""Measurements on one model for a set of named directions, with the unedited baselines cached.

Generations go through the :class:`~directions.generation.Generate` callable it is given
(the server's engine in ``frankly eval`` and ``frankly extract``); forward-pass figures
(first-token KL, long-continuation KL) use the hooks directly on the same model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from directions import kl
from directions.fileformat import DirectionSet
from directions.forward import forward_last
from directions.generation import Generate, Generation, GenResult, Steering
from directions.prompting import user_prompt_ids
from directions.strengths import DirectionRequest

log = logging.getLogger("frankly.eval")


@dataclass
class Job:
    """A group of generations with one key, token limit and steering (or one steering per prompt)."""

    key: tuple
    prompts: list[list[int]]
    max_tokens: int
    steering: Steering | list[Steering] | None = None

    def generations(self) -> list[Generation]:
        steer = self.steering if isinstance(self.steering, list) else [dict(self.steering or {})] * len(self.prompts)
        return [Generation(list(p), self.max_tokens, dict(s)) for p, s in zip(self.prompts, steer, strict=True)]


def _key(prompts: Sequence[Sequence[int]]) -> int:
    return hash(tuple(tuple(p) for p in prompts))


class Measurements:
    """Generations and forward-pass figures for ``directions`` on ``model``, caching what does not
    change between calls (prompt ids, unedited logits and hidden states, condition firing)."""

    def __init__(
        self,
        model,
        tokenizer,
        generate: Generate | None = None,
        directions: dict[str, DirectionSet] | None = None,
        batch_size: int = 16,
    ):
        self.model, self.tok = model, tokenizer
        self._generate = generate
        self.directions = dict(directions or {})
        self.batch_size = batch_size
        self._ids: dict[tuple, list[list[int]]] = {}
        self._base_logits: dict[int, torch.Tensor] = {}
        self._base_hidden: dict[tuple, torch.Tensor] = {}
        self._fired: dict[tuple, list[bool]] = {}

    def set_directions(self, directions: dict[str, DirectionSet]) -> None:
        self.directions = dict(directions)
        self._fired.clear()

    # prompts ----------------------------------------------------------------
    def ids(self, texts: Sequence[str], system: str | None = None) -> list[list[int]]:
        """Prompt ids of ``texts`` through the server's chat template (cached)."""
        k = (tuple(texts), system)
        if k not in self._ids:
            self._ids[k] = [user_prompt_ids(self.tok, t, system=system) for t in texts]
        return self._ids[k]

    # generation --------------------------------------------------------------
    def generate(self, jobs: Sequence[Job], desc: str = "generate") -> dict[tuple, list[GenResult]]:
        """Run every job in one submission (keeps the batch full); results by job key."""
        if self._generate is None:
            raise RuntimeError("these measurements need generations: pass a generate callable")
        gens, spans = [], []
        for j in jobs:
            spans.append((j.key, len(gens), len(j.prompts)))
            gens += j.generations()
        if not gens:
            return {j.key: [] for j in jobs}
        t0 = time.monotonic()
        res = self._generate(self.directions, gens, desc)
        n_tok = sum(len(r.token_ids) for r in res)
        log.info("%s: %d generations, %d tokens in %.0f s", desc, len(res), n_tok, time.monotonic() - t0)
        return {k: res[a : a + n] for k, a, n in spans}

    def fired(self, name: str, prompts: list[list[int]]) -> list[bool]:
        """Whether the engine's condition for ``name`` fires on each prompt (cached): a prefill for a
        probe, the first K reply tokens for a lookahead condition."""
        k = (name, _key(prompts))
        if k not in self._fired:
            look = self.directions[name].lookahead
            job = Job(("fire",), prompts, look[0] if look else 1, {name: DirectionRequest(1.0, when="auto")})
            res = self.generate([job], desc=f"condition {name}")[("fire",)]
            self._fired[k] = [bool(r.fired.get(name)) for r in res]
        return self._fired[k]

    # forward-pass figures ------------------------------------------------------
    def base_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Unedited logits at the last prompt token (N, vocab) (cached)."""
        k = _key(prompts)
        if k not in self._base_logits:
            self._base_logits[k] = forward_last(
                self.model, self.tok, prompts, batch_size=self.batch_size, desc="first-token logits (unedited)"
            )[0]
        return self._base_logits[k]

    def first_token_kl(
        self,
        prompts: list[list[int]],
        strengths: dict[str, Sequence[float]],
        edits: dict[str, DirectionSet] | None = None,
    ) -> tuple[float, list[float]]:
        """First-token KL(P_orig || P_edited), batch mean and per prompt; per-row strengths per direction
        (``edits``: another edit under a direction's name, e.g. its firing-case edit)."""
        base = self.base_logits(prompts)
        if not any(x != 0 for s in strengths.values() for x in s):
            return 0.0, [0.0] * len(prompts)
        dirs = {n: (edits or {}).get(n) or self.directions[n] for n in strengths}
        edited, _ = forward_last(
            self.model,
            self.tok,
            prompts,
            dirs,
            strengths,
            batch_size=self.batch_size,
            desc="first-token logits (edited)",
        )
        return kl.first_token_kl(base, edited)

    def long_kl(
        self,
        prompts: list[list[int]],
        conts: list[list[int]],
        name: str,
        strengths: Sequence[float],
        edit: DirectionSet | None = None,
    ) -> dict:
        """KL averaged over every position of teacher-forced continuations (pooled over prompts);
        ``edit`` replaces the direction's own edit (e.g. its firing-case edit)."""
        edit = edit or self.directions[name]
        allk, per = [], []
        for p, c, s in tqdm(list(zip(prompts, conts, strengths, strict=True)), desc=f"long KL {name}", leave=False):
            k = (tuple(p), tuple(c))
            if s == 0:
                kls = [0.0] * len(c)
            else:
                kls, h = kl.continuation_kl(
                    self.model, p, c, {name: edit}, {name: s}, base_hidden=self._base_hidden.get(k)
                )
                self._base_hidden[k] = h
            allk += kls
            per.append(sum(kls) / max(len(kls), 1))
        return {"mean": sum(allk) / max(len(allk), 1), "positions": len(allk), "per_prompt": per}
