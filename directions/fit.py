"""A gradient fit of a direction's per-writer weights (issue #15: "a gradient-based fit of the
per-layer weights on a differentiable surrogate").

The edit of writer (kind, l) is ``y <- y - s * w[kind, l] * (y . r_l) r_l``: linear in each weight,
and the whole edited forward pass is differentiable in ``w``. With the direction ``r`` fixed, the
fit minimises over the (3, n_layers) writer weights

    loss(w) = R(w) + lam * K(w)

    R(w) = mean over refused harmful prompts of  -log(1 - P_w(refusal prefix | prompt))
    K(w) = mean over harmless prompts of KL(P_orig || P_w) at the first generated token

where a prompt's refusal prefix is the first few tokens of the unedited model's own greedy
refusal of it (e.g. "I'm sorry,"), or a set of prefixes (its own and the most common other
refusal openings, e.g. "As an AI language"; then P is the sum over the set), scored teacher-forced: ``P_w(prefix)`` is the product of the
edited model's probabilities of those tokens in turn. ``-log(1 - P)`` is ~P where the edit
already steers the reply away from the refusal and grows without bound where the reply still
starts refusing, so the prompts the edit leaves refused dominate the gradient. The KL is over
the full vocabulary. Weights are ``w_max * sigmoid(theta)``
(in [0, w_max]); the embedding uses only its layer-0 entry (the other embedding entries stay
as they are). With ``smooth`` > 0 the loss adds ``smooth`` times the squared
differences between neighbouring layers' attention (and MLP) weights. ``lam`` is raised in stages (a path from "remove refusals" toward "keep the
model"), warm-starting each stage from the last, and every stage's weights are a candidate.

With ``direction`` = "shared" or "per-layer" the direction is fitted too (something no peer
does): ``r_l = normalize(r0_l + delta)`` with ``delta`` one vector for every layer ("shared": the
file stays one direction, rotated) or one per layer ("per-layer": the file becomes one direction
per layer, which the file format, hooks, bake and LoRA export all take). The loss then adds
``direction_reg`` times the mean of ``1 - cos(r_l, r0_l)``, which keeps the fitted direction near
the extracted one unless the surrogate pays for moving it. The edit stays a rank-1 projection
per writer, linear in the strength: per-request strengths, bake and LoRA export are unchanged.

Only train prompts go into the fit; candidates are then confirmed on validation
(``scripts/fit_weights.py``). Nothing here reads the test split.

Cost: one forward and one backward pass (activation gradients only: the model's parameters do
not require grad) per step over ``batch`` harmful + ``batch`` harmless prompts, logits only at
the last position; each harmful prompt is computed once for all its scored prefixes and its
compliance target (:func:`prefix_set_logprobs`: the prompt's KV cache is shared), so extra
prefixes cost only their own few tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from directions.edit import project_out
from directions.fileformat import COMPONENTS, DirectionSet
from directions.forward import forward_last, pad_id, pad_left
from directions.writers import find_writers


@dataclass
class FitConfig:
    lambdas: Sequence[float] = (3.0, 10.0, 30.0)  # KL weight per stage, warm-started in order
    steps: int = 15  # optimiser steps per stage
    batch: int = 12  # harmful and harmless prompts per step (each)
    lr: float = 0.15  # Adam on theta
    w_max: float = 2.0  # weights live in [0, w_max]
    init: float = 1.0  # starting weight of every writer (1 = the flat file)
    comply_weight: float = 1.0  # weight of the compliance term (when compliance targets are given)
    init_from_file: bool = False  # start from the file's own writer weights instead (refining a fitted file)
    seed: int = 0
    fit_embedding: bool = True
    smooth: float = 0.0  # weight of the squared layer-to-layer differences of the attn and MLP weights
    direction: str = "none"  # "none" (direction fixed) | "shared" | "per-layer" (see the module doc)
    direction_lr: float = 0.003  # Adam on delta (the directions are unit rows)
    direction_reg: float = 1.0  # weight of mean(1 - cos(r_l, r0_l))


DIRECTION_MODES = ("none", "shared", "per-layer")


@dataclass
class StageResult:
    lam: float
    weights: torch.Tensor  # (3, n_layers) writer weights at the end of the stage
    directions: torch.Tensor | None = None  # (n_layers, d) unit rows at the end of the stage (direction fitted)
    history: list[dict] = field(default_factory=list)  # per step: loss, refusal term, kl, mass


class DifferentiableEdit:
    """Forward hooks applying the edit (:func:`directions.edit.project_out`, as the server's
    :class:`directions.hooks.SteeringHooks` do) with the writer weights ``w`` a tensor that carries
    gradients."""

    def __init__(self, model: nn.Module, directions: torch.Tensor):
        p = next(model.parameters())
        self.dirs = directions.to(p.device, p.dtype)  # (n_layers, d) unit rows
        self.weights: torch.Tensor | None = None
        self._handles = []
        for wr in find_writers(model):
            comp = COMPONENTS.index(wr.kind)
            self._handles.append(wr.module.register_forward_hook(self._hook(comp, wr.layer)))

    def _hook(self, comp: int, layer: int):
        def hook(module, inputs, y):
            if self.weights is None:
                return y
            return project_out(y, self.dirs[layer], self.weights[comp, layer].to(y.dtype))

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def last_logits(model, batch: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Logits at the last prompt token of left-padded ``batch`` (B, vocab), float32, computing the
    LM head at that position only."""
    device = next(model.parameters()).device
    ids, mask, pos = pad_left(batch, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


def prefix_logprob(
    model, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], pad: int
) -> torch.Tensor:
    """log P(prefix | prompt) per row, teacher-forced (B,), float32, differentiable: each row is its
    prompt followed by its prefix, left padded, with the LM head computed at the last K + 1
    positions only (K = the longest prefix; shorter prefixes are padded on the left inside that
    window and their padding positions count as probability 1)."""
    k = max(len(p) for p in prefixes)
    device = next(model.parameters()).device
    rows = [list(a) + list(b) for a, b in zip(prompts, prefixes, strict=True)]
    ids, mask, pos = pad_left(rows, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=k + 1)
    logp = torch.log_softmax(out.logits[:, :k].float(), -1)  # position j predicts token j + 1 of the window
    target = ids[:, -k:]
    tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, k)
    valid = torch.zeros_like(tok_lp, dtype=torch.bool)
    for i, p in enumerate(prefixes):
        valid[i, k - len(p) :] = True
    return (tok_lp * valid).sum(-1)


