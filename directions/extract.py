"""Direction extraction: mean activation differences, candidate directions, detection calibration.

Activations are the residual stream entering each decoder layer
(``hidden_states[i]``, i = 0..n_layers-1, the file format's CONVENTION) at
the last prompt token after the server's chat template, in fp32, with
means accumulated in float64. The direction of layer ``i`` is
``r_i = mean_A[i] - mean_B[i]`` (A = harmful / slop-inducing, B = harmless
/ plain). Candidates are chosen on the validation split by measurements
from :mod:`directions.evaluate` (see :func:`select_and_build`).

Every function takes (model, tokenizer) objects, so tests can run them on
tiny random models without the CLI.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from directions import metrics
from directions.edit import normalize
from directions.fileformat import DirectionSet
from directions.writers import num_layers
from server.prompting import user_prompt_ids


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_prompts(tokenizer, instructions: Sequence[str], systems: Sequence[str] | None = None) -> list[list[int]]:
    """Prompt ids via the server's chat template; instruction k gets system prompt k mod len(systems)."""
    out = []
    for k, text in enumerate(instructions):
        system = systems[k % len(systems)] if systems else None
        out.append(user_prompt_ids(tokenizer, text, system=system))
    return out


def collect_states(
    model, tokenizer, prompts: Sequence[Sequence[int]], batch_size: int = 8, desc: str | None = None
) -> torch.Tensor:
    """Last-prompt-token residual stream entering every decoder layer: (N, n_layers, d) float32."""
    _, states = metrics.forward_last(model, tokenizer, prompts, states=True, batch_size=batch_size, desc=desc)
    assert states is not None
    return states


@dataclass
class Means:
    """Per-layer means of the two prompt sets, float64, (n_layers, d)."""

    pos: torch.Tensor
    neg: torch.Tensor
    n_pos: int
    n_neg: int

    @classmethod
    def from_states(cls, pos_states: torch.Tensor, neg_states: torch.Tensor) -> Means:
        return cls(
            pos_states.to(torch.float64).mean(0),
            neg_states.to(torch.float64).mean(0),
            int(pos_states.shape[0]),
            int(neg_states.shape[0]),
        )

    @property
    def diff(self) -> torch.Tensor:
        """r_i = mean_A[i] - mean_B[i], float64 (n_layers, d)."""
        return self.pos - self.neg

    @property
    def n_layers(self) -> int:
        return int(self.pos.shape[0])

    def layer_stats(self) -> list[dict]:
        """Norm of each r_i and its cosine with the harmless mean (for the record)."""
        out = []
        for i in range(self.n_layers):
            r, mu = self.diff[i], self.neg[i]
            cos = float(r @ mu / (r.norm() * mu.norm()).clamp_min(1e-12))
            out.append({"layer": i, "norm": round(float(r.norm()), 4), "cos_neg_mean": round(cos, 4)})
        return out


def extract_means(
    model,
    tokenizer,
    pos_prompts: Sequence[Sequence[int]],
    neg_prompts: Sequence[Sequence[int]],
    batch_size: int = 8,
    desc: str = "activations",
) -> tuple[Means, torch.Tensor, torch.Tensor]:
    """Means of both sets plus the per-prompt states they came from (for detection checks)."""
    pos = collect_states(model, tokenizer, pos_prompts, batch_size, desc=f"{desc} (A)")
    neg = collect_states(model, tokenizer, neg_prompts, batch_size, desc=f"{desc} (B)")
    return Means.from_states(pos, neg), pos, neg


# ---- candidates --------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One way to turn the means into a direction set.

    kind: "single" (r_layer on every layer, weight 1: Arditi et al.),
    "orth" (r_layer minus its component along the harmless mean at that layer),
    "kernel" (r_layer on every layer, Gaussian layer weights centred at layer, width sigma),
    "perlayer" (each layer its own r_l, weight 1).
    """

    kind: str
    layer: int
    sigma: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "kernel":
            return f"kernel@{self.layer}/s{self.sigma:g}"
        if self.kind == "perlayer":
            return "perlayer"
        return f"{self.kind}@{self.layer}"


def _orth(r: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    u = mu / mu.norm().clamp_min(1e-12)
    return r - (r @ u) * u


def candidate_tensors(means: Means, cand: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (n_layers, d) unit float32, layer_weights (n_layers,) float32) for ``cand``."""
    n, diff = means.n_layers, means.diff
    if cand.kind == "perlayer":
        return normalize(diff).float(), torch.ones(n)
    r = diff[cand.layer]
    if cand.kind == "orth":
        r = _orth(r, means.neg[cand.layer])
    dirs = normalize(r).float().unsqueeze(0).repeat(n, 1)
    if cand.kind == "kernel":
        w = torch.tensor([math.exp(-((i - cand.layer) ** 2) / (2 * cand.sigma**2)) for i in range(n)])
        return dirs, w.float()
    if cand.kind not in ("single", "orth"):
        raise ValueError(f"unknown candidate kind {cand.kind!r}")
    return dirs, torch.ones(n)


