"""Bounded curves: however long a run trains, each curve keeps a fixed number of points.

A curve keeps every point until it holds ``capacity`` of them. Then every other point is
dropped and from then on only every second point is kept; the next time it is full, every
fourth, and so on. A run of any length therefore keeps between ``capacity / 2`` and
``capacity`` evenly spaced points, plus always its latest one. Nothing is averaged: each
kept point is the exact value recorded at its step, so a chart still shows what PyTorch
computed, only not at every step of a long run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Thinning:
    """Which points of a growing curve are kept, for lists recorded together.

    :meth:`record` appends one value to each of several lists (a step and the values of
    that step), so lists recorded through one ``Thinning`` stay aligned. The first point
    is always kept; so is the latest, as a provisional last point that the next one
    replaces unless it falls on the kept grid.
    """

    def __init__(self, capacity: int):
        if capacity < 2:
            raise ValueError(f"a curve needs room for at least 2 points, not {capacity}")
        # even, so that halving a full curve keeps its last point
        self.capacity = capacity + capacity % 2
        #: every ``stride``-th point is kept (1 until the curve first fills up)
        self.stride = 1
        self._count = 0
        self._provisional = False

    def record(self, columns: Sequence[tuple[list, Any]]) -> None:
        """Append ``value`` to ``seq`` for every ``(seq, value)``, dropping points so that
        no list holds more than ``capacity + 1`` (the grid and the latest point)."""
        if self._provisional:
            for seq, _ in columns:
                seq.pop()
        on_grid = self._count % self.stride == 0
        self._count += 1
        for seq, value in columns:
            seq.append(value)
        self._provisional = not on_grid
        if on_grid and len(columns[0][0]) > self.capacity:
            for seq, _ in columns:
                seq[:] = seq[::2]
            self.stride *= 2


__all__ = ["Thinning"]
