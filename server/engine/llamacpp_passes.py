"""How many rows go into one ``llama_decode``: measured, not assumed.

On a CPU, a llama.cpp pass over k sequences is not always cheaper than k passes over one:
on this project's 2-core AVX2 machine (demo model, Q4_K_M, one thread) a 1-row pass took
~55 ms, a 2-row pass ~195 ms, 4 rows ~280 ms, 8 rows ~350 ms (its kernels for 2-4 columns
are slow). So a strength group of 2 decodes faster as two 1-row passes, while a group of 8
is best in one. :class:`PassPlanner` keeps a running mean of the seconds a pass of each
size takes and splits every group into the passes with the least expected total time
(rows are independent sequences, so any split gives each row its own logits).

A group size not measured yet is tried whole once, then (if 1-row passes were never
measured) as single rows once; every ``explore_every`` plans the
whole group is tried again, so a figure taken while the machine was busy does not stick.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class PassPlanner:
    def __init__(self, max_rows: int, alpha: float = 0.2, explore_every: int = 64):
        self.max_rows = max_rows
        self.alpha = alpha
        self.explore_every = explore_every
        self.cost: dict[int, float] = {}  # rows per pass -> mean seconds
        self._plans = 0

    def record(self, rows: int, seconds: float) -> None:
        old = self.cost.get(rows)
        self.cost[rows] = seconds if old is None else old + self.alpha * (seconds - old)

    def sizes(self, n: int) -> list[int]:
        """Pass sizes (summing to ``n``) with the least expected time."""
        self._plans += 1
        if n <= 1 or n not in self.cost or self._plans % self.explore_every == 0:
            return [n]
        if 1 not in self.cost:
            return [1] * n
        best: list[tuple[float, list[int]]] = [(0.0, [])]
        for k in range(1, n + 1):
            best.append(
                min(
                    ((best[k - s][0] + self.cost[s], [*best[k - s][1], s]) for s in range(1, k + 1) if s in self.cost),
                    default=(float("inf"), [k]),
                )
            )
        return sorted(best[n][1], reverse=True)

    def split(self, rows: list[T]) -> list[list[T]]:
        out, i = [], 0
        for s in self.sizes(len(rows)):
            out.append(rows[i : i + s])
            i += s
        return out
