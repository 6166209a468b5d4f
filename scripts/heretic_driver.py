"""Run Heretic (heretic-llm 1.4.0) to the end without a person at the keyboard.

Runs inside Heretic's own virtual environment (see scripts/compare_heretic.py), in a working
directory that holds its ``config.toml``. Heretic 1.4.0 asks its questions through
``prompt_select``/``prompt_path``/``prompt_text``; this driver answers them:

- an interrupted run in the checkpoint directory: continue it;
- "Which trial do you want to use?": the trial on Heretic's Pareto front with the fewest
  refusals (ties: lowest KL), among those with KL <= ``--max-kl`` when given; the second
  time it is asked (after the save): exit;
- "What do you want to do with the decensored model?": save it to a local folder (the
  merge export strategy comes from the config), then return to the trial menu.

Any other question is an error. Afterwards it writes ``--report`` (JSON): every trial's
refusals and KL as Heretic scored them (on its evaluation prompts), the Pareto front and
the chosen trial. Only the standard library is imported at module level, so
``pick_trial`` can be tested without Heretic installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def pick_trial(front: list[dict], max_kl: float | None = None) -> dict | None:
    """The entry of ``front`` (dicts with ``refusals`` and ``kl``) with the fewest refusals, ties by lowest
    KL, among those with ``kl <= max_kl`` (all when None); None if none qualifies."""
    ok = [t for t in front if max_kl is None or t["kl"] <= max_kl]
    return min(ok, key=lambda t: (t["refusals"], t["kl"])) if ok else None


def _trial_record(trial) -> dict:
    ua = trial.user_attrs
    return {
        "index": ua.get("index"),
        "refusals": ua.get("refusals"),
        "n_bad_prompts": ua.get("n_bad_prompts"),
        "base_refusals": ua.get("base_refusals"),
        "kl": ua.get("kl_divergence"),
        "direction_index": ua.get("direction_index"),
        "parameters": ua.get("parameters"),
    }


class Answers:
    """Heretic's interactive questions, answered by rule; records what it chose."""

    def __init__(self, save_dir: Path, max_kl: float | None):
        self.save_dir, self.max_kl = save_dir, max_kl
        self.front: list[dict] = []
        self.chosen: dict | None = None
        self.saved = False

    def select(self, message: str, choices: list):
        values = [getattr(c, "value", c) for c in choices]
        print(f"[driver] question: {message}", flush=True)
        if message.startswith("How would you like to proceed?"):
            return "continue"
        if message.startswith("Which trial do you want to use?"):
            return self._trial(values)
        if message.startswith("What do you want to do with the decensored model?"):
            if self.saved:
                return ""
            self.saved = True
            return "Save the model to a local folder"
        raise RuntimeError(f"unexpected Heretic question: {message!r}")

    def _trial(self, values: list):
        if self.chosen is not None:  # asked again after the save: done
            return ""
        trials = [v for v in values if hasattr(v, "user_attrs")]
        self.front = [_trial_record(t) for t in trials]
        best = pick_trial(self.front, self.max_kl)
        if best is None:
            raise RuntimeError(f"no trial on Heretic's Pareto front has KL <= {self.max_kl}")
        self.chosen = best
        print(f"[driver] chose trial {best['index']}: {best['refusals']} refusals, KL {best['kl']:.4f}", flush=True)
        return trials[self.front.index(best)]

    def path(self, message: str, *a, **k) -> str:
        print(f"[driver] question: {message} -> {self.save_dir}", flush=True)
        return str(self.save_dir)

    def text(self, message: str, *a, **k) -> str:
        raise RuntimeError(f"unexpected Heretic question: {message!r}")


def _patch_heretic(hm, export_only: bool) -> None:
    """Heretic 1.4.0 on a directory converted from GGUF: its config keeps a ``quantization_config``
    (gguf, already dequantized to plain fp32 weights), and transformers refuses to save a model
    with that quantizer attached. The merged weights are plain, so the export drops it.
    ``export_only``: run no more trials, export the best of those already in the study."""
    merged = hm.Model.get_merged_model

    def get_merged_model(self):
        m = merged(self)
        m.hf_quantizer = None
        m.config.__dict__.pop("quantization_config", None)
        return m

    hm.Model.get_merged_model = get_merged_model
    if export_only:
        import optuna

        optuna.study.Study.optimize = lambda self, *a, **k: print("[driver] --export-only: no more trials", flush=True)


def _all_trials(checkpoint_dir: Path) -> list[dict]:
    """Every completed trial in Heretic's Optuna journal (its study is named 'heretic')."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out = []
    for f in sorted(checkpoint_dir.glob("*.jsonl")):
        study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(str(f))))
        out += [_trial_record(t) for t in study.trials if t.state.name == "COMPLETE"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", required=True, help="where the merged model goes (written atomically)")
    p.add_argument("--report", required=True, help="JSON file with the trials, the front and the chosen trial")
    p.add_argument("--checkpoint-dir", default="checkpoints", help="Heretic's study_checkpoint_dir (config.toml)")
    p.add_argument("--max-kl", type=float, help="choose only among front trials with KL <= this")
    p.add_argument("--export-only", action="store_true", help="run no more trials; export from the study as it is")
    a = p.parse_args(argv)
    final = Path(a.save_dir)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    answers = Answers(tmp, a.max_kl)

    import heretic.main as hm

    hm.prompt_select, hm.prompt_path, hm.prompt_text = answers.select, answers.path, answers.text
    _patch_heretic(hm, a.export_only)
    sys.argv = ["heretic"]  # every setting comes from config.toml in the working directory
    hm.main()
    if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
        print(f"[driver] Heretic did not save a model to {tmp}", file=sys.stderr)
        return 1
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    report = {"chosen": answers.chosen, "front": answers.front, "trials": _all_trials(Path(a.checkpoint_dir))}
    Path(a.report).write_text(json.dumps(report, indent=2))
    print(f"[driver] saved {final}; report {a.report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
