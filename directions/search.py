"""The direction search: Optuna TPE over :mod:`directions.search_space`, on a cheap proxy, then
confirmed with real generations.

Cost model (CPU): the train/validation activations are extracted once and cached in the study
directory (:class:`Activations`); each trial then costs two batched prefill passes with the
server's hooks: first-token KL(P_orig || P_edited) on harmless validation prompts, and the
probability mass on refusal-opening tokens at the first generated position on harmful
validation prompts (:class:`ProxyScorer`). Both are minimised (multi-objective TPE); the study
lives in SQLite in the study directory, so an interrupted run resumes. The Pareto candidates
are then confirmed with greedy generations of ``confirm_tokens`` tokens on the whole harmful
validation split and first-token KL on the whole harmless validation split
(:mod:`directions.search_confirm`). Nothing here reads the test split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from directions.extract import Means, build_prompts, collect_states
from directions.fileformat import DirectionSet
from directions.forward import forward_last, pad_id, pad_left
from directions.hooks import edited
from directions.kl import kl_divergence
from directions.refusal import is_refusal
from directions.search_space import build_set, params_from_dict, suggest

log = logging.getLogger("frankly.search")

ACTIVATIONS = "activations.safetensors"
STUDY_DB = "study.db"


@dataclass
class SearchPrompts:
    """Prompt texts of one search: train (means, refusal tokens, detection check) and validation."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]

    def thinned(self, n: int | None) -> SearchPrompts:
        """At most ``n`` evenly spaced prompts of each train set (the means); validation unchanged."""

        def pick(xs: list[str]) -> list[str]:
            if not n or n >= len(xs):
                return xs
            return [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)] if n > 1 else xs[:1]

        return SearchPrompts(pick(self.harmful_train), pick(self.harmless_train), self.harmful_val, self.harmless_val)

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.harmful_train, self.harmless_train, self.harmful_val, self.harmless_val):
            h.update("\n".join(part).encode() + b"\0")
        return h.hexdigest()[:16]


@dataclass
class Activations:
    """What every trial reuses: per-layer means (train), per-prompt states (train, val) and the
    unedited first-token distributions of both train sets averaged (for the refusal tokens)."""

    means: Means
    train_pos: torch.Tensor  # (N, n_layers, d)
    train_neg: torch.Tensor
    val_pos: torch.Tensor
    val_neg: torch.Tensor
    first_pos: torch.Tensor  # (vocab,) mean first-token probability, harmful train
    first_neg: torch.Tensor  # (vocab,) harmless train


def _first_probs(model, tok, ids, batch_size, desc) -> tuple[torch.Tensor, torch.Tensor]:
    logits, states = forward_last(model, tok, ids, states=True, batch_size=batch_size, desc=desc)
    return torch.softmax(logits.double(), -1).mean(0).float(), states


def load_or_extract(
    model, tok, prompts: SearchPrompts, study_dir: Path, key: str, batch_size: int, val: bool = True
) -> Activations:
    """The cached activations of ``study_dir`` when their key matches, else extracted and cached.
    Without ``val`` the validation states (only the condition's calibration reads them) are left
    empty, which saves a pass over the validation prompts."""
    path = study_dir / ACTIVATIONS
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            cached_key = (f.metadata() or {}).get("key")
        if cached_key == key:
            t = load_file(str(path))
            log.info("activations from cache %s", path)
            means = Means(t["mean_pos"], t["mean_neg"], int(t["train_pos"].shape[0]), int(t["train_neg"].shape[0]))
            return Activations(
                means, t["train_pos"], t["train_neg"], t["val_pos"], t["val_neg"], t["first_pos"], t["first_neg"]
            )
    ids = lambda texts: build_prompts(tok, texts)  # noqa: E731
    fp, tp = _first_probs(model, tok, ids(prompts.harmful_train), batch_size, "train activations (harmful)")
    fn, tn = _first_probs(model, tok, ids(prompts.harmless_train), batch_size, "train activations (harmless)")
    if val:
        vp = collect_states(model, tok, ids(prompts.harmful_val), batch_size, desc="val activations (harmful)")
        vn = collect_states(model, tok, ids(prompts.harmless_val), batch_size, desc="val activations (harmless)")
    else:
        vp = vn = tp[:0]
    acts = Activations(Means.from_states(tp, tn), tp, tn, vp, vn, fp, fn)
    study_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        "mean_pos": acts.means.pos,
        "mean_neg": acts.means.neg,
        "train_pos": tp,
        "train_neg": tn,
        "val_pos": vp,
        "val_neg": vn,
        "first_pos": fp,
        "first_neg": fn,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"key": key})
    return acts


