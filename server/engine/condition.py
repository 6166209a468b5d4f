"""Conditional ablation (``when="auto"``): which directions of a row apply.

Two kinds of condition. A file with a lookahead condition (metadata ``auto_lookahead``) is
decided after the row's first K unedited tokens (:class:`server.engine.rows.RowOutput` holds
them back and decides; a firing row restarts from its prompt with the edit on). Any other conditional file is decided at prefill, as follows.

A conditional direction is off in the row's first prefill forward; the probe of
:class:`directions.hooks.SteeringHooks` reads the residual stream entering the direction's
detection layer at the last prompt token, and the direction applies (for the whole
generation) when ``score = h . detect_vector`` (plus, where the file has one, a term on the
unedited next-token distribution: :func:`directions.detection.condition_score`) exceeds its
threshold. A file with a firing-case edit (:attr:`DirectionSet.auto_edit`) applies that edit
instead of its own: the row's strength goes to the engine direction ``NAME@auto``.
"""

from __future__ import annotations

import torch

from directions.detection import condition_score
from directions.fileformat import DirectionSet, firing_name
from server.engine.protocol import EngineObserver
from server.engine.rows import Row
from server.engine.types import SteeringReport


def start_row(row: Row, directions: dict[str, DirectionSet]) -> dict[str, DirectionSet]:
    """Set the row's unconditional strengths and its report before any condition is measured;
    return its conditional directions (the probe must read their detection layers)."""
    auto: dict[str, DirectionSet] = {}
    row.strengths = {}
    row.looking = {}
    for n, d in row.req.steering.items():
        conditional = d.when == "auto"
        row.report[n] = SteeringReport(strength=d.strength, when=d.when, applied=0.0 if conditional else d.strength)
        if conditional and d.strength == 0:
            row.report[n].fired = False
        elif conditional and directions[n].lookahead is not None:
            if n in row.look_decided:  # restarted after its lookahead: the decision stands
                row.apply_decision(n, firing_name(n, directions[n]), d.strength, row.look_decided[n], None)
            else:
                row.looking[n] = directions[n]
        elif conditional:
            auto[n] = directions[n]
        elif d.strength != 0:
            row.strengths[n] = d.strength
    return auto


def decide(
    row: Row,
    index: int,
    directions: dict[str, DirectionSet],
    captured: dict[int, torch.Tensor],
    obs: EngineObserver,
    logits: torch.Tensor | None = None,
) -> bool:
    """Decide ``row``'s conditional directions from batch row ``index`` of the probe (and of
    ``logits``, the unedited (rows, vocab) logits at the last prompt token); True if any fires."""
    any_fired = False
    for n, d in row.req.steering.items():
        if d.when != "auto" or d.strength == 0 or not directions[n].uses_probe:
            continue
        ds = directions[n]
        h = captured.get(ds.detect_layer)
        # no such layer captured: the score is NaN and the condition never fires
        score = condition_score(ds, h[index] if h is not None else None, logits[index] if logits is not None else None)
        fired = score > ds.detect_threshold
        row.apply_decision(n, firing_name(n, ds), d.strength, fired, round(score, 4))
        obs.condition(n, fired)
        any_fired |= fired
    return any_fired
