"""Issue #15 experiment: one-sided and affine edits against frankly's projection, validation split only.

    python scripts/edit_variants.py --direction directions/shipped/qwen-demo-refusal.safetensors \
        --variants proj,relu,relu_m,ace --tokens 48          # about 20 min on two cores

Hooks of its own on the fp32 demo model (not frankly's: the variants other than ``proj`` are not
linear in the writer's output, so neither a LoRA adapter nor a bake could carry them); the
direction's own rows and writer weights.

variants, per writer output y with unit r_l and coefficient c = s * w:
  proj:     y - c (y.r) r
  relu:     y - c relu(y.r - b) r      (b = 0)
  relu_m:   b = mean over harmless train tokens of (y.r) for that writer
  ace:      y - c ((y.r) - m) r        (affine: m = harmless train mean)
  postK:    proj, but in the prompt only at its last K tokens (the chat template's closing tokens
            where K is small); every generated token is edited. The user's own words keep their
            unedited states, which is where most of the harmless KL could come from.
Measures refusals (48 greedy tokens, 65 harmful val) and first-token KL on harmless val (65)
and harmless_val_hard (100).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from directions.fileformat import load_direction  # noqa: E402
from directions.files import read_lines  # noqa: E402
from directions.forward import pad_id, pad_left  # noqa: E402
from directions.kl import first_token_kl  # noqa: E402
from directions.models import load_model  # noqa: E402
from directions.prompting import user_prompt_ids  # noqa: E402
from directions.refusal import is_refusal  # noqa: E402
from directions.writers import find_writers  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--direction", default=str(ROOT / "directions/shipped/qwen-demo-refusal.safetensors"))
ap.add_argument("--variants", default="proj,relu,relu_m,ace", help="comma list; NAME@S for strength S (default 1)")
ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per harmful prompt for the refusal judge")
ap.add_argument("--out", default="edit-variants.json")
args = ap.parse_args()
P = ROOT / "directions/prompts/refusal"
FILE, VARIANTS, TOK = args.direction, args.variants.split(","), args.tokens


lm = load_model("demo", weights="float")
model, tok = lm.model, lm.tokenizer
ds = load_direction(FILE)
writers = find_writers(model)
state = {"mode": None, "s": 0.0, "collect": None}
means = {}


def mk(wr):
    r = ds.directions[wr.layer]
    w = ds.writer_weight(wr.kind, wr.layer)
    key = wr.name

    def hook(mod, inp, out):
        if state["collect"] is not None:
            p = out.float() @ r
            m = state["mask"]
            state["collect"].setdefault(key, []).append(p[m.bool()].double())
            return None
        mode, s = state["mode"], state["s"]
        if mode is None or s == 0 or w == 0:
            return None
        c = s * w
        p = (out @ r).unsqueeze(-1)
        if mode == "proj":
            return out - c * p * r
        if mode.startswith("post"):
            k = int(mode[4:])
            edit = c * p * r
            if out.shape[1] > 1:  # a prompt pass: only its last k positions (left padding)
                edit[:, : out.shape[1] - k] = 0
            return out - edit
        if mode == "relu":
            return out - c * torch.relu(p) * r
        b = means[key]
        if mode == "relu_m":
            return out - c * torch.relu(p - b) * r
        if mode == "ace":
            return out - c * (p - b) * r
        raise ValueError(mode)

    return hook


for wr in writers:
    wr.module.register_forward_hook(mk(wr))


def ids_of(texts):
    return [user_prompt_ids(tok, t) for t in texts]


def batched_forward(prompts, bs=16):
    outs = []
    for i in range(0, len(prompts), bs):
        ids, mask, pos = pad_left(prompts[i : i + bs], pad_id(tok))
        state["mask"] = mask
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
        outs.append(o.logits[:, -1].float())
    return torch.cat(outs)


def generate(prompts, n, bs=16):
    texts = []
    for i in range(0, len(prompts), bs):
        ids, mask, _ = pad_left(prompts[i : i + bs], pad_id(tok))
        with torch.no_grad():
            g = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad_id(tok)
            )
        texts += tok.batch_decode(g[:, ids.shape[1] :], skip_special_tokens=True)
    return texts


def kl(base, ed):
    return first_token_kl(base, ed)[0]


t0 = time.time()
# harmless train means of each writer's projection, over all non-pad prompt tokens
state["collect"] = {}
batched_forward(ids_of(read_lines(P / "harmless_train.txt")))
means = {k: float(torch.cat(v).mean()) for k, v in state["collect"].items()}
state["collect"] = None
print(
    "means",
    {k.split("layers.")[-1]: round(v, 3) for k, v in list(means.items())[::6]},
    f"{time.time() - t0:.0f}s",
    flush=True,
)

harmful = ids_of(read_lines(P / "harmful_val.txt"))
hl = ids_of(read_lines(P / "harmless_val.txt"))
hh = ids_of(read_lines(P / "harmless_val_hard.txt"))
state["mode"] = None
base_l, base_h = batched_forward(hl), batched_forward(hh)
res = {}
for v in VARIANTS:
    mode, _, sv = v.partition("@")
    s = float(sv or 1.0)
    state["mode"], state["s"] = mode, s
    t = time.time()
    k1 = kl(base_l, batched_forward(hl))
    k2 = kl(base_h, batched_forward(hh))
    texts = generate(harmful, TOK)
    ref = sum(is_refusal(x) for x in texts)
    res[v] = {"refusals": ref, "kl_val": round(k1, 4), "kl_hard": round(k2, 4), "s": round(time.time() - t)}
    print(v, res[v], flush=True)
Path(args.out).write_text(json.dumps({"direction": FILE, "tokens": TOK, "results": res}, indent=1))
print(f"wrote {args.out}")
