"""Evaluation over strengths: refusal rate, first-token KL, long-continuation KL,
slop score, capability, and (conditional mode) how often the condition fires.

Generations go through the :class:`~directions.generation.Generate` callable of the
:class:`~directions.measure.Measurements` (the server's engine in ``frankly eval``); KLs
go through :mod:`directions.kl` with the same hooks. Everything is greedy. Strength 0 is
the unedited model and is computed once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from directions.capability import capability_rate, read_capability
from directions.fileformat import DirectionSet
from directions.files import read_lines
from directions.generation import GenResult
from directions.measure import Job, Measurements
from directions.refusal import PROMPTS_DIR, is_non_answer, is_refusal
from directions.slop import corpus_slop_score
from directions.splits import eval_prompt_files
from directions.strengths import DirectionRequest
from directions.weights_eval import models_first_token_kl, models_long_kl

log = logging.getLogger("frankly.eval")


@dataclass
class EvalSets:
    """The prompt sets ``frankly eval`` measures on: the validation split by default, the
    test split (final reported figures only) with ``split="test"``; see :mod:`directions.splits`."""

    harmful: list[str]
    harmless: list[str]
    long: list[str]  # pool of long-answer prompts (see ``n_long``)
    creative: list[str]
    capability: list[dict]
    n_long: int = 8
    split: str = "val"

    @classmethod
    def load(cls, limit: int | None = None, n_long: int = 8, root: Path = PROMPTS_DIR, split: str = "val") -> EvalSets:
        files = eval_prompt_files(split, root)
        cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        return cls(
            harmful=cut(read_lines(files["harmful"])),
            harmless=cut(read_lines(files["harmless"])),
            # a pool twice the size: the first n_long whose unedited continuation reaches full length are used
            long=read_lines(files["long"])[: 2 * min(n_long, limit or n_long)],
            n_long=min(n_long, limit or n_long),
            creative=cut(read_lines(files["creative"])),
            capability=cut(read_capability(files["capability"])),
            split=split,
        )

    def counts(self) -> dict[str, int]:
        out = {k: len(getattr(self, k)) for k in ("harmful", "harmless", "creative", "capability")}
        return {**out, "long": min(self.n_long, len(self.long)), "long_pool": len(self.long)}


METRICS = ("refusal", "first_token_kl", "long_kl", "slop", "capability")
OBJECTIVE_METRICS = {
    "refusal": ("refusal", "first_token_kl", "long_kl", "capability"),
    "slop": ("slop", "first_token_kl", "long_kl", "capability"),
}


@dataclass
class EvalConfig:
    strengths: list[float]
    conditional: bool = False
    max_tokens: int = 100
    long_tokens: int = 256
    capability_tokens: int = 48
    all_metrics: bool = False


def _metrics_for(ds: DirectionSet, cfg: EvalConfig) -> tuple[str, ...]:
    if cfg.all_metrics:
        return METRICS
    return OBJECTIVE_METRICS.get(ds.metadata.get("objective", ""), METRICS)


def evaluate(
    m: Measurements,
    sets: EvalSets,
    names: Sequence[str],
    cfg: EvalConfig,
    edited: dict[str, Measurements] | None = None,
) -> dict:
    """Measure every direction in ``names`` at every strength (and, with ``cfg.conditional``,
    with ``when="auto"``). Returns a JSON-ready dict with one row per (direction, when, strength).

    ``edited``: other models' weights (same vocabulary), each measured on the same prompts with
    its KLs against ``m``'s model, as one row ``when="weights"`` (strength 1: the edit as stored)."""
    return _Evaluation(m, sets, list(names), cfg, edited or {}).run()