def candidate_set(means: Means, cand: Candidate, name: str, metadata: dict | None = None) -> DirectionSet:
    dirs, w = candidate_tensors(means, cand)
    md = {"method": cand.kind, "chosen_layer": str(cand.layer), "candidate": cand.label, **(metadata or {})}
    return DirectionSet(name=name, directions=dirs, layer_weights=w, metadata=md)


def default_layers(n_layers: int) -> list[int]:
    """The middle 20%..80% of depth."""
    lo, hi = round(0.2 * n_layers), round(0.8 * n_layers)
    return list(range(max(lo, 1), max(hi, lo + 1) + 1))[: n_layers - 1] or [n_layers // 2]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'8-18', '8,10,12' or '8-18:2' -> layer indices (validated)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, s = part.split(":")
            step = int(s)
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out.extend(range(a, b + 1, step))
        elif part:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{n_layers - 1}")
    return sorted(dict.fromkeys(out))


# ---- detection (conditional ablation) -----------------------------------------------


def threshold_at_fpr(neg_scores: Sequence[float], fpr: float) -> float:
    """A threshold that at most ``floor(fpr * n)`` negative scores exceed (score > threshold fires).

    Placed midway between the k-th and (k+1)-th highest negative score, so
    tiny numeric differences between batched and unbatched passes do not
    flip a negative prompt that sits exactly on it.
    """
    s = sorted((float(x) for x in neg_scores), reverse=True)
    k = math.floor(fpr * len(s) + 1e-9)
    if k >= len(s):
        return s[-1] - 1.0
    if k == 0:
        return s[0] + 1e-3 * (abs(s[0]) + 1.0)
    return 0.5 * (s[k - 1] + s[k])


@dataclass
class Detection:
    vector: torch.Tensor  # (d,) unit float32
    layer: int
    threshold: float
    record: dict  # firing rates per layer tried, chosen layer


def lda_vector(pos: torch.Tensor, neg: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Shrinkage LDA direction ``(S + lambda * tr(S)/d * I)^-1 (mu_pos - mu_neg)``, unit, float32.

    ``pos``/``neg`` are (N, d) states of one layer; S is the pooled within-class
    covariance (float64). Where the mean difference points along directions of
    large within-class spread (topic, length, phrasing), LDA discounts them, so
    the two sets separate with a much smaller overlap.
    """
    p, n = pos.to(torch.float64), neg.to(torch.float64)
    x = torch.cat([p - p.mean(0), n - n.mean(0)])
    cov = x.T @ x / max(1, x.shape[0] - 2)
    d = cov.shape[0]
    ridge = shrinkage * float(cov.trace()) / d
    w = torch.linalg.solve(cov + ridge * torch.eye(d, dtype=cov.dtype), p.mean(0) - n.mean(0))
    return normalize(w).float()


DETECT_SHRINKAGES = (0.03, 0.1, 0.3)


def calibrate_detection(
    vector: torch.Tensor,
    pos_states: torch.Tensor,
    neg_states: torch.Tensor,
    layers: Sequence[int],
    fpr: float = 0.02,
    prefer: int | None = None,
    check: tuple[torch.Tensor, torch.Tensor] | None = None,
    shrinkages: Sequence[float] = DETECT_SHRINKAGES,
) -> Detection:
    """Pick a detection vector, layer and threshold so validation negatives fire <= ``fpr``.

    Score = hidden_states[layer][last token] . vector (what the engine's
    pre-hook on decoder layer ``layer`` computes). Candidates at each layer of
    ``layers``: ``vector`` itself (the direction's mean difference), and, when
    ``check`` (the train states) is given, shrinkage-LDA vectors fitted on the
    train states of that layer. The threshold of each comes from the validation
    negatives; the candidate where the most validation positives fire wins
    (ties: fewer negatives, then closest to ``prefer``). ``check`` figures at
    the chosen threshold are reported as the out-of-calibration check (for LDA
    the train split is its fitting data, so they are optimistic there).
    """
    v0 = normalize(vector).float()
    tried, vectors = [], {}
    for L in layers:
        cands = {"mean-diff": v0}
        if check is not None:
            for lam in shrinkages:
                cands[f"lda/{lam:g}"] = lda_vector(check[0][:, L], check[1][:, L], lam)
        for kind, v in cands.items():
            ps, ns = pos_states[:, L] @ v, neg_states[:, L] @ v
            thr = threshold_at_fpr(ns.tolist(), fpr)
            vectors[(kind, int(L))] = v
            tried.append(
                {
                    "kind": kind,
                    "layer": int(L),
                    "threshold": round(thr, 5),
                    "fire_pos": round(float((ps > thr).float().mean()), 4),
                    "fire_neg": round(float((ns > thr).float().mean()), 4),
                }
            )
    best = max(tried, key=lambda t: (t["fire_pos"], -t["fire_neg"], -abs(t["layer"] - (prefer or 0))))
    L, v = best["layer"], vectors[(best["kind"], best["layer"])]
    # the stored threshold is the exact midpoint; the record holds it rounded
    thr = threshold_at_fpr((neg_states[:, L] @ v).tolist(), fpr)
    record = {
        "fpr_target": fpr,
        "candidates": tried,
        "chosen_kind": best["kind"],
        "chosen_layer": L,
        "threshold": round(thr, 5),
        "val_fire_pos": best["fire_pos"],
        "val_fire_neg": best["fire_neg"],
    }
    if check is not None:
        record["train_fire_pos"] = round(float(((check[0][:, L] @ v) > thr).float().mean()), 4)
        record["train_fire_neg"] = round(float(((check[1][:, L] @ v) > thr).float().mean()), 4)
    return Detection(vector=v, layer=L, threshold=thr, record=record)


# ---- selection on the validation split ------------------------------------------------


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


def _objective_value(objective: str, res: list, capability: list[dict] | None = None) -> float:
    from directions.refusal import refusal_rate
    from directions.slop import corpus_slop_score

    texts = [r.text for r in res]
    return refusal_rate(texts) if objective == "refusal" else corpus_slop_score(texts)


def _measure(
    bench,
    cfg: SelectConfig,
    sets: dict[str, DirectionSet],
    gen_prompts,
    kl_prompts,
    n_tokens: int,
    cap_prompts=None,
    capability=None,
    desc="proxy",
    base: bool = True,
) -> dict[str, dict]:
    """Objective value (and capability) for every candidate, plus the unedited baseline ("base") if ``base``."""
    from directions.evaluate import DirectionRequest, Job, capability_correct

    bench.set_directions(sets)
    labels = ["base"] * base + list(sets)
    steer = lambda lbl: {} if lbl == "base" else {lbl: DirectionRequest(1.0)}  # noqa: E731
    jobs = [Job((lbl, "obj"), gen_prompts, n_tokens, steer(lbl)) for lbl in labels]
    if cap_prompts:
        jobs += [Job((lbl, "cap"), cap_prompts, cfg.capability_tokens, steer(lbl)) for lbl in labels]
    out = bench.generate(jobs, desc=f"{desc} generations")
    figs: dict[str, dict] = {}
    for lbl in labels:
        f = {cfg.objective: round(_objective_value(cfg.objective, out[(lbl, "obj")]), 4)}
        if lbl == "base":
            f["first_token_kl"] = 0.0
        else:
            f["first_token_kl"] = round(bench.first_token_kl(kl_prompts, {lbl: [1.0] * len(kl_prompts)})[0], 5)
        if cap_prompts:
            ok = [capability_correct(r.text, q["accept"]) for r, q in zip(out[(lbl, "cap")], capability, strict=True)]
            f["capability"] = round(sum(ok) / len(ok), 4)
        f["n"], f["tokens"] = len(gen_prompts), n_tokens
        figs[lbl] = f
    return figs


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


def select_and_build(
    model, tokenizer, data: ExtractData, name: str, cfg: SelectConfig, candidates: list[Candidate] | None = None
) -> DirectionSet:
    """Extract means on train, choose a candidate on validation, calibrate detection; return the set.

    With ``candidates`` given as a single entry, selection is skipped (used by tests and ``--no-select``).
    """
    from directions.evaluate import Bench

    n_layers = num_layers(model)
    layers = cfg.layers or default_layers(n_layers)
    ids = lambda texts, systems=None: build_prompts(tokenizer, texts, systems)  # noqa: E731
    pos_tr, neg_tr = ids(data.pos_train, data.pos_systems), ids(data.neg_train, data.neg_systems)
    pos_va, neg_va = ids(data.pos_val, data.pos_systems), ids(data.neg_val, data.neg_systems)
    means, tr_pos_states, tr_neg_states = extract_means(
        model, tokenizer, pos_tr, neg_tr, cfg.batch_size, desc="train activations"
    )
    val_pos_states = collect_states(model, tokenizer, pos_va, cfg.batch_size, desc="val activations (A)")
    val_neg_states = collect_states(model, tokenizer, neg_va, cfg.batch_size, desc="val activations (B)")
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
        bench = Bench(model, tokenizer, batch_size=cfg.batch_size)
        # Selection generates from the positive val prompts as users send them: for slop that is
        # without the slop-inducing system prompt.
        gen_all = build_prompts(tokenizer, data.pos_val, data.pos_systems if cfg.objective == "refusal" else None)
        kl_all = build_prompts(tokenizer, data.kl_prompts) if data.kl_prompts else neg_va
        gen_p, kl_p = gen_all[: cfg.proxy_n], kl_all[: cfg.proxy_n]
        cap_p = build_prompts(tokenizer, [q["question"] for q in data.capability]) if data.capability else None
        sets = lambda cs: {c.label: candidate_set(means, c, c.label) for c in cs}  # noqa: E731
        cands = candidates or [Candidate("single", L) for L in layers]
        stage1 = _measure(bench, cfg, sets(cands), gen_p, kl_p, cfg.proxy_tokens, desc="stage 1 (layers)")
        ranked = _rank(stage1, cfg) or sorted(
            (k for k in stage1 if k != "base"), key=lambda k: stage1[k]["first_token_kl"]
        )
        best = next(c for c in cands if c.label == ranked[0])
        record["stage1_proxy"] = stage1
        extra = []
        if not candidates:
            for v in cfg.variants:
                if v == "orth":
                    extra.append(Candidate("orth", best.layer))
                elif v == "kernel":
                    extra += [Candidate("kernel", best.layer, s) for s in cfg.sigmas]
                elif v == "perlayer":
                    extra.append(Candidate("perlayer", best.layer))
        stage2 = (
            _measure(bench, cfg, sets(extra), gen_p, kl_p, cfg.proxy_tokens, desc="stage 2 (variants)", base=False)
            if extra
            else {}
        )
        record["stage2_proxy"] = stage2
        proxy = {**stage1, **stage2}
        top = (_rank(proxy, cfg) or ranked)[: cfg.confirm_top]
        by_label = {c.label: c for c in [*cands, *extra]}
        n = cfg.confirm_n or len(gen_all)
        confirm = _measure(
            bench,
            cfg,
            sets([by_label[k] for k in top]),
            gen_all[:n],
            kl_all,
            cfg.confirm_tokens,
            cap_p,
            data.capability,
            desc="confirm",
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
        chosen = by_label[final[0]]
        bench.close()
    record["chosen"] = chosen.label
    dirs, weights = candidate_tensors(means, chosen)
    ds = DirectionSet(name=name, directions=dirs, layer_weights=weights)
    if cfg.detect:
        det = calibrate_detection(
            means.diff[chosen.layer].float(),
            val_pos_states,
            val_neg_states,
            layers,
            cfg.detect_fpr,
            prefer=chosen.layer,
            check=(tr_pos_states, tr_neg_states),
        )
        ds.detect_vector, ds.detect_layer, ds.detect_threshold = det.vector, det.layer, det.threshold
        record["detection"] = det.record
    ds.metadata = {
        "objective": cfg.objective,
        "method": f"mean-diff {chosen.kind}" + (f" sigma={chosen.sigma:g}" if chosen.kind == "kernel" else ""),
        "candidate": chosen.label,
        "chosen_layer": str(chosen.layer),
        "prompt_hashes": {
            role: {"file": Path(p).name, "sha256": file_sha256(p)} for role, p in (data.files or {}).items()
        },
        "selection": record,
        "eval": record.get("confirm", {}).get(chosen.label, {}),
    }
    return ds
