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
from directions.refusal import PROMPTS_DIR, is_refusal
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
    max_tokens: int | Sequence[int],
    steering: Sequence[Steering] | Steering | None = None,
    desc: str | None = None,
) -> list[GenResult]:
    """Greedy generations through ``engine``; one steering dict and token limit per prompt (or one for all).

    Returns texts, token ids and, for ``when="auto"`` directions, whether the
    engine's condition fired for that row.
    """
    if steering is None or isinstance(steering, dict):
        steering = [dict(steering or {})] * len(prompts)
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
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
    tag = f"{time.monotonic_ns()}"
    while pending or inflight:
        while pending and engine.num_waiting < engine.config.max_queue // 2:
            i = pending.pop(0)
            sp = SamplingParams(max_tokens=limits[i], temperature=0.0)
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
    long: list[str]  # pool of long-answer prompts (see ``n_long``)
    creative: list[str]
    capability: list[dict]
    n_long: int = 8

    @classmethod
    def load(cls, limit: int | None = None, n_long: int = 8, root: Path = PROMPTS_DIR) -> EvalSets:
        cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
        return cls(
            harmful=cut(read_lines(root / "refusal" / "harmful_val.txt")),
            harmless=cut(read_lines(root / "refusal" / "harmless_val.txt")),
            # a pool twice the size: the first n_long whose unedited continuation reaches full length are used
            long=read_lines(root / "refusal" / "harmless_long.txt")[: 2 * min(n_long, limit or n_long)],
            n_long=min(n_long, limit or n_long),
            creative=cut(read_lines(root / "slop" / "creative_val.txt")),
            capability=cut(read_capability(root / "capability" / "questions.jsonl")),
        )

    def counts(self) -> dict[str, int]:
        out = {k: len(getattr(self, k)) for k in ("harmful", "harmless", "creative", "capability")}
        return {**out, "long": min(self.n_long, len(self.long)), "long_pool": len(self.long)}


@dataclass
class Job:
    """A group of generations with one key, token limit and steering (or one steering per prompt)."""

    key: tuple
    prompts: list[list[int]]
    max_tokens: int
    steering: Steering | list[Steering] | None = None


def _key(prompts: Sequence[Sequence[int]]) -> int:
    return hash(tuple(tuple(p) for p in prompts))


