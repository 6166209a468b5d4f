"""Heretic side by side with frankly on the held-out test split, in one command.

    python scripts/compare_heretic.py [--trials 24] [--out docs/heretic]

Four stages, each announced as it starts:

1. installs heretic-llm (1.4.0) in its own virtual environment (CPU torch first, so pip does
   not pull a CUDA build); skipped when it is already there;
2. runs Heretic on the demo model with the project's prompts: directions from
   ``refusal/harmful_train.txt`` / ``harmless_train.txt``, its trials scored on
   ``harmful_val.txt`` / ``harmless_val.txt`` with the project's refusal markers (the splits
   frankly's own selection uses), TPE for ``--trials`` trials, non-interactively
   (scripts/heretic_driver.py answers its questions), and exports the merged model. The
   export is cached under ``--heretic-dir`` by configuration, so a rerun skips this stage;
3. ``frankly eval --split test`` on the plain model, frankly ``always`` and ``when: auto`` at
   the direction's strength, and Heretic's model (``--edited-model``): refusals at
   ``--max-tokens`` generated tokens, full-vocabulary first-token KL and long-continuation
   KL against the plain model, capability. ``--skip-heretic`` re-measures only the frankly
   rows and keeps Heretic's row from the previous comparison JSON in ``--out``;
4. one table (stdout and ``comparison.md``), ``comparison.json`` and ``comparison.png``.

Which split each figure comes from is in the table's notes: refusals and first-token KL on
the test split (nothing tunes on it), long KL and capability on files that are not held out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from heretic_report import (
    HERETIC_VERSION,
    SPLIT_NOTES,
    comparison_rows,
    format_table,
    plot_comparison,
    previous_heretic,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "directions" / "prompts" / "refusal"
CACHE = Path(os.environ.get("FRANKLY_CACHE", Path.home() / ".cache" / "frankly"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Stages and files: see the module docstring."
    )
    p.add_argument("--trials", type=int, default=24, help="Heretic TPE trials (24 fit in about 30 minutes on 2 cores)")
    p.add_argument("--startup-trials", type=int, help="Heretic's random startup trials (default: a third of --trials)")
    p.add_argument(
        "--heretic-tokens", type=int, default=64, help="tokens Heretic generates per prompt to count refusals"
    )
    p.add_argument(
        "--heretic-minutes",
        type=float,
        help="stop Heretic's search after this long (Ctrl+C: it keeps the trials completed and exports)",
    )
    p.add_argument("--heretic-max-kl", type=float, help="choose Heretic's trial among those with KL <= this")
    p.add_argument("--seed", type=int, default=0, help="Heretic's random seed")
    p.add_argument("--direction", type=Path, help="frankly refusal direction (default: the shipped demo direction)")
    p.add_argument("--strength", type=float, help="frankly's strength (default: the file's own, else 1.0)")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens generated per harmful test prompt")
    p.add_argument("--n-long", type=int, default=8, help="long harmless prompts for the long-continuation KL")
    p.add_argument("--limit", type=int, help="at most N prompts per set (quick runs; not for reported figures)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "heretic", help="where the table, JSON and PNG go")
    p.add_argument("--venv", type=Path, default=CACHE / "heretic-venv", help="Heretic's virtual environment")
    p.add_argument("--heretic-dir", type=Path, default=CACHE / "heretic", help="Heretic runs, one folder per config")
    p.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed into the venv first")
    p.add_argument("--rerun-heretic", action="store_true", help="run Heretic again even if its export is cached")
    p.add_argument(
        "--skip-heretic",
        action="store_true",
        help="neither run nor re-measure Heretic: keep its row from the previous comparison JSON in --out",
    )
    p.add_argument("--dry-run", action="store_true", help="write Heretic's config, print the commands, run nothing")
    a = p.parse_args(argv)
    for k in ("trials", "heretic_tokens", "max_tokens", "n_long", "batch_size"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.startup_trials is None:
        a.startup_trials = max(1, a.trials // 3)
    if not 0 <= a.startup_trials <= a.trials:
        p.error("--startup-trials must be between 0 and --trials")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be >= 1")
    return a


# Heretic's configuration --------------------------------------------------------------------
def toml_dumps(data: dict) -> str:
    """TOML for flat values (str, bool, int, float, lists of str) and one level of tables."""

    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"no TOML for {type(v).__name__}")

    flat = [f"{k} = {val(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(flat) + "\n" + "\n".join(tables) + "\n"


def template_default_system(tokenizer) -> str | None:
    """The system prompt the chat template adds when a request has none (Qwen's), or None.

    frankly measures prompts without a system message; Heretic always sends one, so it gets
    the template's default to see the same tokens."""
    user = [{"role": "user", "content": "PROMPT"}]
    marker = "SYSTEM-SENTINEL"
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    with_sys = tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user], tokenize=False)
    head, _, tail = with_sys.partition(marker)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
        return plain[len(head) : len(plain) - len(tail)]
    return None


