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
3. ``frankly eval --split test`` twice: the plain model, frankly ``always`` and ``when: auto``
   at the direction's strength (``eval-frankly.json``); Heretic's model against the plain
   model (``--edited-model``, ``eval-heretic.json``): refusals at ``--max-tokens`` generated
   tokens, full-vocabulary first-token KL and long-continuation KL, capability. Each is
   skipped when ``--out`` holds its result from the same command on the same files (a
   ``.key`` beside it), so after a direction is re-shipped a rerun measures only frankly's
   rows; ``--skip-heretic`` also skips stages 1 and 2 (the export must exist);
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
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "directions" / "prompts" / "refusal"
CACHE = Path(os.environ.get("FRANKLY_CACHE", Path.home() / ".cache" / "frankly"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Stages and files: see the module docstring."
    )
    p.add_argument(
        "--trials",
        type=int,
        default=24,
        help="Heretic TPE trials (24: about 30 min on a quiet 2-core machine, estimated from 16 in 19 min)",
    )
    p.add_argument("--startup-trials", type=int, help="Heretic's random startup trials (default: a third of --trials)")
    p.add_argument(
        "--heretic-tokens", type=int, default=64, help="tokens Heretic generates per prompt to count refusals"
    )
    p.add_argument(
        "--heretic-prompts",
        type=int,
        help="score Heretic's trials on the first N prompts of each val file (default: all 65; fewer = faster trials)",
    )
    p.add_argument(
        "--heretic-minutes",
        type=float,
        help="stop Heretic's search after this long (Ctrl+C: it keeps the trials completed and exports)",
    )
    p.add_argument(
        "--heretic-export-only",
        action="store_true",
        help="run no more Heretic trials: export the best of those an interrupted run left (it still recomputes "
        "its directions and baselines first)",
    )
    p.add_argument("--heretic-max-kl", type=float, help="choose Heretic's trial among those with KL <= this")
    p.add_argument("--seed", type=int, default=0, help="Heretic's random seed")
    p.add_argument("--direction", type=Path, help="frankly refusal direction (default: the shipped demo direction)")
    p.add_argument("--strength", type=float, help="frankly's strength (default: the file's own, else 1.0)")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens generated per harmful test prompt")
    p.add_argument("--n-long", type=int, default=8, help="long harmless prompts for the long-continuation KL")
    p.add_argument(
        "--limit", type=int, help="frankly eval: at most N prompts per set (quick runs; not for reported figures)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "heretic", help="where the table, JSON and PNG go")
    p.add_argument("--venv", type=Path, default=CACHE / "heretic-venv", help="Heretic's virtual environment")
    p.add_argument("--heretic-dir", type=Path, default=CACHE / "heretic", help="Heretic runs, one folder per config")
    p.add_argument("--torch", default="torch==2.13.0", help="torch requirement installed into the venv first")
    p.add_argument("--rerun-heretic", action="store_true", help="run Heretic again even if its export is cached")
    p.add_argument(
        "--skip-heretic",
        action="store_true",
        help="skip stages 1-2: use the Heretic export a previous run left for this configuration",
    )
    p.add_argument(
        "--reuse-heretic-results",
        action="store_true",
        help="measure only frankly again: take Heretic's row and search report from --out's eval-heretic.json and "
        "comparison.json of an earlier run (its export need not be on this machine; the table says so)",
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
    for k in ("limit", "heretic_prompts"):
        if getattr(a, k) is not None and getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
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
        "batch_size": 128,
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
    cfg["good_prompts"] = {"dataset": files["harmless_train"]}
    cfg["bad_prompts"] = {"dataset": files["harmful_train"]}
    split_eval = {} if args.heretic_prompts is None else {"split": f"[:{args.heretic_prompts}]"}
    cfg["good_evaluation_prompts"] = {"dataset": files["harmless_val"], **split_eval}
    cfg["bad_evaluation_prompts"] = {"dataset": files["harmful_val"], **split_eval}
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
    if args.heretic_export_only:
        cmd += ["--export-only"]
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


def _eval_args(args: argparse.Namespace, out: Path, prefix: str) -> list[str]:
    cmd = ["--split", "test", "--max-tokens", str(args.max_tokens), "--n-long", str(args.n_long)]
    cmd += ["--batch-size", str(args.batch_size), "--out-dir", str(out), "--prefix", prefix]
    return cmd + (["--limit", str(args.limit)] if args.limit is not None else [])


def frankly_eval_command(args: argparse.Namespace, direction: Path, strength: float, out: Path) -> list[str]:
    """``frankly eval`` of the direction: the plain model (strength 0), ``always`` and ``when: auto``."""
    cmd = [sys.executable, "-m", "server.cli", "eval", "--model", "demo", "--direction", f"refusal={direction}"]
    return [*cmd, "--strengths", f"{strength:g}", "--conditional", *_eval_args(args, out, "eval-frankly")]


def heretic_eval_command(args: argparse.Namespace, heretic_model: Path, out: Path) -> list[str]:
    """``frankly eval`` of Heretic's weights against the plain model (no direction: only its row)."""
    cmd = [sys.executable, "-m", "server.cli", "eval", "--model", "demo", "--edited-model", f"heretic={heretic_model}"]
    return cmd + _eval_args(args, out, "eval-heretic")


def _stamp(path: Path) -> list:
    """What identifies a file's content cheaply enough for a cache key (sha256 of small files, else size+mtime)."""
    st = path.stat()
    return [path.name, _sha256(path)] if st.st_size < 64 << 20 else [path.name, st.st_size, st.st_mtime_ns]


def cached_eval(cmd: list[str], inputs: list[Path], out: Path, prefix: str) -> tuple[dict, bool]:
    """Run ``cmd`` (a ``frankly eval``) unless ``out/<prefix>.json`` came from the same command on the same
    input files (``<prefix>.key``); returns (result, reused)."""
    key = hashlib.sha256(json.dumps([cmd[1:], [_stamp(p) for p in inputs]]).encode()).hexdigest()
    jpath, kpath = out / f"{prefix}.json", out / f"{prefix}.key"
    if jpath.is_file() and kpath.is_file() and kpath.read_text().strip() == key:
        print(f"   reusing {jpath} (same command and inputs)", flush=True)
        return json.loads(jpath.read_text()), True
    kpath.unlink(missing_ok=True)
    print("   " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
        raise SystemExit(f"frankly eval failed: {' '.join(cmd)}")
    kpath.write_text(key + "\n")
    return json.loads(jpath.read_text()), False


def earlier_heretic_results(out: Path) -> tuple[dict, dict, str]:
    """Heretic's eval, search report and eval command from an earlier run's files in ``out``."""
    ev, comp = out / "eval-heretic.json", out / "comparison.json"
    if not ev.is_file() or not comp.is_file():
        raise SystemExit(f"--reuse-heretic-results: {ev} and {comp} from an earlier run are needed; run without it")
    earlier = json.loads(comp.read_text())
    her = json.loads(ev.read_text())
    if not any(r.get("when") == "weights" for r in her.get("rows", [])):
        raise SystemExit(f"--reuse-heretic-results: {ev} has no Heretic row")
    cmds = earlier.get("eval_commands") or ["", ""]
    heretic = {**earlier.get("heretic", {}), "reused_from": earlier.get("created")}
    return her, heretic, cmds[-1]


def heretic_stage(args: argparse.Namespace, model_dir: str, t0: float, walls: dict) -> tuple[Path, dict]:
    """Stages 1 and 2 (or, with --skip-heretic, the export a previous run left for this config)."""
    work, _ = write_heretic_config(args, model_dir)
    model, report = work / "model", work / "report.json"
    if args.skip_heretic:
        print("[1/4] Heretic venv: skipped (--skip-heretic)\n[2/4] Heretic run: skipped (--skip-heretic)", flush=True)
        if not (model / "config.json").is_file() or not report.is_file():
            raise SystemExit(f"--skip-heretic: no Heretic export for this configuration in {work}; run without it")
        print(f"   Heretic's export from {model}", flush=True)
        rep = json.loads(report.read_text())
    else:
        print(f"[1/4] Heretic {HERETIC_VERSION} virtual environment: {args.venv}", flush=True)
        py = ensure_venv(args, args.heretic_dir / "venv-install.log")
        walls["venv_s"] = round(time.monotonic() - t0, 1)
        print(f"[2/4] Heretic on {model_dir}: {args.trials} trials, config {work / 'config.toml'}", flush=True)
        model, rep = run_heretic(args, py, work)
        walls["heretic_s"] = round(time.monotonic() - t0 - walls["venv_s"], 1)
    return model, {
        "version": HERETIC_VERSION,
        "run_dir": str(work),
        "config": (work / "config.toml").read_text(),
        **rep,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from directions.demo import shipped_demo_paths
    from directions.models import locate

    t0, walls = time.monotonic(), {}
    direction = Path(args.direction or shipped_demo_paths()["refusal"])
    strength = args.strength if args.strength is not None else direction_strength(direction)
    model_dir, _ = locate("demo")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        work, _ = write_heretic_config(args, model_dir)
        print(f"Heretic config: {work / 'config.toml'}")
        print(" ".join(frankly_eval_command(args, direction, strength, args.out)))
        print(" ".join(heretic_eval_command(args, work / "model", args.out)))
        return 0
    if args.reuse_heretic_results:
        her, heretic, old_cmd = earlier_heretic_results(args.out)
        heretic_model = None
        print(f"[1-2/4] Heretic: reusing {args.out / 'eval-heretic.json'} ({her.get('created', 'earlier run')})")
    else:
        heretic_model, heretic = heretic_stage(args, model_dir, t0, walls)
    print(
        f"[3/4] frankly eval on the test split: {direction} at strength {strength:g}, and Heretic's model", flush=True
    )
    t3 = time.monotonic()
    cmds = [frankly_eval_command(args, direction, strength, args.out)]
    frankly, reused_f = cached_eval(cmds[0], [direction], args.out, "eval-frankly")
    if heretic_model is not None:
        cmds.append(heretic_eval_command(args, heretic_model, args.out))
        weights = [*sorted(heretic_model.glob("*.safetensors")), heretic_model / "config.json"]
        her, reused_h = cached_eval(cmds[1], weights, args.out, "eval-heretic")
    else:
        cmds.append(old_cmd)
        reused_h = True
    walls["eval_s"] = round(time.monotonic() - t3, 1)
    heretic_row = next(r for r in her["rows"] if r["when"] == "weights")
    rows = comparison_rows(frankly, strength, heretic_row)
    print("[4/4] comparison", flush=True)
    table, notes = format_table(rows), "\n".join(f"- {n}" for n in SPLIT_NOTES)
    (args.out / "comparison.md").write_text(f"{table}\n\n{notes}\n")
    summary = {
        "command": "python scripts/compare_heretic.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "split_notes": SPLIT_NOTES,
        "sets": frankly["sets"],
        "frankly": {"direction": str(direction), "strength": strength, "sha256": _sha256(direction)},
        "heretic": heretic,
        "eval_commands": [c if isinstance(c, str) else " ".join(c[2:]) for c in cmds],
        "eval_reused": {"frankly": reused_f, "heretic": reused_h},
        "wall_s": {**walls, "total_s": round(time.monotonic() - t0, 1)},
    }
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=2))
    png = plot_comparison(rows, heretic.get("trials", []), heretic.get("chosen"), args.out / "comparison.png")
    print(table + "\n\n" + notes)
    print(f"\nwrote {args.out / 'comparison.md'}, {args.out / 'comparison.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
