"""Choosing a direction on the validation split, then calibrating its condition.

Stage 1 measures the mean difference of every candidate layer with short generations on a
few validation prompts ("proxy"); stage 2 tries refinements around the best layer (the
harmless-mean component removed, Gaussian layer kernels, per-layer directions); the
confirm stage re-measures the top candidates with long generations on the whole split.
Every candidate must keep the first-token KL within a budget (and, for slop, capability
within a tolerance of the unedited model). Generations go through the ``generate``
callable (:mod:`directions.generation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from directions.capability import capability_rate
from directions.detection import apply_detection, calibrate_detection
from directions.extract import (
    Candidate,
    Means,
    build_prompts,
    candidate_set,
    candidate_tensors,
    collect_states,
    default_layers,
    extract_means,
)
from directions.fileformat import DirectionSet
from directions.files import sha256_file
from directions.generation import Generate, GenResult
from directions.measure import Job, Measurements
from directions.refusal import refusal_rate
from directions.slop import corpus_slop_score
from directions.strengths import DirectionRequest
from directions.writers import num_layers


@dataclass
class ExtractData:
    """The prompt sets of one extraction. ``*_systems`` pair prompt k with system k mod len."""

    pos_train: list[str]
    neg_train: list[str]
    pos_val: list[str]
    neg_val: list[str]
    pos_systems: list[str] | None = None
    neg_systems: list[str] | None = None
    kl_prompts: list[str] | None = None  # harmless prompts for first-token KL (default: neg_val)
    capability: list[dict] | None = None
    files: dict[str, str] | None = None  # role -> path, hashed into the metadata


@dataclass
class SelectConfig:
    objective: str = "refusal"  # "refusal": lowest refusal rate; "slop": lowest slop score
    layers: list[int] | None = None  # candidate layers (default: middle 20%..80% of depth)
    variants: tuple[str, ...] = ("orth", "kernel", "perlayer")  # tried around the best single layer
    sigmas: tuple[float, ...] = (2.0, 4.0)
    kl_budget: float = 0.1
    proxy_n: int = 32
    proxy_tokens: int = 24
    confirm_top: int = 2
    confirm_n: int | None = None  # None = the whole validation split
    confirm_tokens: int = 100
    capability_tokens: int = 48
    capability_tolerance: float = 0.02  # slop: accuracy may not fall more than this below the baseline
    detect: bool = True
    detect_fpr: float = 0.02
    batch_size: int = 16


def _objective_value(objective: str, res: list[GenResult]) -> float:
    texts = [r.text for r in res]
    return refusal_rate(texts) if objective == "refusal" else corpus_slop_score(texts)


def _rank(figs: dict[str, dict], cfg: SelectConfig, base_cap: float | None = None) -> list[str]:
    """Candidates within the KL budget (and capability tolerance), best objective first, then lowest KL."""
    ok = [
        k
        for k, f in figs.items()
        if k != "base"
        and f["first_token_kl"] <= cfg.kl_budget
        and (base_cap is None or "capability" not in f or f["capability"] >= base_cap - cfg.capability_tolerance)
    ]
    return sorted(ok, key=lambda k: (figs[k][cfg.objective], figs[k]["first_token_kl"]))


def _fallback(figs: dict[str, dict], cfg: SelectConfig, base_cap: float | None) -> list[str]:
    """Order when nothing passes :func:`_rank`: least capability lost (within the KL budget if any is), else lowest KL."""
    cands = [k for k in figs if k != "base"]
    within = [k for k in cands if figs[k]["first_token_kl"] <= cfg.kl_budget]
    if base_cap is None or not within:
        return sorted(cands, key=lambda k: figs[k]["first_token_kl"])
    return sorted(within, key=lambda k: (base_cap - figs[k].get("capability", 0.0), figs[k][cfg.objective]))


class _Selection:
    """The three measured stages of :func:`select_and_build` (see the module docstring)."""

    def __init__(self, m: Measurements, data: ExtractData, cfg: SelectConfig, means: Means, neg_va: list[list[int]]):
        self.m, self.data, self.cfg, self.means = m, data, cfg, means
        tok = m.tok
        # Selection generates from the positive val prompts as users send them: for slop that is
        # without the slop-inducing system prompt.
        self.gen_all = build_prompts(tok, data.pos_val, data.pos_systems if cfg.objective == "refusal" else None)
        self.kl_all = build_prompts(tok, data.kl_prompts) if data.kl_prompts else neg_va
        self.gen_p, self.kl_p = self.gen_all[: cfg.proxy_n], self.kl_all[: cfg.proxy_n]
        self.cap_p = build_prompts(tok, [q["question"] for q in data.capability]) if data.capability else None

    def _sets(self, cands: list[Candidate]) -> dict[str, DirectionSet]:
        return {c.label: candidate_set(self.means, c, c.label) for c in cands}

    def measure(
        self, cands: list[Candidate], gen_prompts, kl_prompts, n_tokens: int, cap: bool, desc: str, base: bool = True
    ) -> dict[str, dict]:
        """Objective value (and capability) for every candidate, plus the unedited baseline ("base") if ``base``."""
        cfg, m = self.cfg, self.m
        m.set_directions(self._sets(cands))
        labels = ["base"] * base + [c.label for c in cands]
        steer: Callable[[str], dict] = lambda lbl: {} if lbl == "base" else {lbl: DirectionRequest(1.0)}  # noqa: E731
        jobs = [Job((lbl, "obj"), gen_prompts, n_tokens, steer(lbl)) for lbl in labels]
        cap_p = self.cap_p if cap else None
        if cap_p:
            jobs += [Job((lbl, "cap"), cap_p, cfg.capability_tokens, steer(lbl)) for lbl in labels]
        out = m.generate(jobs, desc=f"{desc} generations")
        figs: dict[str, dict] = {}
        for lbl in labels:
            f = {cfg.objective: round(_objective_value(cfg.objective, out[(lbl, "obj")]), 4)}
            if lbl == "base":
                f["first_token_kl"] = 0.0
            else:
                f["first_token_kl"] = round(m.first_token_kl(kl_prompts, {lbl: [1.0] * len(kl_prompts)})[0], 5)
            if cap_p:
                f["capability"] = round(capability_rate([r.text for r in out[(lbl, "cap")]], self.data.capability), 4)
            f["n"], f["tokens"] = len(gen_prompts), n_tokens
            figs[lbl] = f
        return figs

    def variants(self, best: Candidate) -> list[Candidate]:
        extra: list[Candidate] = []
        for v in self.cfg.variants:
            if v == "orth":
                extra.append(Candidate("orth", best.layer))
            elif v == "kernel":
                extra += [Candidate("kernel", best.layer, s) for s in self.cfg.sigmas]
            elif v == "perlayer":
                extra.append(Candidate("perlayer", best.layer))
        return extra

    def run(self, layers: list[int], candidates: list[Candidate] | None, record: dict) -> Candidate:
        cfg = self.cfg
        cands = candidates or [Candidate("single", L) for L in layers]
        stage1 = self.measure(cands, self.gen_p, self.kl_p, cfg.proxy_tokens, False, "stage 1 (layers)")
        ranked = _rank(stage1, cfg) or sorted(
            (k for k in stage1 if k != "base"), key=lambda k: stage1[k]["first_token_kl"]
        )
        record["stage1_proxy"] = stage1
        extra = [] if candidates else self.variants(next(c for c in cands if c.label == ranked[0]))
        stage2 = (
            self.measure(extra, self.gen_p, self.kl_p, cfg.proxy_tokens, False, "stage 2 (variants)", base=False)
            if extra
            else {}
        )
        record["stage2_proxy"] = stage2
        top = (_rank({**stage1, **stage2}, cfg) or ranked)[: cfg.confirm_top]
        by_label = {c.label: c for c in [*cands, *extra]}
        n = cfg.confirm_n or len(self.gen_all)
        confirm = self.measure(
            [by_label[k] for k in top], self.gen_all[:n], self.kl_all, cfg.confirm_tokens, True, "confirm"
        )
        record["confirm"] = confirm
        base_cap = confirm["base"].get("capability") if cfg.objective == "slop" else None
        final = _rank(confirm, cfg, base_cap)
        if not final:
            final = _fallback(confirm, cfg, base_cap)
            record["warning"] = (
                "no confirmed candidate met the KL budget and capability tolerance; took the smallest capability "
                "drop within the KL budget (then best objective)"
                if base_cap is not None
                else "no confirmed candidate met the KL budget; took the lowest KL"
            )
        return by_label[final[0]]


def select_and_build(
    model,
    tokenizer,
    data: ExtractData,
    name: str,
    cfg: SelectConfig,
    candidates: list[Candidate] | None = None,
    generate: Generate | None = None,
) -> DirectionSet:
    """Extract means on train, choose a candidate on validation, calibrate detection; return the set.

    With ``candidates`` given as a single entry, selection is skipped (no generations, so no
    ``generate`` needed: used by tests and ``--layer``); otherwise ``generate`` runs them.
    """
    layers = cfg.layers or default_layers(num_layers(model))
    ids = lambda texts, systems=None: build_prompts(tokenizer, texts, systems)  # noqa: E731
    pos_tr, neg_tr = ids(data.pos_train, data.pos_systems), ids(data.neg_train, data.neg_systems)
    pos_va, neg_va = ids(data.pos_val, data.pos_systems), ids(data.neg_val, data.neg_systems)
    means, tr_pos, tr_neg = extract_means(model, tokenizer, pos_tr, neg_tr, cfg.batch_size, desc="train activations")
    val_pos = collect_states(model, tokenizer, pos_va, cfg.batch_size, desc="val activations (A)")
    val_neg = collect_states(model, tokenizer, neg_va, cfg.batch_size, desc="val activations (B)")
    record: dict = {
        "objective": cfg.objective,
        "kl_budget": cfg.kl_budget,
        "candidate_layers": layers,
        "n_train": [means.n_pos, means.n_neg],
        "n_val": [len(pos_va), len(neg_va)],
        "layer_stats": means.layer_stats(),
    }
    if candidates and len(candidates) == 1:
        chosen = candidates[0]
        record["stages"] = "none (candidate given)"
    else:
        m = Measurements(model, tokenizer, generate, batch_size=cfg.batch_size)
        chosen = _Selection(m, data, cfg, means, neg_va).run(layers, candidates, record)
    record["chosen"] = chosen.label
    dirs, weights = candidate_tensors(means, chosen)
    ds = DirectionSet(name=name, directions=dirs, layer_weights=weights)
    if cfg.detect:
        det = calibrate_detection(
            means.diff[chosen.layer].float(),
            val_pos,
            val_neg,
            layers,
            cfg.detect_fpr,
            prefer=chosen.layer,
            check=(tr_pos, tr_neg),
        )
        apply_detection(ds, det)
        record["detection"] = det.record
    ds.metadata = _metadata(cfg, chosen, data, record)
    return ds


def _metadata(cfg: SelectConfig, chosen: Candidate, data: ExtractData, record: dict) -> dict:
    return {
        "objective": cfg.objective,
        "method": f"mean-diff {chosen.kind}" + (f" sigma={chosen.sigma:g}" if chosen.kind == "kernel" else ""),
        "candidate": chosen.label,
        "chosen_layer": str(chosen.layer),
        "prompt_hashes": {
            role: {"file": Path(p).name, "sha256": sha256_file(p)} for role, p in (data.files or {}).items()
        },
        "selection": record,
        "eval": record.get("confirm", {}).get(chosen.label, {}),
    }
