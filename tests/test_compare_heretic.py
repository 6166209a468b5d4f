"""scripts/compare_heretic.py and scripts/heretic_driver.py without running Heretic: argument
handling, the Heretic config it writes (the project's train/val prompt files, never the test
split), the driver's answers to Heretic's questions, the comparison table, JSON inputs and plot."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib

from directions.refusal import load_markers
from tests.scripts_loader import load_script
from tests.tiny_models import save_tiny_dir, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


ch = load_script("compare_heretic")
drv = load_script("heretic_driver")


def test_arguments_defaults_and_bad_values(capsys):
    a = ch.parse_args([])
    assert (a.trials, a.startup_trials, a.max_tokens, a.heretic_tokens) == (24, 8, 100, 64)
    assert a.out == ROOT / "docs" / "heretic" and not a.skip_heretic
    assert ch.parse_args(["--trials", "5", "--startup-trials", "5"]).startup_trials == 5
    for bad in (["--trials", "0"], ["--trials", "4", "--startup-trials", "5"], ["--limit", "0"], ["--max-tokens", "x"]):
        with pytest.raises(SystemExit) as e:
            ch.parse_args(bad)
        assert e.value.code == 2
    assert "--startup-trials" in capsys.readouterr().err


def test_toml_writer_round_trips_through_tomllib():
    data = {
        "model": "/a b/c",
        "n": 3,
        "x": 0.25,
        "flag": False,
        "markers": ["i can't", 'say "no"', "back\\slash", "caf\u00e9 \u2019"],
        "good_prompts": {"dataset": "/p/harmless_train.txt", "split": "[:4]"},
    }
    assert tomllib.loads(ch.toml_dumps(data)) == data
    with pytest.raises(TypeError):
        ch.toml_dumps({"bad": None})


QWEN_LIKE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Tiny, a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_default_system_matches_what_frankly_renders():
    tok = tiny_tokenizer()
    tok.chat_template = QWEN_LIKE
    system = ch.template_default_system(tok)
    assert system == "You are Tiny, a helpful assistant."
    user = [{"role": "user", "content": "t5 t6"}]
    # Heretic sends this system prompt explicitly: the same text frankly's prompts get from the template
    assert tok.apply_chat_template([{"role": "system", "content": system}, *user], tokenize=False) == (
        tok.apply_chat_template(user, tokenize=False)
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert ch.template_default_system(tok) is None


def test_heretic_config_reads_train_and_val_prompts_only(tmp_path):
    args = ch.parse_args(["--trials", "6", "--heretic-dir", str(tmp_path / "runs")])
    model_dir = save_tiny_dir(tiny_model("qwen2"), tmp_path / "model")
    work, text = ch.write_heretic_config(args, model_dir)
    assert work.parent == tmp_path / "runs" and (work / "config.toml").read_text() == text
    cfg = tomllib.loads(text)
    assert cfg["model"] == model_dir and cfg["n_trials"] == 6 and cfg["n_startup_trials"] == 2
    assert cfg["export_strategy"] == "merge" and cfg["response_prefix"] == "" and cfg["max_response_length"] == 64
    assert cfg["refusal_markers"] == list(load_markers())
    files = {
        k: Path(cfg[k]["dataset"])
        for k in ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
    }
    assert [f.name for f in files.values()] == [
        "harmless_train.txt",
        "harmful_train.txt",
        "harmless_val.txt",
        "harmful_val.txt",
    ]
    assert all(f.is_file() and f.read_text().strip() for f in files.values())
    assert "_test" not in text  # nothing Heretic searches on is from the test split
    # the run folder is keyed by the config: same config, same folder (resume); other config, other folder
    assert ch.write_heretic_config(args, model_dir)[0] == work
    assert (
        ch.write_heretic_config(ch.parse_args(["--trials", "7", "--heretic-dir", str(tmp_path / "runs")]), model_dir)[0]
        != work
    )
    # --heretic-prompts cuts only the val files Heretic scores its trials on
    cfg = tomllib.loads(
        ch.write_heretic_config(ch.parse_args(["--heretic-prompts", "5", "--heretic-dir", str(tmp_path)]), model_dir)[1]
    )
    assert cfg["bad_evaluation_prompts"]["split"] == cfg["good_evaluation_prompts"]["split"] == "[:5]"
    assert "split" not in cfg["bad_prompts"]
    # --limit is for the evaluation only: Heretic's configuration (and its run folder) stays the same
    assert (
        ch.write_heretic_config(
            ch.parse_args(["--trials", "6", "--limit", "3", "--heretic-dir", str(tmp_path / "runs")]), model_dir
        )[0]
        == work
    )


def test_eval_commands_measure_the_test_split(tmp_path):
    args = ch.parse_args(["--limit", "4"])
    joined = " ".join(ch.frankly_eval_command(args, Path("r.safetensors"), 0.75, tmp_path))
    for part in (
        "eval --model demo",
        "--direction refusal=r.safetensors",
        "--strengths 0.75",
        "--conditional",
        "--split test",
        "--max-tokens 100",
        "--limit 4",
        "--prefix eval-frankly",
    ):
        assert part in joined
    assert "--edited-model" not in joined
    joined = " ".join(ch.heretic_eval_command(args, tmp_path / "model", tmp_path))
    assert f"--edited-model heretic={tmp_path / 'model'}" in joined and "--split test" in joined
    assert "--direction" not in joined and "--prefix eval-heretic" in joined


def test_cached_eval_reruns_only_when_the_command_or_an_input_changes(tmp_path):
    """A rerun after a re-shipped direction measures again; the same command on the same files does not."""
    out, inp, runs = tmp_path / "out", tmp_path / "d.safetensors", tmp_path / "runs.txt"
    out.mkdir()
    inp.write_bytes(b"v1")
    fake = "import json, sys; open(sys.argv[1], 'a').write('x'); json.dump({'rows': []}, open(sys.argv[2], 'w'))"

    def cmd(extra="a"):
        return [sys.executable, "-c", fake, str(runs), str(out / "e.json"), extra]

    assert ch.cached_eval(cmd(), [inp], out, "e") == ({"rows": []}, False)
    assert ch.cached_eval(cmd(), [inp], out, "e")[1] is True and runs.read_text() == "x"
    inp.write_bytes(b"v2")  # the direction was re-shipped
    assert ch.cached_eval(cmd(), [inp], out, "e")[1] is False and runs.read_text() == "xx"
    assert ch.cached_eval(cmd("b"), [inp], out, "e")[1] is False and runs.read_text() == "xxx"
    bad = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit, match="frankly eval failed"):
        ch.cached_eval(bad, [inp], out, "e")
    assert not (out / "e.key").exists()  # a failed run leaves no key behind


def test_direction_strength_from_metadata(tmp_path):
    from directions.fileformat import save_direction
    from tests.tiny_models import random_direction_set

    model = tiny_model("llama")
    ds = random_direction_set(model, "refusal")
    plain = save_direction(ds, tmp_path / "a.safetensors", config=model.config)
    assert ch.direction_strength(plain) == 1.0
    ds.metadata["recommended_strength"] = "0.8"
    assert ch.direction_strength(save_direction(ds, tmp_path / "b.safetensors", config=model.config)) == 0.8


def _trial(index, refusals, kl):
    return SimpleNamespace(user_attrs={"index": index, "refusals": refusals, "kl_divergence": kl, "n_bad_prompts": 65})


def test_pick_trial_fewest_refusals_then_lowest_kl_under_the_cap():
    front = [
        {"index": 1, "refusals": 0, "kl": 0.09},
        {"index": 2, "refusals": 0, "kl": 0.05},
        {"index": 3, "refusals": 4, "kl": 0.01},
    ]
    assert drv.pick_trial(front)["index"] == 2
    assert drv.pick_trial(front, max_kl=0.02)["index"] == 3
    assert drv.pick_trial(front, max_kl=0.001) is None


def test_driver_answers_heretic_questions_in_order(tmp_path):
    ans = drv.Answers(tmp_path / "out", max_kl=None)
    assert ans.select("How would you like to proceed?", ["continue", "restart", ""]) == "continue"
    trials = [_trial(5, 3, 0.01), _trial(9, 0, 0.04), _trial(2, 0, 0.08)]
    choices = [SimpleNamespace(title=f"t{i}", value=t) for i, t in enumerate(trials)] + ["continue", ""]
    assert ans.select("Which trial do you want to use?", choices) is trials[1]
    assert ans.chosen["index"] == 9 and [t["index"] for t in ans.front] == [5, 9, 2]
    act = "What do you want to do with the decensored model?"
    assert (
        ans.select(act, ["Save the model to a local folder", "Chat with the model"])
        == "Save the model to a local folder"
    )
    assert ans.path("Path to the folder:") == str(tmp_path / "out")
    assert ans.select(act, ["Save the model to a local folder"]) == ""  # back to the trial menu
    assert ans.select("Which trial do you want to use?", choices) == ""  # then exit
    with pytest.raises(RuntimeError, match="unexpected Heretic question"):
        ans.select("Should the repository be public or private?", ["Public", "Private"])
    with pytest.raises(RuntimeError, match=r"KL <= 0\.001"):
        drv.Answers(tmp_path, max_kl=0.001).select("Which trial do you want to use?", choices)


def _eval_result():
    def row(d, w, s, refusals, kl, long_kl, cap, fired=None):
        r = {
            "direction": d,
            "when": w,
            "strength": s,
            "refusals": refusals,
            "n_harmful": 120,
            "refusal_rate": refusals / 120,
            "first_token_kl": kl,
            "long_kl": long_kl,
            "capability": cap,
        }
        if d != "heretic":  # a Heretic result written before the non-answer count existed
            r["non_answers"] = 1
        return r | ({"fired": fired} if fired else {})

    fired = {"harmful": 0.95, "harmless": 0.025, "long": 0.0, "creative": 0.0, "capability": 0.0}
    return {
        "sets": {"harmful": 120, "harmless": 120},
        "rows": [
            row("refusal", "always", 0.0, 60, 0.0, 0.0, 0.8),
            row("refusal", "always", 1.0, 3, 0.02, 0.01, 0.78),
            row("refusal", "auto", 0.0, 60, 0.0, 0.0, 0.8, fired),
            row("refusal", "auto", 1.0, 6, 0.001, 0.0, 0.8, fired),
            row("heretic", "weights", 1.0, 1, 0.03, 0.02, 0.77),
        ],
    }


def test_comparison_rows_table_and_plot(tmp_path):
    res = _eval_result()
    rows = ch.comparison_rows(res, 1.0, res["rows"][-1])
    assert [r["system"] for r in rows] == [
        "plain model",
        "Heretic 1.4.0",
        "frankly always (s=1)",
        "frankly when=auto (s=1)",
    ]
    assert rows[0]["refusals_per_100"] == pytest.approx(50.0) and rows[1]["refusals_per_100"] == pytest.approx(
        100 / 120
    )
    assert rows[3]["fired_harmless"] == 0.025 and rows[2]["fired_harmless"] is None
    table = ch.format_table(rows)
    assert "| Heretic 1.4.0 | 0.8 (1/120) | - | 0.0300 | 0.0200 | 77.0 | - |" in table
    assert "| frankly when=auto (s=1) | 5.0 (6/120) | 1 | 0.0010 | 0.0000 | 80.0 | 2.5% |" in table
    with pytest.raises(KeyError):
        ch.comparison_rows(res, 0.5, None)  # no row at that strength
    trials = [{"kl": 0.01, "refusals": 5}, {"kl": 0.2, "refusals": 0}]
    png = ch.plot_comparison(rows, trials, trials[1], tmp_path / "c.png")
    assert png.stat().st_size > 5000


def test_driver_export_drops_the_gguf_quantizer_of_a_converted_directory():
    """frankly's GGUF-converted directory keeps quantization_config (gguf, dequantized); transformers will
    not save a model with that quantizer attached, so the driver's export drops it from the merged model."""

    class Model:
        def get_merged_model(self):
            cfg = SimpleNamespace(quantization_config={"quant_method": "gguf"}, hidden_size=8)
            return SimpleNamespace(hf_quantizer=object(), config=cfg)

    hm = SimpleNamespace(Model=Model)
    drv._patch_heretic(hm, export_only=False)
    m = Model().get_merged_model()
    assert m.hf_quantizer is None and not hasattr(m.config, "quantization_config") and m.config.hidden_size == 8


def test_earlier_heretic_results_are_reused_or_refused_clearly(tmp_path):
    """--reuse-heretic-results reads Heretic's row and search report from an earlier run's files."""
    import json

    with pytest.raises(SystemExit, match="earlier run are needed"):
        ch.earlier_heretic_results(tmp_path)
    (tmp_path / "eval-heretic.json").write_text(json.dumps({"rows": [{"when": "always"}]}))
    (tmp_path / "comparison.json").write_text(
        json.dumps({"created": "T", "heretic": {"version": "1.4.0", "trials": []}, "eval_commands": ["a", "b"]})
    )
    with pytest.raises(SystemExit, match="no Heretic row"):
        ch.earlier_heretic_results(tmp_path)
    (tmp_path / "eval-heretic.json").write_text(json.dumps({"rows": [{"when": "weights", "refusals": 8}]}))
    her, heretic, cmd = ch.earlier_heretic_results(tmp_path)
    assert her["rows"][0]["refusals"] == 8 and heretic["version"] == "1.4.0" and heretic["reused_from"] == "T"
    assert cmd == "b"
