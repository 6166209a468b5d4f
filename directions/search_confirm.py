"""Confirming the search's Pareto candidates with real generations, choosing the winner, and the
Pareto-front plot (:mod:`directions.search` has the study itself).

The confirm stage measures each candidate as the server serves it: greedy generations of
``tokens`` tokens on the whole harmful validation split through the engine (refusals by the
marker judge, :mod:`directions.refusal`) and full-vocabulary first-token KL on the whole
harmless validation split. The winner is the candidate with the fewest refusals within the KL
budget (ties: lower KL); a non-answer (:func:`directions.refusal.is_non_answer`) counts as a
refusal here; if none is within it, the fewest refusals (a refusal direction that leaves
refusals is no use at any KL), with a warning in the record.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from directions.fileformat import DirectionSet
from directions.measure import Job, Measurements
from directions.plots import save_figure
from directions.refusal import is_non_answer, is_refusal
from directions.strengths import DirectionRequest


def confirm(
    m: Measurements,
    sets: dict[str, DirectionSet],
    harmful_ids: list[list[int]],
    harmless_ids: list[list[int]],
    tokens: int,
    strength: float = 1.0,
    base: bool = False,
) -> dict[str, dict]:
    """Refusals (count and rate) at ``tokens`` tokens and first-token KL for every set at ``strength``;
    with ``base`` the unedited model's refusals too (label "base")."""
    m.set_directions(sets)
    labels = ["base"] * base + list(sets)
    jobs = [
        Job((lbl,), harmful_ids, tokens, {} if lbl == "base" else {lbl: DirectionRequest(strength)}) for lbl in labels
    ]
    out = m.generate(jobs, desc="confirm generations")
    figs: dict[str, dict] = {}
    for lbl in labels:
        n_ref = sum(is_refusal(r.text) for r in out[(lbl,)])
        n_non = sum(is_non_answer(r.text) for r in out[(lbl,)])
        kl = 0.0 if lbl == "base" else m.first_token_kl(harmless_ids, {lbl: [strength] * len(harmless_ids)})[0]
        figs[lbl] = {
            "refusals": n_ref,
            "n": len(harmful_ids),
            "refusal_rate": round(n_ref / max(1, len(harmful_ids)), 4),
            # replies that open with a deflection and answer nothing (not refusals to the marker judge)
            "non_answers": n_non,
            "first_token_kl": round(kl, 5),
            "tokens": tokens,
            "strength": strength,
            # the commonest reply openings: a non-answer ("I'm glad I could help!") is not a refusal to
            # the marker judge, so a candidate that trades refusals for it shows up here
            "openings": Counter(" ".join(r.text.split()[:3]) for r in out[(lbl,)]).most_common(3),
        }
    return figs


def misses(f: dict) -> int:
    """Refusals plus non-answers: the harmful replies that did not answer (figures from before the
    non-answer count have only refusals)."""
    return f["refusals"] + f.get("non_answers", 0)


def pick_winner(figs: dict[str, dict], kl_budget: float) -> tuple[str, str | None]:
    """(label, warning or None): fewest misses (refusals + non-answers) within the KL budget, then
    lowest KL; if no candidate is within the budget, fewest misses overall (then lowest KL), with a
    warning."""
    cands = {k: f for k, f in figs.items() if k != "base"}
    ok = [k for k, f in cands.items() if f["first_token_kl"] <= kl_budget]
    if ok:
        return min(ok, key=lambda k: (misses(cands[k]), cands[k]["first_token_kl"])), None
    best = min(cands, key=lambda k: (misses(cands[k]), cands[k]["first_token_kl"]))
    return best, f"no confirmed candidate had first-token KL <= {kl_budget}; took the fewest refusals + non-answers"


def plot_pareto(rows: list[dict], figs: dict[str, dict], winner: str, kl_budget: float, path: str | Path) -> Path:
    """Left: every trial's proxy figures (refusal objective vs first-token KL), the Pareto front
    marked; right: the confirmed candidates (refusals at N tokens vs KL on the whole split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    rest = [r for r in rows if not r["pareto"]]
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl"])
    a.scatter([r["kl"] for r in rest], [r["objective"] for r in rest], s=10, c="#999", label="trial")
    a.plot([r["kl"] for r in front], [r["objective"] for r in front], "o-", c="C3", ms=4, label="Pareto front")
    for r in rows:
        if f"t{r['number']}" in figs:
            a.annotate(f"t{r['number']}", (r["kl"], r["objective"]), fontsize=7)
    a.axvline(kl_budget, color="grey", ls=":", lw=0.8)
    a.set_xscale("symlog", linthresh=1e-3)
    a.set_xlabel("first-token KL, harmless val subset (proxy)")
    a.set_ylabel("refusals (short replies) + refusal-token mass / 10, harmful val subset")
    a.set_title(f"search trials ({len(rows)})", fontsize=9)
    a.legend(fontsize=7)
    confirmed_panel(b, figs, winner, "confirmed Pareto candidates (validation split)")
    b.axvline(kl_budget, color="grey", ls=":", lw=0.8)
    return save_figure(fig, path)


def confirmed_panel(ax, figs: dict[str, dict], winner: str, title: str) -> None:
    """Confirmed candidates on ``ax``: refusals at the confirm length against first-token KL on the
    whole harmless split, each labelled, the winner highlighted (the unedited "base" left out)."""
    for k, f in figs.items():
        if k == "base":
            continue
        ax.scatter(f["first_token_kl"], misses(f), c="C1" if k == winner else "C0", s=40 if k == winner else 18)
        ax.annotate(k + (" (winner)" if k == winner else ""), (f["first_token_kl"], misses(f)), fontsize=7)
    any_f = next(iter(figs.values()))
    ax.set_xlabel("first-token KL, whole harmless val split")
    ax.set_ylabel(f"refusals + non-answers of {any_f['n']} harmful val prompts ({any_f['tokens']} tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
