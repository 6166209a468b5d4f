"""``frankly calibrate``: (re)calibrate the condition of an existing direction file.

Conditional ablation (``when: auto``) needs a detection vector, a layer and a
threshold. ``frankly extract`` calibrates them as its last step; this command
does only that step for a file that already exists, in a few minutes (prefill
passes only, no generation): with other prompt sets, another firing-rate
target, or after a change in how detection is chosen. The ablation directions
themselves are not touched.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from directions.files import read_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: 'demo', a directory, a .gguf file or a hub id")
    p.add_argument("--direction", required=True, help="the direction file to calibrate")
    p.add_argument("--positive", required=True, help="train prompts that should fire (harmful / slop-inducing)")
    p.add_argument("--negative", required=True, help="train prompts that should not fire (harmless / plain)")
    p.add_argument("--val-positive", required=True, help="validation prompts that should fire")
    p.add_argument("--val-negative", required=True, help="validation prompts that should not fire (sets the threshold)")
    p.add_argument("--system-positive", help="system prompts for the positive side; prompt k gets line k mod n")
    p.add_argument("--system-negative", help="system prompts for the negative side")
    p.add_argument("--fpr", type=float, default=0.02, help="max firing rate on --val-negative (default 0.02)")
    p.add_argument("--layers", help="candidate detection layers, e.g. '8-20' (default: middle 20%%-80%% of depth)")
    p.add_argument("--out", help="output file (default: rewrite --direction in place, atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def run(args: argparse.Namespace) -> int:
    from directions.detection import calibrate_detection
    from directions.extract import build_prompts, collect_states, default_layers, parse_layers
    from directions.fileformat import load_direction, save_direction
    from directions.files import sha256_file
    from directions.models import load_model

    t0 = time.monotonic()
    ds = load_direction(args.direction)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    ds.check_fits(lm.model.config, args.direction)
    n_layers = lm.model.config.num_hidden_layers
    layers = parse_layers(args.layers, n_layers) if args.layers else default_layers(n_layers)
    sys_p, sys_n = (read_lines(p) if p else None for p in (args.system_positive, args.system_negative))

    def states(path, systems, desc):
        return collect_states(
            lm.model, lm.tokenizer, build_prompts(lm.tokenizer, read_lines(path), systems), args.batch_size, desc=desc
        )

    tr_p = states(args.positive, sys_p, "train activations (+)")
    tr_n = states(args.negative, sys_n, "train activations (-)")
    va_p = states(args.val_positive, sys_p, "val activations (+)")
    va_n = states(args.val_negative, sys_n, "val activations (-)")
    chosen = int(ds.metadata.get("chosen_layer", layers[len(layers) // 2]))
    det = calibrate_detection(ds.directions[chosen], va_p, va_n, layers, args.fpr, prefer=chosen, check=(tr_p, tr_n))
    ds.detect_vector, ds.detect_layer, ds.detect_threshold = det.vector, det.layer, det.threshold
    sel = json.loads(ds.metadata.get("selection", "{}") or "{}")
    if "detection" in sel:
        sel["previous_detection"] = {k: v for k, v in sel["detection"].items() if k not in ("layers", "candidates")}
    det.record["calibrated_by"] = "frankly calibrate"
    det.record["prompt_hashes"] = {
        role: {"file": Path(p).name, "sha256": sha256_file(p)}
        for role, p in (
            ("positive", args.positive),
            ("negative", args.negative),
            ("val_positive", args.val_positive),
            ("val_negative", args.val_negative),
        )
    }
    sel["detection"] = det.record
    ds.metadata["selection"] = json.dumps(sel)
    ds.metadata["detect_calibrated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = save_direction(ds, args.out or args.direction, config=lm.model.config)

    print(f"{'kind':>10} {'layer':>5} {'threshold':>10} {'fire +':>7} {'fire -':>7}")
    top = sorted(det.record["candidates"], key=lambda c: (-c["fire_pos"], c["fire_neg"]))[:10]
    for c in top:
        mark = "  <- chosen" if (c["kind"], c["layer"]) == (det.record["chosen_kind"], det.layer) else ""
        print(
            f"{c['kind']:>10} {c['layer']:>5} {c['threshold']:>10.4f} {c['fire_pos']:>7.1%} {c['fire_neg']:>7.1%}{mark}"
        )
    r = det.record
    print(
        f"\nwrote {out}: {r['chosen_kind']} at layer {r['chosen_layer']}, threshold {r['threshold']}; "
        f"validation fires on {r['val_fire_pos']:.1%} of positives and {r['val_fire_neg']:.1%} of negatives "
        f"(train: {r['train_fire_pos']:.1%} / {r['train_fire_neg']:.1%}) in {time.monotonic() - t0:.0f} s"
    )
    return 0
