"""Prompt splits: which files each stage may read.

``*_train`` files extract directions; ``*_val`` files select layers and scales, calibrate
the condition, and are what ``frankly eval`` measures by default; ``*_test`` files
(``refusal/harmful_test.txt``, ``refusal/harmless_test.txt``) are for final reported figures
only (``frankly eval --split test``). Nothing chooses, tunes or calibrates on the test split:
extraction, selection and calibration read only the train and val files they are given.
"""

from __future__ import annotations

from pathlib import Path

from directions.refusal import PROMPTS_DIR

EVAL_SPLITS = ("val", "test")


def eval_prompt_files(split: str = "val", root: Path = PROMPTS_DIR) -> dict[str, Path]:
    """The prompt files ``frankly eval`` measures on for ``split`` (``val`` or ``test``).

    Only the refusal sets (harmful, harmless) have a test split. The long-answer prompts,
    the creative prompts (slop) and the capability questions are one file each, the same
    in both splits: they are not held out from selection.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {', '.join(EVAL_SPLITS)})")
    return {
        "harmful": root / "refusal" / f"harmful_{split}.txt",
        "harmless": root / "refusal" / f"harmless_{split}.txt",
        "long": root / "refusal" / "harmless_long.txt",
        "creative": root / "slop" / "creative_val.txt",
        "capability": root / "capability" / "questions.jsonl",
    }