def heretic_config(args: argparse.Namespace, model_dir: str, system: str | None, markers: list[str]) -> dict:
    """Heretic 1.4.0 settings: the project's prompt files (plain text, one prompt per line), its
    refusal markers, no interactive step (batch size, response prefix and export strategy fixed)."""
    files = {k: str(PROMPTS / f"{k}.txt") for k in ("harmless_train", "harmful_train", "harmless_val", "harmful_val")}
    cfg = {
        "model": model_dir,
        "dtypes": ["float32"],
        "device_map": "auto",
        "batch_size": 128 if args.limit is None else args.limit,
        "max_response_length": args.heretic_tokens,
        "response_prefix": "",  # Qwen answers have no common prefix; skips Heretic's 200-generation probe
        "n_trials": args.trials,
        "n_startup_trials": args.startup_trials,
        "seed": args.seed,
        "study_checkpoint_dir": "checkpoints",  # Heretic runs in the config's folder
        "export_strategy": "merge",
        "refusal_markers": markers,
    }
    if system is not None:
        cfg["system_prompt"] = system
    split = {} if args.limit is None else {"split": f"[:{args.limit}]"}
    cfg["good_prompts"] = {"dataset": files["harmless_train"], **split}
    cfg["bad_prompts"] = {"dataset": files["harmful_train"], **split}
    cfg["good_evaluation_prompts"] = {"dataset": files["harmless_val"], **split}
    cfg["bad_evaluation_prompts"] = {"dataset": files["harmful_val"], **split}
    return cfg


def config_key(config_text: str) -> str:
    return hashlib.sha256((HERETIC_VERSION + config_text).encode()).hexdigest()[:12]


def write_heretic_config(args: argparse.Namespace, model_dir: str) -> tuple[Path, str]:
    """Write ``config.toml`` into this configuration's run folder; returns (folder, text)."""
    from transformers import AutoTokenizer

    from directions.refusal import load_markers

    system = template_default_system(AutoTokenizer.from_pretrained(model_dir))
    text = toml_dumps(heretic_config(args, model_dir, system, list(load_markers())))
    work = args.heretic_dir / config_key(text)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.toml").write_text(text)
    return work, text


