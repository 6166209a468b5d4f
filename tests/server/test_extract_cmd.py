"""``frankly extract`` end to end on a tiny model directory."""

from __future__ import annotations

from directions.fileformat import load_direction
from server.cli import main
from tests.tiny_models import save_tiny_dir, tiny_extract_data, tiny_model


def test_cli_extract_on_a_tiny_model_directory(tmp_path):
    model_dir = save_tiny_dir(tiny_model("llama"), tmp_path / "model")
    data = tiny_extract_data()
    files = {}
    for k in ("pos_train", "neg_train", "pos_val", "neg_val"):
        files[k] = tmp_path / f"{k}.txt"
        files[k].write_text("\n".join(getattr(data, k)) + "\n")
    cap = tmp_path / "cap.jsonl"
    cap.write_text('{"question": "t5", "answer": "t6", "accept": ["t6"]}\n')
    out = tmp_path / "out.safetensors"
    rc = main(
        [
            "extract",
            "--model",
            model_dir,
            "--positive",
            str(files["pos_train"]),
            "--negative",
            str(files["neg_train"]),
            "--val-positive",
            str(files["pos_val"]),
            "--val-negative",
            str(files["neg_val"]),
            "--name",
            "refusal",
            "--out",
            str(out),
            "--layer",
            "1",
            "--capability",
            str(cap),
        ]
    )
    assert rc == 0
    ds = load_direction(out)
    md = ds.public_metadata()
    assert md["objective"] == "refusal" and md["chosen_layer"] == "1"
    assert set(md["prompt_hashes"]) >= {"positive", "negative", "val_positive", "val_negative"}
    assert len(md["prompt_hashes"]["positive"]["sha256"]) == 64
    ds.check_fits(tiny_model("llama").config)