def refusal_tokens(acts: Activations, min_prob: float = 0.01, ratio: float = 4.0, top: int = 12) -> list[int]:
    """Tokens that open the unedited model's replies to harmful train prompts far more often than its
    replies to harmless ones: mean probability >= ``min_prob`` on harmful and >= ``ratio`` times the
    harmless one; at most ``top``, most probable first. If no token passes the ratio, the one with
    the highest ratio among those above ``min_prob`` (empty only if none is that probable)."""
    p, n = acts.first_pos.double(), acts.first_neg.double()
    frequent = torch.nonzero(p >= min_prob).flatten().tolist()
    idx = [i for i in frequent if p[i] >= ratio * n[i]]
    if not idx and frequent:
        idx = [max(frequent, key=lambda i: float(p[i] / n[i].clamp_min(1e-12)))]
    return sorted(idx, key=lambda i: -float(p[i]))[:top]


@torch.inference_mode()
def greedy_short(model, tok, prompts, ds: DirectionSet, strength: float, n_tokens: int, batch_size: int):
    """Greedy ``n_tokens``-token replies to ``prompts`` with ``ds`` at ``strength`` through the server's
    hooks (transformers' ``generate``, left padded): (texts, first-position logits (N, vocab))."""
    texts, first = [], []
    with edited(model, {"s": ds}) as hooks:
        for a in range(0, len(prompts), batch_size):
            batch = prompts[a : a + batch_size]
            hooks.set_strengths({"s": [strength] * len(batch)})
            ids, mask, _ = pad_left(batch, pad_id(tok), next(model.parameters()).device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=pad_id(tok),
                output_scores=True,
                return_dict_in_generate=True,
            )
            texts += tok.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
            first.append(out.scores[0].float().cpu())
    return texts, torch.cat(first)


@dataclass
class ProxyScorer:
    """Per-trial proxy figures on fixed validation subsets at strength ``strength``: short greedy
    replies to the harmful subset (refusals by the marker judge, plus the refusal-token mass at the
    first position) and one prefill pass over the harmless subset (first-token KL)."""

    model: object
    tok: object
    harmful_ids: list[list[int]]
    harmless_ids: list[list[int]]
    refusal_ids: list[int]
    strength: float = 1.0
    batch_size: int = 16
    gen_tokens: int = 24
    _base: torch.Tensor | None = field(default=None, repr=False)

    def base_logits(self) -> torch.Tensor:
        if self._base is None:
            self._base = forward_last(self.model, self.tok, self.harmless_ids, batch_size=self.batch_size)[0]
        return self._base

    def score(self, ds: DirectionSet) -> dict[str, float]:
        """``refusal``: share of the harmful subset refused within ``gen_tokens`` tokens (the objective,
        with ``refusal_mass`` / 10 added to break ties: see :func:`objective_value`); ``kl``: mean
        first-token KL on the harmless subset; ``refusal_mass``: mean first-position probability of
        the refusal-opening tokens on the harmful subset."""
        bs = self.batch_size
        texts, first = greedy_short(self.model, self.tok, self.harmful_ids, ds, self.strength, self.gen_tokens, bs)
        rows = {"s": [self.strength] * len(self.harmless_ids)}
        harmless, _ = forward_last(self.model, self.tok, self.harmless_ids, {"s": ds}, rows, batch_size=bs)
        mass = torch.softmax(first.double(), -1)[:, self.refusal_ids].sum(-1)
        return {
            "refusal": sum(map(is_refusal, texts)) / max(1, len(texts)),
            "kl": float(kl_divergence(self.base_logits(), harmless).mean()),
            "refusal_mass": float(mass.mean()),
        }


