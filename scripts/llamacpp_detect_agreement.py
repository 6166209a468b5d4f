#!/usr/bin/env python
"""Does the llama.cpp engine's condition fire where the torch engine's does?

For each conditional direction, scores the same prompts twice: the torch engine's way
(fp32 transformers, ``hidden_states[L]`` at the last prompt token, the input of decoder
layer ``L``) and the llama.cpp engine's way (the Q4_K_M GGUF, the residual stream read by
:class:`directions.llamacpp_probe.LayerProbe` on a detector context). Both are dotted with
the direction's detect vector and compared with its threshold. Prints agreement on
fired/quiet, the score differences and correlation; writes JSON and a scatter PNG.

    python scripts/llamacpp_detect_agreement.py                 # refusal and slop, 32 + 32 prompts each
    python scripts/llamacpp_detect_agreement.py --n 16 --directions refusal
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.fileformat import load_direction  # noqa: E402
from directions.files import read_lines  # noqa: E402
from directions.llamacpp import LlamaCpp  # noqa: E402
from directions.llamacpp_probe import LayerProbe  # noqa: E402
from directions.models import load_model  # noqa: E402
from directions.prompting import user_prompt_ids  # noqa: E402
from directions.refusal import PROMPTS_DIR  # noqa: E402

SHIPPED = ROOT / "directions" / "shipped"
# positives (the condition should fire) and negatives (it should stay quiet), validation split
SETS = {
    "refusal": (PROMPTS_DIR / "refusal" / "harmful_val.txt", PROMPTS_DIR / "refusal" / "harmless_val.txt"),
    "slop": (PROMPTS_DIR / "slop" / "creative_val.txt", PROMPTS_DIR / "refusal" / "harmless_val.txt"),
}


def torch_states(lm, prompts: list[list[int]], layer: int) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for ids in tqdm(prompts, desc=f"torch fp32, layer {layer}", leave=False):
            # the decoder stack only: the LM head's 151k logits per position are not needed here
            hs = lm.model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            out.append(hs[layer][0, -1].float().numpy())
    return np.stack(out)


def llamacpp_states(gguf: str, prompts: list[list[int]], layer: int, threads: int | None) -> np.ndarray:
    probe = LayerProbe([layer])
    out = []
    with LlamaCpp(gguf, n_ctx=2048, n_threads=threads) as ll:
        det = ll.new_context(2048, 1, probe=probe)
        for ids in tqdm(prompts, desc=f"llama.cpp Q4_K_M, layer {layer}", leave=False):
            det.clear(0)
            probe.reset()
            det.prefill(ids, 0)
            if layer not in probe.captured:
                raise RuntimeError(f"the probe did not see layer {layer} (errors: {probe.errors})")
            out.append(probe.captured[layer])
    return np.stack(out)


def compare(name: str, lm, n: int, threads: int | None) -> dict:
    ds = load_direction(SHIPPED / f"qwen-demo-{name}.safetensors", name=name)
    if not ds.has_probe:
        return {"direction": name, "skipped": "no calibrated condition"}
    pos_file, neg_file = SETS[name]
    texts = {"pos": read_lines(pos_file)[:n], "neg": read_lines(neg_file)[:n]}
    prompts = [user_prompt_ids(lm.tokenizer, t) for k in ("pos", "neg") for t in texts[k]]
    labels = ["pos"] * len(texts["pos"]) + ["neg"] * len(texts["neg"])
    v = ds.detect_vector.float().numpy()
    L, thr = int(ds.detect_layer), float(ds.detect_threshold)
    st = torch_states(lm, prompts, L) @ v
    sl = llamacpp_states(str(lm.gguf), prompts, L, threads) @ v
    ft, fl = st > thr, sl > thr
    d = sl - st
    return {
        "direction": name,
        "layer": L,
        "threshold": thr,
        "prompts": {"pos": len(texts["pos"]), "neg": len(texts["neg"]), "pos_file": str(pos_file.name)},
        "agreement": float(np.mean(ft == fl)),
        "disagreements": int(np.sum(ft != fl)),
        "fired_torch": {k: int(np.sum(ft[np.array(labels) == k])) for k in ("pos", "neg")},
        "fired_llamacpp": {k: int(np.sum(fl[np.array(labels) == k])) for k in ("pos", "neg")},
        "score_diff_mean": float(d.mean()),
        "score_diff_abs_mean": float(np.abs(d).mean()),
        "score_diff_abs_max": float(np.abs(d).max()),
        "score_std_torch": float(st.std()),
        "score_corr": float(np.corrcoef(st, sl)[0, 1]),
        "min_margin_torch": float(np.min(np.abs(st - thr))),
        "scores": {"torch": st.tolist(), "llamacpp": sl.tolist(), "labels": labels},
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "scores" in r]
    fig, axes = plt.subplots(1, len(done), figsize=(5 * len(done), 4.6), squeeze=False)
    for ax, r in zip(axes[0], done, strict=True):
        st, sl, lab = (np.array(r["scores"][k]) for k in ("torch", "llamacpp", "labels"))
        for k, c in (("pos", "tab:red"), ("neg", "tab:blue")):
            m = lab == k
            ax.scatter(st[m], sl[m], s=14, c=c, label=f"{k} ({m.sum()})")
        lo, hi = min(st.min(), sl.min()), max(st.max(), sl.max())
        ax.plot([lo, hi], [lo, hi], c="0.6", lw=0.8)
        ax.axvline(r["threshold"], c="k", ls="--", lw=0.8)
        ax.axhline(r["threshold"], c="k", ls="--", lw=0.8)
        ax.set(
            xlabel="torch fp32 score",
            ylabel="llama.cpp Q4_K_M score",
            title=f"{r['direction']} (layer {r['layer']}): agree {r['agreement']:.0%}, r={r['score_corr']:.3f}",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--directions", default="refusal,slop", help="shipped demo directions to compare")
    p.add_argument("--n", type=int, default=32, help="prompts per set (positives and negatives)")
    p.add_argument("--threads", type=int, help="llama.cpp and torch threads (default: all cores)")
    p.add_argument("--out", default="bench-results/detect-agreement", help="output folder (JSON, PNG)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("demo")
    results = [compare(n, lm, args.n, args.threads) for n in args.directions.split(",")]
    for r in results:
        brief = {k: v for k, v in r.items() if k != "scores"}
        print(json.dumps(brief, indent=1))
    (out / "detect_agreement.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "detect_agreement.png")
    print(f"wrote {out / 'detect_agreement.json'} and {out / 'detect_agreement.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
