#!/usr/bin/env python
"""Give a direction file a firing-case edit: the edit a ``when: auto`` request gets when the
file's condition fires (``auto_directions`` / ``auto_layer_weights`` / ``auto_component_weights``).

In ``auto`` mode the harmless prompts the condition lets through run the untouched model, so
the edit only has to be right for the prompts it fires on: it can remove more refusals at a
higher first-token KL than an ``always`` edit could afford (the KL then only shows on the
condition's false positives). The file's own edit (``when: always``, the bake, the LoRA export)
and its condition are left as they are. Measure a candidate first, on validation only:

    frankly eval --model demo --split val --conditional --direction cand=CANDIDATE.safetensors ...

then (atomically rewrites FILE; ``--remove`` takes the firing-case edit out again):

    python scripts/auto_edit.py --direction FILE --from CANDIDATE.safetensors [--note TEXT]

It also sets which condition decides ``when: auto``: ``--lookahead K`` makes it the
output-based one (the first K unedited reply tokens, held back from the client, read by the
refusal judge; a flagged row restarts with the edit on), ``--probe`` goes back to the file's
prefill probe. Either may come with ``--from`` or alone.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from directions.fileformat import (  # noqa: E402
    AUTO_EDIT_SUFFIX,
    DirectionFileError,
    DirectionSet,
    check_lookahead,
    load_direction,
    save_direction,
)


def attach(target: DirectionSet, source: DirectionSet, source_path: Path, note: str = "") -> DirectionSet:
    """``target`` with ``source``'s own edit as its firing-case edit (and metadata saying where from)."""
    if tuple(source.directions.shape) != tuple(target.directions.shape):
        raise DirectionFileError(
            f"{source_path} has shape {tuple(source.directions.shape)}, the direction file {tuple(target.directions.shape)}"
        )
    fp_t, fp_s = (json.loads(d.metadata.get("fingerprint", "{}") or "{}") for d in (target, source))
    if fp_t and fp_s and fp_t.get("config_hash") != fp_s.get("config_hash"):
        raise DirectionFileError(f"{source_path} was made for another model ({fp_s.get('architecture')})")
    if not target.has_condition:
        raise DirectionFileError("the direction file has no condition: a firing-case edit would never apply")
    edit = DirectionSet(target.name + AUTO_EDIT_SUFFIX, source.directions.clone(), source.layer_weights.clone())
    edit.component_weights = None if source.component_weights is None else source.component_weights.clone()
    target.auto_edit = edit
    info = {
        "source": source_path.name,
        "source_sha256": hashlib.sha256(source_path.read_bytes()).hexdigest(),
        "attached": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    # A fit candidate (scripts/fit_weights.py) written before its method/eval described the
    # candidate itself carries its source file's; its own record, "fit", is taken for every fit
    # candidate. Otherwise the source's method and eval describe it.
    own_fit = "fit" in source.metadata and source.metadata["fit"] != target.metadata.get("fit")
    for k in ("fit",) if own_fit else ("method", "eval"):
        if k in source.metadata:
            try:
                info[f"source_{k}"] = json.loads(source.metadata[k])
            except (TypeError, ValueError):
                info[f"source_{k}"] = source.metadata[k]
    if note:
        info["note"] = note
    target.metadata["auto_edit"] = json.dumps(info)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--direction", required=True, type=Path, help="the direction file to rewrite (it keeps its name)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--from", dest="source", type=Path, help="the direction file whose edit fires")
    g.add_argument("--remove", action="store_true", help="remove the firing-case edit")
    ap.add_argument("--note", default="", help="free text stored in the auto_edit metadata (what it measured)")
    c = ap.add_mutually_exclusive_group()
    c.add_argument(
        "--lookahead",
        type=int,
        metavar="K",
        help="decide when: auto on the first K unedited reply tokens (held back from the client)",
    )
    c.add_argument("--probe", action="store_true", help="decide when: auto with the prefill probe (drop the lookahead)")
    ap.add_argument("--judge", default="refusal", help="the lookahead's judge (default: refusal)")
    args = ap.parse_args(argv)
    if not (args.source or args.remove or args.lookahead is not None or args.probe):
        ap.error("nothing to do: give --from, --remove, --lookahead or --probe")
    done = []
    try:
        target = load_direction(args.direction)
        if args.lookahead is not None:
            try:
                spec = {"tokens": args.lookahead, "judge": args.judge}
                check_lookahead(spec)
            except ValueError as e:
                raise DirectionFileError(f"--lookahead: {e}") from e
            target.metadata["auto_lookahead"] = json.dumps(spec)
            done.append(f"when: auto decided on the first {args.lookahead} reply tokens ({args.judge} judge)")
        elif args.probe:
            if not target.has_probe:
                raise DirectionFileError("the direction file has no prefill probe to decide with")
            target.metadata.pop("auto_lookahead", None)
            done.append("when: auto decided by the prefill probe")
        if args.remove:
            target.auto_edit = None
            done.append("removed the firing-case edit")
        elif args.source:
            attach(target, load_direction(args.source), args.source, args.note)
            done.append(f"firing-case edit from {args.source}")
        if target.auto_edit is not None and not target.has_condition:
            raise DirectionFileError("the direction file has no condition: a firing-case edit would never apply")
        save_direction(target, args.direction)
    except DirectionFileError as e:
        print(f"auto_edit: {e}", file=sys.stderr)
        return 2
    print(f"{args.direction}: {'; '.join(done)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
