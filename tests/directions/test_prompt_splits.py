"""The prompt splits: train extracts, val selects and calibrates, test is for final figures only.

The test files exist, are clean and share no line (exactly or nearly) with train or val;
``frankly eval --split test`` reads them; extraction, selection and calibration never do."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from directions.evaluate import EvalSets
from directions.files import read_lines
from directions.refusal import PROMPTS_DIR
from directions.splits import EVAL_SPLITS, eval_prompt_files
from server import extract_cmd
from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
REFUSAL = PROMPTS_DIR / "refusal"
TEST_FILES = ("harmful_test.txt", "harmless_test.txt")
# every other prompt file a test line must not repeat
OTHER_FILES = (
    "harmful_train.txt",
    "harmful_val.txt",
    "harmless_train.txt",
    "harmless_val.txt",
    "harmless_val_hard.txt",
    "harmless_train_hard.txt",
    "harmless_long.txt",
)
NEAR = 0.8  # difflib ratio above which two prompts count as near-duplicates

# the modules that extract, select and calibrate: they must never see the test split
TUNING_MODULES = (
    "directions/extract.py",
    "directions/selection.py",
    "directions/detection.py",
    "server/calibrate_cmd.py",
    "server/extract_cmd.py",
)


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


@pytest.mark.parametrize("name", [*TEST_FILES, "harmless_val_hard.txt", "harmless_train_hard.txt"])
def test_test_files_are_clean(name):
    raw = (REFUSAL / name).read_text(encoding="utf-8")
    lines = raw.splitlines()
    assert len(lines) >= 100
    assert all(ln.strip() and ln == ln.strip() for ln in lines), "blank or padded line"
    assert not any(re.match(r"\d+[.)]\s", ln) or ln[0] in "\"'" for ln in lines), "numbering or quoting"
    assert len({_norm(ln) for ln in lines}) == len(lines), "duplicate line"


def _repeats(name: str, other_files) -> list[tuple[float, str, str]]:
    """Lines of ``name`` that repeat a line of ``other_files`` exactly (ratio 1) or nearly (> NEAR)."""
    others = {_norm(ln) for f in other_files for ln in read_lines(REFUSAL / f)}
    bad = []
    for line in map(_norm, read_lines(REFUSAL / name)):
        if line in others:
            bad.append((1.0, line, line))
            continue
        sm = difflib.SequenceMatcher(None, "", line)
        for o in others:
            sm.set_seq1(o)
            if sm.real_quick_ratio() > NEAR and sm.quick_ratio() > NEAR and sm.ratio() > NEAR:
                bad.append((round(sm.ratio(), 2), line, o))
    return bad


@pytest.mark.parametrize("name", TEST_FILES)
def test_test_files_share_no_line_with_train_or_val(name):
    assert not _repeats(name, OTHER_FILES)


def test_edgy_train_negatives_repeat_no_validation_line():
    """``harmless_train_hard.txt`` trains conditions; the validation files that select them stay apart."""
    assert not _repeats("harmless_train_hard.txt", ("harmless_val.txt", "harmless_val_hard.txt"))


def test_repeats_reports_an_exact_duplicate():
    line = read_lines(REFUSAL / "harmless_val.txt")[0]
    assert _repeats("harmless_val.txt", ("harmless_val.txt",))[0] == (1.0, _norm(line), _norm(line))


def test_eval_split_flag_defaults_to_val_and_resolves_test_to_the_test_files():
    base = ["eval", "--model", "demo", "--direction", "r=x.safetensors", "--out-dir", "o"]
    parser = build_parser()
    assert parser.parse_args(base).split == "val"
    args = parser.parse_args([*base, "--split", "test"])
    assert args.split == "test"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--split", "train"])  # train is never an evaluation split

    files = eval_prompt_files(args.split)
    assert files["harmful"] == REFUSAL / "harmful_test.txt" and files["harmless"] == REFUSAL / "harmless_test.txt"
    sets = EvalSets.load(split=args.split)
    assert sets.split == "test"
    assert sets.harmful == read_lines(REFUSAL / "harmful_test.txt")
    assert sets.harmless == read_lines(REFUSAL / "harmless_test.txt")
    assert EvalSets.load(split="val").harmful == read_lines(REFUSAL / "harmful_val.txt")
    assert EvalSets.load().split == "val"
    assert set(EVAL_SPLITS) == {"val", "test"}
    with pytest.raises(ValueError, match="unknown split"):
        eval_prompt_files("train")


@pytest.mark.parametrize("module", TUNING_MODULES)
def test_extraction_selection_and_calibration_never_reference_the_test_split(module):
    src = (ROOT / module).read_text(encoding="utf-8")
    for needle in ("_test", "directions.splits", "eval_prompt_files", "EvalSets"):
        assert needle not in src, f"{module} mentions {needle!r}"


def test_extract_defaults_read_train_and_val_only():
    """The only prompt file ``frankly extract`` picks itself (the KL prompts for slop) is a val file."""
    slop = PROMPTS_DIR / "slop"
    args = build_parser().parse_args(
        [
            "extract",
            "--model",
            "demo",
            "--name",
            "slop",
            "--out",
            "x.safetensors",
            "--positive",
            str(slop / "creative_train.txt"),
            "--negative",
            str(slop / "creative_train.txt"),
            "--val-positive",
            str(slop / "creative_val.txt"),
            "--val-negative",
            str(slop / "creative_val.txt"),
        ]
    )
    files = extract_cmd._data(args, "slop").files
    assert files["kl_prompts"] == str(REFUSAL / "harmless_val.txt")
    assert not any("_test" in Path(p).name for p in files.values())


def test_readme_extract_and_calibrate_commands_never_name_test_files():
    for readme in (ROOT / "README.md", PROMPTS_DIR / "README.md"):
        text = readme.read_text(encoding="utf-8").replace("\\\n", " ")
        cmds = [ln for ln in text.splitlines() if re.match(r"\s*frankly (extract|calibrate)\b", ln)]
        assert not [c for c in cmds if "_test" in c], readme