def prefix_set_logprobs(
    model, prompts: Sequence[Sequence[int]], prefix_sets: Sequence[Sequence[Sequence[int]]], pad: int
) -> torch.Tensor:
    """log P(prefix | prompt) for every prefix of every prompt, flattened in order (prompt 0's
    prefixes, then prompt 1's, ...), float32, differentiable, each prompt computed **once**: one
    forward over the left-padded prompts keeps its KV cache and the first prefix token's
    log-probability; the cache is then repeated per prefix and one more forward over the prefixes'
    remaining tokens (right-padded; causal attention keeps the padding out of the scored positions)
    scores the rest. Equal to :func:`prefix_logprob` on each (prompt, prefix) pair (tested), at the
    cost of one prompt forward instead of one per prefix. Models whose cache cannot be
    re-indexed fall back to :func:`prefix_logprob`."""
    rows = [list(x) for ps in prefix_sets for x in ps]
    owner_l = [i for i, ps in enumerate(prefix_sets) for _ in ps]
    if not rows or any(len(x) == 0 for x in rows):
        raise ValueError("every prefix needs at least one token")
    device = next(model.parameters()).device
    ids, mask, pos = pad_left(prompts, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    if not hasattr(cache, "batch_select_indices"):
        return prefix_logprob(model, [prompts[i] for i in owner_l], rows, pad)
    owner = torch.tensor(owner_l, device=device)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)[owner]  # (N, vocab)
    lp = first.gather(-1, torch.tensor([[x[0]] for x in rows], device=device)).squeeze(-1)
    k = max(len(x) for x in rows) - 1  # tokens fed to score the rest
    if k == 0:
        return lp
    cache.batch_select_indices(owner)
    feed = torch.full((len(rows), k), pad, dtype=torch.long)
    target = torch.full((len(rows), k), pad, dtype=torch.long)
    valid = torch.zeros((len(rows), k), dtype=torch.bool)
    for j, x in enumerate(rows):
        feed[j, : len(x) - 1] = torch.tensor(x[:-1])
        target[j, : len(x) - 1] = torch.tensor(x[1:])
        valid[j, : len(x) - 1] = True
    feed, target, valid = feed.to(device), target.to(device), valid.to(device)
    full_mask = torch.cat([mask[owner], torch.ones_like(feed)], dim=1)
    pos2 = pos[owner, -1:] + 1 + torch.arange(k, device=device)
    out2 = model(input_ids=feed, attention_mask=full_mask, position_ids=pos2, cache=cache, use_cache=True)
    rest = torch.log_softmax(out2.logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return lp + (rest * valid).sum(-1)


def fit_weights(
    model,
    tokenizer,
    ds: DirectionSet,
    harmful: Sequence[Sequence[int]],
    harmless: Sequence[Sequence[int]],
    prefixes: Sequence[Sequence[int]],
    cfg: FitConfig,
    progress: Callable[[str, int, int, dict], None] | None = None,
    comply: Sequence[Sequence[int] | None] | None = None,
) -> list[StageResult]:
    """Fit the writer weights of ``ds`` (its directions fixed); one :class:`StageResult` per
    lambda of ``cfg.lambdas``. ``prefixes[i]`` is the refusal prefix of ``harmful[i]`` (at least one
    token), or a list of such prefixes: then the refusal term scores the sum of their
    probabilities (distinct prefixes are disjoint events: the mass of "any of these refusal
    openings").

    ``comply[i]`` (optional; None where a prompt has none): a compliant opening of ``harmful[i]``
    (e.g. the first tokens of the strongly edited model's own answer); the loss then adds
    ``cfg.comply_weight`` times its mean per-token negative log-likelihood. Without it the refusal
    term alone can be met by a non-answer ("I'm glad I could help!") that no marker judges a
    refusal; the compliance term asks for an answer instead. ``progress(stage, step, steps, figures)`` is called after every step."""
    if not harmful or not harmless:
        raise ValueError("the fit needs harmful and harmless prompts")
    if len(prefixes) != len(harmful):
        raise ValueError("every harmful prompt needs a refusal prefix of at least one token")
    prefix_sets = [[list(x) for x in p] if p and not isinstance(p[0], int) else [list(p)] for p in prefixes]
    if any(not ps or any(len(x) == 0 for x in ps) for ps in prefix_sets):
        raise ValueError("every harmful prompt needs a refusal prefix of at least one token")
    if comply is not None and len(comply) != len(harmful):
        raise ValueError("comply needs one entry (a token list or None) per harmful prompt")
    if cfg.direction not in DIRECTION_MODES:
        raise ValueError(f"direction must be one of {', '.join(DIRECTION_MODES)}, not {cfg.direction!r}")
    pad = pad_id(tokenizer)
    n_layers = ds.n_layers
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    # The unedited first-token log-probabilities of the harmless prompts (the KL reference).
    base = torch.log_softmax(forward_last(model, tokenizer, harmless, batch_size=16)[0], -1)
    frac = min(max(cfg.init / cfg.w_max, 1e-4), 1 - 1e-4)
    theta = torch.full((len(COMPONENTS), n_layers), math.log(frac / (1 - frac)))
    if cfg.init_from_file:
        f = (ds.writer_weights() / cfg.w_max).clamp(1e-4, 1 - 1e-4)
        theta = torch.log(f / (1 - f))
    theta.requires_grad_(True)
    edit = DifferentiableEdit(model, ds.directions)  # (n_layers, d) unit rows
    r0 = edit.dirs.detach().clone()
    fit_dir = cfg.direction != "none"
    delta = torch.zeros(1 if cfg.direction == "shared" else n_layers, ds.d_model, dtype=r0.dtype, requires_grad=fit_dir)
    emb_row = COMPONENTS.index("embed")
    fixed_emb = ds.writer_weights()[emb_row].clone()
    results: list[StageResult] = []
    gen = torch.Generator().manual_seed(cfg.seed)

    def weights_of(th: torch.Tensor) -> torch.Tensor:
        w = cfg.w_max * torch.sigmoid(th)
        if not cfg.fit_embedding:  # the embedding keeps the file's weight
            w = torch.cat([w[:emb_row], fixed_emb.unsqueeze(0), w[emb_row + 1 :]])
        return w

    try:

        def dirs_of(dl: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(r0 + dl, dim=-1)

        for lam in cfg.lambdas:
            groups = [{"params": [theta], "lr": cfg.lr}]
            if fit_dir:
                groups.append({"params": [delta], "lr": cfg.direction_lr})
            opt = torch.optim.Adam(groups)
            stage = StageResult(lam=float(lam), weights=torch.empty(0))
            for step in range(cfg.steps):
                t0 = time.monotonic()
                hi = torch.randperm(len(harmful), generator=gen)[: cfg.batch].tolist()
                ni = torch.randperm(len(harmless), generator=gen)[: cfg.batch].tolist()
                opt.zero_grad()
                edit.weights = weights_of(theta)
                if fit_dir:
                    edit.dirs = dirs_of(delta)
                # every refusal prefix of a prompt and its compliance target (last) share one prompt forward
                ci = [i for i in hi if comply is not None and comply[i]]
                sets = [prefix_sets[i] + ([comply[i]] if comply is not None and comply[i] else []) for i in hi]
                lp_all = prefix_set_logprobs(model, [harmful[i] for i in hi], sets, pad).cpu()
                # a row past the prompt's refusal prefixes is its compliance target
                is_c = torch.tensor(
                    [k >= len(prefix_sets[i]) for i, ps in zip(hi, sets, strict=True) for k in range(len(ps))]
                )
                owner = torch.tensor([j for j, ps in enumerate(sets) for _ in ps])
                rows_p = lp_all[~is_c].exp().clamp(max=1 - 1e-6)
                mass = torch.zeros(len(hi), dtype=rows_p.dtype).index_add(0, owner[~is_c], rows_p)
                mass = mass.clamp(max=1 - 1e-6)
                r_term = (-torch.log1p(-mass)).mean()
                c_term = torch.zeros(())
                if ci:
                    lp = lp_all[is_c]
                    c_term = (-lp / torch.tensor([len(comply[i]) for i in ci], dtype=lp.dtype)).mean()
                ln = torch.log_softmax(last_logits(model, [harmless[i] for i in ni], pad), -1)
                bp = base[ni]
                kl = (bp.exp() * (bp - ln)).sum(-1).clamp_min(0).mean()
                loss = r_term + lam * kl + (cfg.comply_weight * c_term if ci else 0.0)
                if cfg.smooth:
                    w = edit.weights[[COMPONENTS.index("attn"), COMPONENTS.index("mlp")]]
                    loss = loss + cfg.smooth * (w[:, 1:] - w[:, :-1]).pow(2).sum()
                if fit_dir:
                    cos = (edit.dirs * r0).sum(-1)
                    if cfg.direction_reg:
                        loss = loss + cfg.direction_reg * (1 - cos).mean()
                loss.backward()
                opt.step()
                figs = {
                    "loss": loss.item(),
                    "refusal_term": r_term.item(),
                    **({"comply_nll": round(c_term.item(), 5)} if comply is not None else {}),
                    "mass": mass.mean().item(),
                    "kl": kl.item(),
                    **({"min_cos": round(cos.min().item(), 5)} if fit_dir else {}),
                    "s": round(time.monotonic() - t0, 1),
                }
                stage.history.append(figs)
                if progress:
                    progress(f"lambda={lam:g}", step + 1, cfg.steps, figs)
            with torch.no_grad():
                stage.weights = weights_of(theta).detach().clone()
                if fit_dir:
                    stage.directions = dirs_of(delta).detach().float().cpu().clone()
            results.append(stage)
    finally:
        edit.remove()
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)
    return results


def with_weights(
    ds: DirectionSet, weights: torch.Tensor, record: dict, directions: torch.Tensor | None = None
) -> DirectionSet:
    """A copy of ``ds`` whose writer weights are ``weights`` (3, n_layers): layer weights 1 and the
    weights as ``component_weights``, and, where given, ``directions`` (n_layers, d) as its
    directions (normalised); its condition is kept, ``record`` goes into the metadata as ``fit``.
    A firing-case edit of ``ds`` is not: the copy is a new edit, measured on its own. Nor are the
    source's ``method`` and ``eval``: ``method`` says what was fitted (at ``record["lambda"]``, from a
    file of the source's method) and ``eval`` holds ``record["confirm"]`` (the copy's validation
    figures) where given, else nothing."""
    import json

    md = dict(ds.metadata)
    md["fit"] = json.dumps(record)
    md.pop("auto_edit", None)
    what = "writer weights" + ("" if directions is None else " and directions")
    lam = f" (lambda {record['lambda']:g})" if "lambda" in record else ""
    src = f", from a file of: {ds.metadata['method']}" if ds.metadata.get("method") else ""
    md["method"] = f"{what} fitted by scripts/fit_weights.py{lam}{src}"
    md.pop("eval", None)
    if conf := record.get("confirm"):
        ev = {"refusal": conf["refusal_rate"], "first_token_kl": conf["first_token_kl"]}
        ev |= {k: conf[k] for k in ("non_answers",) if k in conf}  # judged since the non-answer judge came
        md["eval"] = json.dumps(ev | {"n": conf["n"], "tokens": conf["tokens"], "split": "val"})
    dirs = ds.directions if directions is None else torch.nn.functional.normalize(directions.float(), dim=-1)
    return dataclasses.replace(
        ds,
        directions=dirs.clone(),
        layer_weights=torch.ones(ds.n_layers, dtype=torch.float32),
        component_weights=weights.detach().to(torch.float32).clamp_min(0).clone(),
        metadata=md,
        auto_edit=None,
    )