class Bench:
    """Measurements on one model for a set of named directions, with the unedited baselines cached.

    Generations run through a fresh server engine per call; forward-pass
    metrics use the same hooks directly.
    """

    def __init__(self, model, tokenizer, directions: dict[str, DirectionSet] | None = None, batch_size: int = 16):
        self.model, self.tok = model, tokenizer
        self.directions = dict(directions or {})
        self.batch_size = batch_size
        self._ids: dict[tuple, list[list[int]]] = {}
        self._base_logits: dict[int, object] = {}
        self._states: dict[int, object] = {}
        self._base_hidden: dict[tuple, object] = {}
        self._fired: dict[tuple, list[bool]] = {}

    # engine ---------------------------------------------------------------
    def _new_engine(self) -> Engine:
        eng = Engine(
            self.model,
            self.tok,
            self.directions,
            EngineConfig(max_batch_size=self.batch_size, max_queue=4 * self.batch_size),
        )
        eng.start()
        return eng

    def set_directions(self, directions: dict[str, DirectionSet]) -> None:
        self.directions = dict(directions)
        self._fired.clear()

    def close(self) -> None:
        """Nothing is held between calls; kept so callers can use try/finally uniformly."""

    # prompts ----------------------------------------------------------------
    def ids(self, texts: Sequence[str], system: str | None = None) -> list[list[int]]:
        k = (tuple(texts), system)
        if k not in self._ids:
            self._ids[k] = [user_prompt_ids(self.tok, t, system=system) for t in texts]
        return self._ids[k]

    # generation --------------------------------------------------------------
    def generate(self, jobs: Sequence[Job], desc: str = "generate") -> dict[tuple, list[GenResult]]:
        """Run every job in one engine submission (keeps the batch full); results by job key."""
        prompts, limits, steer, spans = [], [], [], []
        for j in jobs:
            st = j.steering if isinstance(j.steering, list) else [dict(j.steering or {})] * len(j.prompts)
            spans.append((j.key, len(prompts), len(j.prompts)))
            prompts += j.prompts
            limits += [j.max_tokens] * len(j.prompts)
            steer += st
        if not prompts:
            return {j.key: [] for j in jobs}
        t0 = time.monotonic()
        # A fresh engine per call, shut down before returning: the engine leaves its hooks
        # installed while idle, and the forward-pass metrics run on the same model.
        engine = self._new_engine()
        try:
            res = run_generations(engine, prompts, limits, steer, desc=desc)
        finally:
            engine.shutdown()
        n_tok = sum(len(r.token_ids) for r in res)
        log.info("%s: %d generations, %d tokens in %.0f s", desc, len(res), n_tok, time.monotonic() - t0)
        return {k: res[a : a + n] for k, a, n in spans}

    def fired(self, name: str, prompts: list[list[int]]) -> list[bool]:
        """Whether the engine's condition for ``name`` fires on each prompt (prefill only, cached)."""
        k = (name, _key(prompts))
        if k not in self._fired:
            res = self.generate(
                [Job(("fire",), prompts, 1, {name: DirectionRequest(1.0, when="auto")})], desc=f"condition {name}"
            )[("fire",)]
            self._fired[k] = [bool(r.fired.get(name)) for r in res]
        return self._fired[k]

    # forward-pass metrics ------------------------------------------------------
    def states(self, prompts: list[list[int]], desc: str | None = None):
        k = _key(prompts)
        if k not in self._states:
            self._states[k] = metrics.forward_last(
                self.model, self.tok, prompts, states=True, batch_size=self.batch_size, desc=desc
            )[1]
        return self._states[k]

    def base_logits(self, prompts: list[list[int]]):
        k = _key(prompts)
        if k not in self._base_logits:
            self._base_logits[k] = metrics.forward_last(
                self.model, self.tok, prompts, batch_size=self.batch_size, desc="first-token logits (unedited)"
            )[0]
        return self._base_logits[k]

    def first_token_kl(
        self, prompts: list[list[int]], strengths: dict[str, Sequence[float]]
    ) -> tuple[float, list[float]]:
        """First-token KL(P_orig || P_edited), batch mean and per prompt; per-row strengths per direction."""
        base = self.base_logits(prompts)
        if not any(x != 0 for s in strengths.values() for x in s):
            return 0.0, [0.0] * len(prompts)
        dirs = {n: self.directions[n] for n in strengths}
        edited, _ = metrics.forward_last(
            self.model,
            self.tok,
            prompts,
            dirs,
            strengths,
            batch_size=self.batch_size,
            desc="first-token logits (edited)",
        )
        return metrics.first_token_kl(base, edited)

    def long_kl(self, prompts: list[list[int]], conts: list[list[int]], name: str, strengths: Sequence[float]) -> dict:
        """KL averaged over every position of teacher-forced continuations (pooled over prompts)."""
        allk, per = [], []
        for p, c, s in tqdm(list(zip(prompts, conts, strengths, strict=True)), desc=f"long KL {name}", leave=False):
            k = (tuple(p), tuple(c))
            if s == 0:
                kls = [0.0] * len(c)
            else:
                kls, h = metrics.continuation_kl(
                    self.model, p, c, {name: self.directions[name]}, {name: s}, base_hidden=self._base_hidden.get(k)
                )
                self._base_hidden[k] = h
            allk += kls
            per.append(sum(kls) / max(len(kls), 1))
        return {"mean": sum(allk) / max(len(allk), 1), "positions": len(allk), "per_prompt": per}


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


