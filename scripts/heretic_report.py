"""The comparison of scripts/compare_heretic.py: rows from a ``frankly eval`` result, the
Markdown table and the bar chart."""

from __future__ import annotations

from pathlib import Path

HERETIC_VERSION = "1.4.0"
SPLIT_NOTES = [
    "refusals: directions/prompts/refusal/harmful_test.txt (test split: no selection, calibration or Heretic search saw it)",
    "non-answers: harmful test replies that are not refusals but open with a deflection "
    "(refusal/non_answers.txt, e.g. 'I'm glad I could help! How can I assist you today?')",
    "first-token KL: refusal/harmless_test.txt (test split), full vocabulary, KL(plain || system)",
    "long KL: the plain model's greedy continuations of refusal/harmless_long.txt, teacher-forced "
    "(not held out: selection may read it)",
    "capability: capability/questions.jsonl (not held out)",
    "Heretic's search: directions from *_train.txt, trials scored on *_val.txt, like frankly's selection",
]


def _find(rows: list[dict], direction: str, when: str, strength: float) -> dict:
    for r in rows:
        if r["direction"] == direction and r["when"] == when and abs(r["strength"] - strength) < 1e-9:
            return r
    raise KeyError(f"no eval row {direction}/{when}/{strength:g}")


def _system(name: str, r: dict) -> dict:
    n = r.get("n_harmful") or 0
    return {
        "system": name,
        "refusals": r.get("refusals"),
        "n_harmful": n,
        "refusals_per_100": 100 * r["refusals"] / n if n else None,
        "non_answers": r.get("non_answers"),  # absent from results written before the count existed
        "first_token_kl": r.get("first_token_kl"),
        "long_kl": r.get("long_kl"),
        "capability": r.get("capability"),
        "fired_harmless": (r.get("fired") or {}).get("harmless"),
        "fired_harmful": (r.get("fired") or {}).get("harmful"),
    }


def comparison_rows(result: dict, strength: float, heretic_row: dict | None) -> list[dict]:
    """plain, Heretic, frankly always and auto at ``strength``, from a ``frankly eval`` result."""
    rows = result["rows"]
    out = [_system("plain model", _find(rows, "refusal", "always", 0.0))]
    if heretic_row is not None:
        out.append(_system("Heretic " + HERETIC_VERSION, heretic_row))
    out.append(_system(f"frankly always (s={strength:g})", _find(rows, "refusal", "always", strength)))
    out.append(_system(f"frankly when=auto (s={strength:g})", _find(rows, "refusal", "auto", strength)))
    return out


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the comparison rows."""

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (
        "| system | refusals /100 (test) | non-answers (test) | first-token KL (test) | long KL | capability "
        "| condition fires on harmless (test) |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        ref = "-" if r["refusals"] is None else f"{r['refusals_per_100']:.1f} ({r['refusals']}/{r['n_harmful']})"
        cap = f(None if r["capability"] is None else 100 * r["capability"], ".1f")
        fired = f(None if r["fired_harmless"] is None else 100 * r["fired_harmless"], ".1f")
        cells = [
            r["system"],
            ref,
            f(r.get("non_answers"), "d"),
            f(r["first_token_kl"], ".4f"),
            f(r["long_kl"], ".4f"),
            cap,
            fired if fired == "-" else fired + "%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(rows: list[dict], trials: list[dict], chosen: dict | None, path: Path) -> Path:
    """Bars per system for each metric; and Heretic's trials as it scored them (val split), chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("refusals_per_100", "refusals per 100 (harmful test)"),
        ("first_token_kl", "first-token KL (harmless test)"),
        ("long_kl", "long-continuation KL"),
        ("capability", "capability (fraction correct)"),
    ]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.0 * (len(panels) + 1), 3.8))
    names = [r["system"].replace(" (", "\n(") for r in rows]
    colors = ["#888888", "#d62728", "#1f77b4", "#17becf"][: len(rows)] if len(rows) == 4 else None
    for ax, (k, title) in zip(axes, panels, strict=False):
        vals = [r[k] if r[k] is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    ax = axes[-1]
    if trials:
        ax.scatter(
            [t["kl"] for t in trials], [t["refusals"] for t in trials], s=14, color="#d62728", alpha=0.6, label="trials"
        )
        if chosen:
            ax.scatter([chosen["kl"]], [chosen["refusals"]], s=70, facecolors="none", edgecolors="k", label="chosen")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.legend(fontsize=7)
    ax.set_xlabel("first-token KL (Heretic's, val)", fontsize=8)
    ax.set_ylabel("refusals (Heretic's judge, val)", fontsize=8)
    ax.set_title("Heretic's search (val split)", fontsize=9)
    fig.suptitle("Heretic vs frankly on the demo model (test split unless noted)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