def objective_value(f: dict[str, float]) -> float:
    """The refusal objective of a trial: refusal share at ``gen_tokens`` tokens, ties broken by a tenth
    of the first-position refusal-token mass (a share moves in steps of 1/n, the mass continuously)."""
    return f["refusal"] + 0.1 * f["refusal_mass"]


def open_study(study_dir: Path, name: str, seed: int, n_startup: int):
    """The resumable two-objective (refusal, KL) TPE study in ``study_dir``/study.db."""
    import optuna

    study_dir.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True, group=True)
    return optuna.create_study(
        study_name=name,
        storage=f"sqlite:///{study_dir / STUDY_DB}",
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )


def reference_params(layer: int) -> dict:
    """Trial params equal to the previous selection's kind of direction: the orthogonalised mean
    difference of ``layer`` on every writer at weight 1 (floor 1: flat kernels), embedding included."""
    flat = {"peak": float(layer), "width": 1.0, "max": 1.0, "floor": 1.0}
    p = {"direction": "index", "index": float(layer), "orth": True, "touch_embed": True, "embed": 1.0}
    p["skip_first"] = 0
    for c in ("attn", "mlp"):
        p.update({f"{c}_{k}": v for k, v in flat.items()})
    return p


def run_trials(
    study, scorer: ProxyScorer, acts: Activations, n_trials: int, n_layers: int, timeout: float | None = None
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones (resuming) or ``timeout`` seconds
    have passed (the trial running then finishes); tqdm progress. Returns how many were asked for."""
    import optuna
    from tqdm.auto import tqdm

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    todo = max(0, n_trials - done)
    bar = tqdm(total=todo, desc="search trials")

    def objective(trial) -> tuple[float, float]:
        p = suggest(trial, n_layers)
        f = scorer.score(build_set(acts.means, p, "trial"))
        for k, v in f.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("label", p.label)
        return objective_value(f), f["kl"]

    def tick(study, trial) -> None:
        bar.update(1)
        v = trial.values or [float("nan")] * 2
        bar.set_postfix(refusal=f"{v[0]:.3f}", kl=f"{v[1]:.4f}", pareto=len(study.best_trials))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=todo, timeout=timeout, callbacks=[tick], gc_after_trial=False)
    bar.close()
    return todo


def trial_rows(study) -> list[dict]:
    """Every finished trial as a plain dict (number, values, proxy figures, params, Pareto flag)."""
    import optuna

    pareto = {t.number for t in study.best_trials}
    out = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        out.append(
            {
                "number": t.number,
                "objective": t.values[0],
                "kl": t.values[1],
                "refusal": t.user_attrs.get("refusal"),
                "refusal_mass": t.user_attrs.get("refusal_mass"),
                "label": t.user_attrs.get("label"),
                "pareto": t.number in pareto,
                "params": dict(t.params),
            }
        )
    return out


def pareto_candidates(rows: list[dict], kl_budget: float, top: int, slack: float = 1.5) -> list[dict]:
    """At most ``top`` Pareto trials whose proxy KL is within ``slack`` times the budget, spread evenly
    along the front: always the one with the lowest refusal objective, then points towards lower KL.
    The proxy KL is a subset's, so where the whole split lands is unknown until the confirm stage;
    spreading the candidates keeps one that fits the budget there more likely than the top few."""
    front = sorted(
        (r for r in rows if r["pareto"] and r["kl"] <= slack * kl_budget), key=lambda r: (r["objective"], r["kl"])
    )
    if len(front) <= top:
        return front
    if top <= 1:
        return front[:top]
    idx = sorted({round(i * (len(front) - 1) / (top - 1)) for i in range(top)})
    return [front[i] for i in idx]


def build_from_row(acts: Activations, row: dict, name: str) -> DirectionSet:
    """The direction set of one trial row (see :func:`trial_rows`)."""
    return build_set(acts.means, params_from_dict(row["params"]), name, {"search_trial": str(row["number"])})


def study_key(model_spec: str, prompts: SearchPrompts) -> str:
    """Cache key of the activations: model spec and prompt texts."""
    return json.dumps({"model": model_spec, "prompts": prompts.digest()})
