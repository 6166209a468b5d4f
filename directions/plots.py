"""PNG plots of ``frankly eval`` results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("refusal_rate", "refusal rate (harmful {split})"),
    ("first_token_kl", "first-token KL (harmless {split})"),
    ("long_kl", "KL per position, long continuations"),
    ("slop_score", "slop score (per 1,000 words)"),
    ("capability", "capability accuracy"),
)


def panels_of(result: dict) -> list[tuple[str, str]]:
    """(metric, panel title) for each metric present in ``result["rows"]``; the titles name the
    prompt split the result was measured on (``result["split"]``, 'val' when absent)."""
    split = result.get("split") or "val"
    return [(k, t.format(split=split)) for k, t in PANELS if any(k in r for r in result["rows"])]


def plot_eval(result: dict, path: str | Path, title: str | None = None) -> Path:
    """One panel per metric present in ``result["rows"]``, strength on x, one line per (direction, when)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = panels_of(result)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False)
    series = sorted({(r["direction"], r["when"]) for r in rows})
    for ax, (key, label) in zip(axes[0], panels, strict=False):
        for d, w in series:
            pts = sorted((r["strength"], r[key]) for r in rows if r["direction"] == d and r["when"] == w and key in r)
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", linestyle="--" if w == "auto" else "-", label=f"{d} ({w})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("strength")
        ax.grid(alpha=0.3)
        if key == "first_token_kl":
            ax.axhline(0.1, color="grey", linewidth=0.8, linestyle=":")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (parents created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