def evaluate(bench: Bench, sets: EvalSets, names: Sequence[str], cfg: EvalConfig) -> dict:
    """Measure every direction in ``names`` at every strength (and, with ``cfg.conditional``,
    with ``when="auto"``). Returns a JSON-ready dict with one row per (direction, when, strength)."""
    t0 = time.monotonic()
    P = {
        "harmful": bench.ids(sets.harmful),
        "harmless": bench.ids(sets.harmless),
        "long": bench.ids(sets.long),
        "creative": bench.ids(sets.creative),
        "capability": bench.ids([q["question"] for q in sets.capability]),
    }
    gen_sets = {
        "refusal": ("harmful", cfg.max_tokens),
        "slop": ("creative", cfg.max_tokens),
        "capability": ("capability", cfg.capability_tokens),
    }
    wanted = {n: _metrics_for(bench.directions[n], cfg) for n in names}
    modes = ["always"] + (["auto"] if cfg.conditional else [])
    auto_names = [n for n in names if bench.directions[n].has_condition]
    if cfg.conditional and len(auto_names) < len(names):
        log.warning("no detection vector in %s: conditional rows skipped", sorted(set(names) - set(auto_names)))

    # 1. where each condition fires (prefill only, through the engine)
    fired = {n: {k: bench.fired(n, P[k]) for k in P} for n in (auto_names if cfg.conditional else [])}

    # 2. every generation in one engine submission; strength 0 (the unedited model) once
    all_gen = sorted({m for w in wanted.values() for m in w if m in gen_sets})
    jobs = [Job(("base", m), P[gen_sets[m][0]], gen_sets[m][1]) for m in all_gen]
    jobs.append(Job(("base", "long"), P["long"], cfg.long_tokens))
    for n in names:
        for s in (x for x in cfg.strengths if x != 0):
            for m in (m for m in wanted[n] if m in gen_sets):
                jobs.append(Job((n, "always", s, m), P[gen_sets[m][0]], gen_sets[m][1], {n: DirectionRequest(s)}))
                if n in fired:  # rows whose condition does not fire run the unedited model: reuse the baseline
                    idx = [i for i, f in enumerate(fired[n][gen_sets[m][0]]) if f]
                    jobs.append(
                        Job(
                            (n, "auto", s, m, tuple(idx)),
                            [P[gen_sets[m][0]][i] for i in idx],
                            gen_sets[m][1],
                            {n: DirectionRequest(s, when="auto")},
                        )
                    )
    out = bench.generate(jobs, desc="eval generations")
    # Long KL wants long continuations: keep the first n_long that reached long_tokens (then the longest others).
    long_res = out[("base", "long")]
    full = [i for i, r in enumerate(long_res) if len(r.token_ids) >= cfg.long_tokens]
    rest = sorted((i for i in range(len(long_res)) if i not in full), key=lambda i: -len(long_res[i].token_ids))
    keep = sorted((full + rest)[: sets.n_long])
    P["long"] = [P["long"][i] for i in keep]
    conts = [long_res[i].token_ids for i in keep]
    for n in fired:
        fired[n]["long"] = [fired[n]["long"][i] for i in keep]

    def texts(n, mode, s, m) -> tuple[list[GenResult], int]:
        base = out[("base", m)]
        if s == 0:
            return base, 0
        if mode == "always":
            return out[(n, "always", s, m)], 0
        key = next(k for k in out if k[:4] == (n, "auto", s, m))
        res, mismatch = list(base), 0
        for i, r in zip(key[4], out[key], strict=True):
            res[i] = r
            mismatch += not r.fired.get(n)
        return res, mismatch

    def rowsel(k: str, n: str, mode: str, s: float) -> list[float]:
        """Per-prompt strengths of set ``k``: auto rows get ``s`` only where the condition fired."""
        return [s if f else 0.0 for f in fired[n][k]] if mode == "auto" else [s] * len(P[k])

    rows = []
    for n in names:
        for mode in modes:
            if mode == "auto" and n not in fired:
                continue
            for s in cfg.strengths:
                row: dict = {"direction": n, "when": mode, "strength": s}
                mismatch = 0
                if "refusal" in wanted[n]:
                    res, mm = texts(n, mode, s, "refusal")
                    mismatch += mm
                    flags = [is_refusal(r.text) for r in res]
                    row["refusal_rate"] = sum(flags) / max(len(flags), 1)
                    row["refusals"], row["n_harmful"] = sum(flags), len(flags)
                    row["harmful_tokens_mean"] = sum(len(r.token_ids) for r in res) / max(len(res), 1)
                if "slop" in wanted[n]:
                    res, mm = texts(n, mode, s, "slop")
                    mismatch += mm
                    row["slop_score"] = corpus_slop_score([r.text for r in res])
                    row["creative_words"] = sum(len(r.text.split()) for r in res)
                if "capability" in wanted[n]:
                    res, mm = texts(n, mode, s, "capability")
                    mismatch += mm
                    ok = [capability_correct(r.text, q["accept"]) for r, q in zip(res, sets.capability, strict=True)]
                    row["capability"] = sum(ok) / max(len(ok), 1)
                if "first_token_kl" in wanted[n]:
                    row["first_token_kl"] = bench.first_token_kl(P["harmless"], {n: rowsel("harmless", n, mode, s)})[0]
                if "long_kl" in wanted[n]:
                    lk = bench.long_kl(P["long"], conts, n, rowsel("long", n, mode, s))
                    row["long_kl"], row["long_kl_positions"] = lk["mean"], lk["positions"]
                if mode == "auto":
                    row["fired"] = {k: sum(v) / max(len(v), 1) for k, v in fired[n].items()}
                    # rows the engine did not fire on in the generation pass although the prefill-only pass did
                    row["condition_mismatches"] = mismatch
                rows.append(row)
                log.info("%s", row)
    return {
        "sets": sets.counts(),
        "config": {
            "strengths": cfg.strengths,
            "conditional": cfg.conditional,
            "max_tokens": cfg.max_tokens,
            "long_tokens": cfg.long_tokens,
            "capability_tokens": cfg.capability_tokens,
            "long_continuation_tokens": [len(c) for c in conts],
            "long_prompts": [sets.long[i] for i in keep],
            "greedy": True,
        },
        "directions": {
            n: {k: bench.directions[n].metadata.get(k) for k in ("objective", "method", "chosen_layer")} for n in names
        },
        "rows": rows,
        "wall_s": round(time.monotonic() - t0, 1),
    }