class _Evaluation:
    """One ``evaluate`` call: the prompt ids, which conditions fire, every generation, then the rows."""

    def __init__(
        self, m: Measurements, sets: EvalSets, names: list[str], cfg: EvalConfig, edited: dict[str, Measurements]
    ):
        self.m, self.sets, self.names, self.cfg, self.edited = m, sets, names, cfg, edited
        self.P = {
            "harmful": m.ids(sets.harmful),
            "harmless": m.ids(sets.harmless),
            "long": m.ids(sets.long),
            "creative": m.ids(sets.creative),
            "capability": m.ids([q["question"] for q in sets.capability]),
        }
        # generation metric -> (prompt set, token limit)
        self.gen_sets = {
            "refusal": ("harmful", cfg.max_tokens),
            "slop": ("creative", cfg.max_tokens),
            "capability": ("capability", cfg.capability_tokens),
        }
        self.wanted = {n: _metrics_for(m.directions[n], cfg) for n in names}
        # an edited model gets every metric any direction gets (without directions: the refusal objective's)
        union = tuple(k for k in METRICS if any(k in w for w in self.wanted.values()))
        union = union or (METRICS if cfg.all_metrics else OBJECTIVE_METRICS["refusal"])
        self.wanted.update({e: union for e in edited})
        self.fired: dict[str, dict[str, list[bool]]] = {}
        self.out: dict[tuple, list[GenResult]] = {}
        self.conts: list[list[int]] = []
        self.keep: list[int] = []

    def run(self) -> dict:
        t0 = time.monotonic()
        auto_names = [n for n in self.names if self.m.directions[n].has_condition]
        if self.cfg.conditional and len(auto_names) < len(self.names):
            log.warning(
                "no detection vector in %s: conditional rows skipped", sorted(set(self.names) - set(auto_names))
            )
        # 1. where each condition fires (prefill only, through the engine)
        if self.cfg.conditional:
            self.fired = {n: {k: self.m.fired(n, p) for k, p in self.P.items()} for n in auto_names}
        # 2. every generation in one engine submission; strength 0 (the unedited model) once
        self.out = self.m.generate(self._jobs(), desc="eval generations")
        for e, em in self.edited.items():
            gens = [(k, s, lim) for k, (s, lim) in self.gen_sets.items() if k in self.wanted[e]]
            jobs = [Job((e, "weights", 1.0, k), self.P[s], lim) for k, s, lim in gens]
            self.out.update(em.generate(jobs, desc=f"eval generations ({e})"))
        self._pick_long()
        modes = ["always"] + (["auto"] if self.cfg.conditional else [])
        rows = []
        for n in self.names:
            for mode in modes:
                if mode == "auto" and n not in self.fired:
                    continue
                for s in self.cfg.strengths:
                    rows.append(self._row(n, mode, s))
                    log.info("%s", rows[-1])
        rows += [self._row(e, "weights", 1.0) for e in self.edited]
        return self._result(rows, time.monotonic() - t0)

    def _jobs(self) -> list[Job]:
        P, gs = self.P, self.gen_sets
        all_gen = sorted({k for w in self.wanted.values() for k in w if k in gs})
        jobs = [Job(("base", k), P[gs[k][0]], gs[k][1]) for k in all_gen]
        jobs.append(Job(("base", "long"), P["long"], self.cfg.long_tokens))
        for n in self.names:
            for s in (x for x in self.cfg.strengths if x != 0):
                for k in (k for k in self.wanted[n] if k in gs):
                    name, limit = gs[k]
                    jobs.append(Job((n, "always", s, k), P[name], limit, {n: DirectionRequest(s)}))
                    if n in self.fired:  # rows whose condition does not fire run the unedited model: reuse the baseline
                        idx = [i for i, f in enumerate(self.fired[n][name]) if f]
                        steer = {n: DirectionRequest(s, when="auto")}
                        jobs.append(Job((n, "auto", s, k, tuple(idx)), [P[name][i] for i in idx], limit, steer))
        return jobs

    def _pick_long(self) -> None:
        """Long KL wants long continuations: keep the first n_long that reached long_tokens (then the longest others)."""
        res = self.out[("base", "long")]
        full = [i for i, r in enumerate(res) if len(r.token_ids) >= self.cfg.long_tokens]
        rest = sorted((i for i in range(len(res)) if i not in full), key=lambda i: -len(res[i].token_ids))
        self.keep = sorted((full + rest)[: self.sets.n_long])
        self.P["long"] = [self.P["long"][i] for i in self.keep]
        self.conts = [res[i].token_ids for i in self.keep]
        for n in self.fired:
            self.fired[n]["long"] = [self.fired[n]["long"][i] for i in self.keep]

    def _texts(self, n: str, mode: str, s: float, metric: str) -> tuple[list[GenResult], int]:
        """The generations of one row, and how many auto rows did not fire in the generation pass."""
        base = self.out[("base", metric)]
        if s == 0:
            return base, 0
        if mode in ("always", "weights"):
            return self.out[(n, mode, s, metric)], 0
        key = next(k for k in self.out if k[:4] == (n, "auto", s, metric))
        res, mismatch = list(base), 0
        for i, r in zip(key[4], self.out[key], strict=True):
            res[i] = r
            mismatch += not r.fired.get(n)
        return res, mismatch

    def _strengths(self, k: str, n: str, mode: str, s: float) -> list[float]:
        """Per-prompt strengths of set ``k``: auto rows get ``s`` only where the condition fired."""
        return [s if f else 0.0 for f in self.fired[n][k]] if mode == "auto" else [s] * len(self.P[k])

    def _row(self, n: str, mode: str, s: float) -> dict:
        row: dict = {"direction": n, "when": mode, "strength": s}
        wanted, mismatch = self.wanted[n], 0
        # a firing auto row runs the file's firing-case edit where it has one (as the engines do)
        fire_edit = self.m.directions[n].auto_edit if mode == "auto" and n in self.m.directions else None
        if "refusal" in wanted:
            res, mm = self._texts(n, mode, s, "refusal")
            mismatch += mm
            flags = [is_refusal(r.text) for r in res]
            row["refusal_rate"] = sum(flags) / max(len(flags), 1)
            row["refusals"], row["n_harmful"] = sum(flags), len(flags)
            # replies that deflect ("I'm glad I could help!") instead of answering: not refusals, not answers
            row["non_answers"] = sum(is_non_answer(r.text) for r in res)
            row["harmful_tokens_mean"] = sum(len(r.token_ids) for r in res) / max(len(res), 1)
        if "slop" in wanted:
            res, mm = self._texts(n, mode, s, "slop")
            mismatch += mm
            row["slop_score"] = corpus_slop_score([r.text for r in res])
            row["creative_words"] = sum(len(r.text.split()) for r in res)
        if "capability" in wanted:
            res, mm = self._texts(n, mode, s, "capability")
            mismatch += mm
            row["capability"] = capability_rate([r.text for r in res], self.sets.capability)
        if "first_token_kl" in wanted:
            row["first_token_kl"] = (
                models_first_token_kl(self.m, self.edited[n], self.P["harmless"])
                if mode == "weights"
                else self.m.first_token_kl(
                    self.P["harmless"],
                    {n: self._strengths("harmless", n, mode, s)},
                    {n: fire_edit} if fire_edit else None,
                )[0]
            )
        if "long_kl" in wanted:
            lk = (
                models_long_kl(self.m.model, self.edited[n].model, self.P["long"], self.conts)
                if mode == "weights"
                else self.m.long_kl(self.P["long"], self.conts, n, self._strengths("long", n, mode, s), fire_edit)
            )
            row["long_kl"], row["long_kl_positions"] = lk["mean"], lk["positions"]
        if mode == "auto":
            row["fired"] = {k: sum(v) / max(len(v), 1) for k, v in self.fired[n].items()}
            # rows the engine did not fire on in the generation pass although the prefill-only pass did
            row["condition_mismatches"] = mismatch
        return row

    def _result(self, rows: list[dict], wall_s: float) -> dict:
        cfg = self.cfg
        return {
            "split": self.sets.split,
            "sets": self.sets.counts(),
            "config": {
                "strengths": cfg.strengths,
                "conditional": cfg.conditional,
                "max_tokens": cfg.max_tokens,
                "long_tokens": cfg.long_tokens,
                "capability_tokens": cfg.capability_tokens,
                "long_continuation_tokens": [len(c) for c in self.conts],
                "long_prompts": [self.sets.long[i] for i in self.keep],
                "greedy": True,
            },
            "directions": {
                n: {k: self.m.directions[n].metadata.get(k) for k in ("objective", "method", "chosen_layer")}
                for n in self.names
            },
            "rows": rows,
            "wall_s": round(wall_s, 1),
        }
