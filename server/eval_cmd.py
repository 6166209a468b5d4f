"""``frankly eval``: refusal rate, first-token KL, long-continuation KL, slop score and capability
over strengths (and with ``--conditional`` the same in ``when="auto"`` mode); table, JSON and PNG.

The measurements are the library's (:mod:`directions.evaluate`); this command wires them to
the torch engine, so generations run exactly as the server runs them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from directions.fileformat import DirectionFileError
from directions.models import ModelLoadError
from directions.splits import EVAL_SPLITS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model spec: 'demo', a directory, a .gguf file or a hub id")
    p.add_argument(
        "--direction",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a direction file to evaluate (repeatable; needed unless --edited-model is given)",
    )
    p.add_argument("--strengths", default="0,0.5,1.0", help="comma-separated strengths (0 = unedited)")
    p.add_argument(
        "--edited-model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another model's weights (a weight-edited copy of --model, e.g. Heretic's export or a bake) measured "
        "on the same prompts, its KLs against --model: one row when='weights' (repeatable)",
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="also measure when='auto' (conditional ablation) and how often the condition fires",
    )
    p.add_argument(
        "--max-tokens", type=int, default=100, help="tokens generated for refusal and slop (>= 100 for final figures)"
    )
    p.add_argument("--long-tokens", type=int, default=256, help="length of the unedited long continuations")
    p.add_argument("--n-long", type=int, default=8, help="long harmless prompts teacher-forced for the long KL")
    p.add_argument("--capability-tokens", type=int, default=48, help="tokens generated per capability question")
    p.add_argument("--limit", type=int, help="at most N prompts per set (quick runs)")
    p.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="val",
        help="harmful/harmless prompt split: 'val' (default, what selection uses) or 'test' "
        "(held out from all selection and calibration; for final reported figures only)",
    )
    p.add_argument(
        "--all-metrics",
        action="store_true",
        help="measure every metric for every direction (default: the ones of its objective)",
    )
    p.add_argument("--out-dir", required=True, help="where eval JSON and PNG go")
    p.add_argument("--prefix", default="eval", help="file name prefix of the outputs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--weights",
        choices=("float", "int8"),
        default="float",
        help="weights format of --model, as frankly serve --weights (int8: CPU); a non-float format also "
        "reports first-token KL against the float32 model on the harmless prompts",
    )


def _fmt(v, pct=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else (f"{v:.4f}" if isinstance(v, float) else str(v))


def format_table(result: dict) -> str:
    cols = [
        ("direction", "direction", False),
        ("when", "when", False),
        ("strength", "s", False),
        ("refusal_rate", "refusal", True),
        ("refusals", "ref/N", False),
        ("non_answers", "non-ans", False),
        ("first_token_kl", "KL@1", False),
        ("long_kl", "KL long", False),
        ("slop_score", "slop/1k", False),
        ("capability", "capab.", True),
    ]
    head = [c[1] for c in cols] + ["fired (harmful/harmless/long/creative/capab.)"]
    lines = []
    for r in result["rows"]:
        cells = [_fmt(r.get(k), pct) for k, _, pct in cols]
        if "refusals" in r:
            cells[4] = f"{r['refusals']}/{r['n_harmful']}"
        f = r.get("fired")
        cells.append(
            "/".join(_fmt(f.get(k), True) for k in ("harmful", "harmless", "long", "creative", "capability"))
            if f
            else "-"
        )
        lines.append(cells)
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(x) for x in lines)])


def _edited_models(args: argparse.Namespace, lm) -> dict:
    """``--edited-model NAME=PATH`` models, loaded like --model, each as Measurements without directions."""
    from directions.measure import Measurements
    from directions.models import load_model
    from directions.weights_eval import same_vocabulary
    from server.engine.offline import engine_generate

    out = {}
    for spec in args.edited_model:
        name, _, path = spec.partition("=")
        if not name or not path or name in out:
            raise ValueError(f"bad --edited-model {spec!r}: expected NAME=PATH with a new NAME")
        em = load_model(path, device=args.device, dtype=args.dtype)
        if not same_vocabulary(lm.model, em.model):
            raise ValueError(f"--edited-model {name}: its vocabulary differs from --model's; it is not a copy of it")
        gen = engine_generate(em.model, em.tokenizer, batch_size=args.batch_size)
        out[name] = Measurements(em.model, em.tokenizer, gen, {}, batch_size=args.batch_size)
    return out


def _weights_kl(args: argparse.Namespace, m, sets) -> dict:
    """First-token KL(P_float32 || P_weights) on the harmless prompts: what the weights format costs."""
    from directions.kl import first_token_kl
    from directions.measure import Measurements
    from directions.models import load_model

    ref = load_model(args.model, device=args.device, dtype="float32")
    rm = Measurements(ref.model, ref.tokenizer, batch_size=args.batch_size)
    prompts = m.ids(sets.harmless)
    mean, per = first_token_kl(rm.base_logits(prompts), m.base_logits(prompts))
    return {
        "weights": args.weights,
        "reference": "float32",
        "n": len(prompts),
        "first_token_kl_mean": mean,
        "first_token_kl_max": max(per, default=0.0),
        "first_token_kl_per_prompt": per,
    }


def run(args: argparse.Namespace) -> int:
    from directions.evaluate import EvalConfig, EvalSets, evaluate
    from directions.measure import Measurements
    from directions.models import load_model
    from directions.plots import plot_eval
    from directions.quant import QuantizationError
    from directions.specs import check_fit, load_directions, parse_direction_specs
    from server.engine.offline import engine_generate

    t0 = time.monotonic()
    try:
        strengths = [float(x) for x in args.strengths.split(",") if x.strip()]
    except ValueError:
        print(f"frankly eval: bad --strengths {args.strengths!r}", file=sys.stderr)
        return 2
    if 0.0 not in strengths:
        strengths = [0.0, *strengths]
    if not args.direction and not args.edited_model:
        print("frankly eval: give --direction NAME=PATH and/or --edited-model NAME=PATH", file=sys.stderr)
        return 2
    try:
        paths = parse_direction_specs(args.direction)
        directions = load_directions(paths)  # a bad file fails before the model loads
        lm = load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights)
        check_fit(directions, lm.model.config, paths)
    except (DirectionFileError, QuantizationError) as e:
        print(f"frankly eval: {e}", file=sys.stderr)
        return 2
    sets = EvalSets.load(limit=args.limit, n_long=args.n_long, split=args.split)
    cfg = EvalConfig(
        strengths=strengths,
        conditional=args.conditional,
        max_tokens=args.max_tokens,
        long_tokens=args.long_tokens,
        capability_tokens=args.capability_tokens,
        all_metrics=args.all_metrics,
    )
    generate = engine_generate(lm.model, lm.tokenizer, batch_size=args.batch_size)
    m = Measurements(lm.model, lm.tokenizer, generate, directions, batch_size=args.batch_size)
    try:
        edited = _edited_models(args, lm)
    except (ValueError, ModelLoadError) as e:
        print(f"frankly eval: {e}", file=sys.stderr)
        return 2
    result = evaluate(m, sets, list(directions), cfg, edited)
    if args.weights != "float":
        result["weights_vs_float32"] = _weights_kl(args, m, sets)
    result["model"] = args.model
    result["direction_files"] = {n: spec.partition("=")[2] for n, spec in zip(directions, args.direction, strict=True)}
    result["edited_models"] = dict(s.partition("=")[::2] for s in args.edited_model)
    result["command"] = "frankly eval " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "frankly eval"
    result["total_wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{args.prefix}.json"
    jpath.write_text(json.dumps(result, indent=2))
    ppath = plot_eval(result, out / f"{args.prefix}.png", title=f"frankly eval: {args.model}")
    print(format_table(result))
    tokens = result["config"]["long_continuation_tokens"]
    print(f"\nsplit: {result['split']}  sets: {result['sets']}  long continuation tokens: {tokens}")
    if "weights_vs_float32" in result:
        w = result["weights_vs_float32"]
        print(
            f"{w['weights']} weights vs float32, first-token KL on {w['n']} harmless prompts: "
            f"mean {w['first_token_kl_mean']:.4f}, max {w['first_token_kl_max']:.4f}"
        )
    print(f"wrote {jpath} and {ppath} in {result['total_wall_s']:.0f} s")
    return 0