# Stage 1 and 2: Heretic -----------------------------------------------------------------------
def run_logged(
    cmd: list[str], log: Path, cwd: Path | None = None, show=lambda line: True, interrupt_after: float | None = None
) -> bool:
    """Run ``cmd``, every output line to ``log``, the lines ``show`` accepts to stdout; raise on failure.

    ``interrupt_after`` seconds: send one SIGINT (Heretic's Ctrl+C: it stops searching and keeps the
    trials done) unless a line with ``Optimization finished`` came first. Returns whether it was sent."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    sent = threading.Event()
    with (
        log.open("a") as f,
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc,
    ):

        def interrupt() -> None:
            sent.set()
            print(f"   time budget reached: interrupting the search (SIGINT to {proc.pid})", flush=True)
            proc.send_signal(signal.SIGINT)

        timer = threading.Timer(interrupt_after, interrupt) if interrupt_after else None
        if timer:
            timer.daemon = True
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if timer and "Optimization finished" in line:
                timer.cancel()
            if show(line):
                print("   " + line.rstrip(), flush=True)
        if timer:
            timer.cancel()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return sent.is_set()


def ensure_venv(args: argparse.Namespace, log: Path) -> Path:
    py = args.venv / "bin" / "python"
    check = [str(py), "-c", "import importlib.metadata as m; print(m.version('heretic-llm'))"]
    if py.is_file() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == HERETIC_VERSION:
        print(f"   heretic-llm {HERETIC_VERSION} already in {args.venv}")
        return py
    run_logged([sys.executable, "-m", "venv", str(args.venv)], log)
    for req in (args.torch, f"heretic-llm=={HERETIC_VERSION}"):
        print(f"   pip install {req} (log: {log})", flush=True)
        run_logged([str(py), "-m", "pip", "install", req], log, show=lambda line: line.startswith("Successfully"))
    return py


def _heretic_line(line: str) -> bool:
    keys = (
        "Running trial",
        "KL divergence:",
        "Refusals:",
        "Initial refusals",
        "Elapsed",
        "[driver]",
        "Error",
        "Traceback",
    )
    return any(k in line for k in keys)


def run_heretic(args: argparse.Namespace, py: Path, work: Path) -> tuple[Path, dict]:
    model, report = work / "model", work / "report.json"
    if (model / "config.json").is_file() and report.is_file() and not args.rerun_heretic:
        print(f"   reusing Heretic's export in {model} (same config; --rerun-heretic runs it again)")
        return model, json.loads(report.read_text())
    if args.rerun_heretic:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    driver = ROOT / "scripts" / "heretic_driver.py"
    cmd = [str(py), str(driver), "--save-dir", str(model), "--report", str(report)]
    if args.heretic_max_kl is not None:
        cmd += ["--max-kl", str(args.heretic_max_kl)]
    t0 = time.monotonic()
    budget = args.heretic_minutes * 60 if args.heretic_minutes else None
    stopped = run_logged(cmd, work / "heretic.log", cwd=work, show=_heretic_line, interrupt_after=budget)
    rep = json.loads(report.read_text())
    rep["wall_s"] = round(time.monotonic() - t0, 1)
    rep["stopped_by_time_budget"] = stopped
    report.write_text(json.dumps(rep, indent=2))
    return model, rep


# Stage 3: frankly eval on the test split --------------------------------------------------------
STRENGTH_KEYS = ("strength", "recommended_strength", "shipped_strength", "default_strength")


def direction_strength(path: Path) -> float:
    """The strength a direction file recommends in its metadata (first of STRENGTH_KEYS), else 1.0."""
    from directions.fileformat import load_direction

    md = load_direction(path).metadata
    for k in STRENGTH_KEYS:
        try:
            return float(md[k])
        except (KeyError, TypeError, ValueError):
            continue
    return 1.0


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def eval_settings(args: argparse.Namespace) -> dict:
    """What a Heretic row depends on besides its model: a kept row is reused only under the same settings."""
    return {"split": "test", "max_tokens": args.max_tokens, "n_long": args.n_long, "limit": args.limit}


def eval_command(
    args: argparse.Namespace, direction: Path, strength: float, heretic: Path | None, out: Path
) -> list[str]:
    cmd = [sys.executable, "-m", "server.cli", "eval", "--model", "demo", "--direction", f"refusal={direction}"]
    cmd += ["--strengths", f"{strength:g}", "--conditional", "--split", "test", "--max-tokens", str(args.max_tokens)]
    cmd += [
        "--n-long",
        str(args.n_long),
        "--batch-size",
        str(args.batch_size),
        "--out-dir",
        str(out),
        "--prefix",
        "eval-test",
    ]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    if heretic is not None:
        cmd += ["--edited-model", f"heretic={heretic}"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from directions.demo import shipped_demo_paths
    from directions.models import locate

    t0, walls = time.monotonic(), {}
    direction = args.direction or shipped_demo_paths()["refusal"]
    strength = args.strength if args.strength is not None else direction_strength(direction)
    model_dir, _ = locate("demo")
    args.out.mkdir(parents=True, exist_ok=True)
    heretic_model, heretic, kept_row = None, {}, None
    if args.skip_heretic:
        print("[1/4] Heretic venv: skipped (--skip-heretic)\n[2/4] Heretic run: skipped (--skip-heretic)", flush=True)
        kept_row, heretic = previous_heretic(args.out, eval_settings(args))
    else:
        print(f"[1/4] Heretic {HERETIC_VERSION} virtual environment: {args.venv}", flush=True)
        work, _ = write_heretic_config(args, model_dir)
        if args.dry_run:
            print(
                f"   config: {work / 'config.toml'}\n   eval: {' '.join(eval_command(args, direction, strength, work / 'model', args.out))}"
            )
            return 0
        py = ensure_venv(args, args.heretic_dir / "venv-install.log")
        walls["venv_s"] = round(time.monotonic() - t0, 1)
        print(f"[2/4] Heretic on {model_dir}: {args.trials} trials, config {work / 'config.toml'}", flush=True)
        heretic_model, report = run_heretic(args, py, work)
        walls["heretic_s"] = round(time.monotonic() - t0 - walls["venv_s"], 1)
        heretic = {
            "version": HERETIC_VERSION,
            "run_dir": str(work),
            "config": (work / "config.toml").read_text(),
            **report,
        }
    print(f"[3/4] frankly eval on the test split: {direction} at strength {strength:g}", flush=True)
    t3 = time.monotonic()
    cmd = eval_command(args, direction, strength, heretic_model, args.out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        raise SystemExit(f"frankly eval failed: {' '.join(cmd)}")
    walls["eval_s"] = round(time.monotonic() - t3, 1)
    result = json.loads((args.out / "eval-test.json").read_text())
    heretic_row = kept_row or next((r for r in result["rows"] if r["when"] == "weights"), None)
    rows = comparison_rows(result, strength, heretic_row)
    print("[4/4] comparison", flush=True)
    table = format_table(rows)
    notes = "\n".join(f"- {n}" for n in SPLIT_NOTES)
    kept = " (Heretic's row kept from the previous run: --skip-heretic)" if kept_row else ""
    (args.out / "comparison.md").write_text(f"{table}\n\n{notes}{kept}\n")
    summary = {
        "command": "python scripts/compare_heretic.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "split_notes": SPLIT_NOTES,
        "sets": result["sets"],
        "eval_settings": eval_settings(args),
        "frankly": {"direction": str(direction), "strength": strength, "sha256": _sha256(direction)},
        "heretic": {k: v for k, v in heretic.items() if k != "trials"} | {"trials": heretic.get("trials", [])},
        "heretic_eval_row": heretic_row,
        "heretic_row_kept": bool(kept_row),
        "eval_command": " ".join(cmd),
        "wall_s": {**walls, "total_s": round(time.monotonic() - t0, 1)},
    }
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=2))
    png = plot_comparison(rows, heretic.get("trials", []), heretic.get("chosen"), args.out / "comparison.png")
    print(table + "\n\n" + notes + kept)
    print(f"\nwrote {args.out / 'comparison.md'}, {args.out / 'comparison.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
