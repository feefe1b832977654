"""Skipped updates: counted, logged, and the run stopped after too many in a row.

An update is skipped when its loss or gradient norm is not finite, or when no sample of the
global batch has a finite reward (an optimizer step on zero gradients would still move Adam's
moments). One such update is weather; `max_in_a_row` of them is a broken run (run.max_nonfinite).
"""

from __future__ import annotations

import logging

__all__ = ["SkipGuard"]

log = logging.getLogger("sage_fast.trainer")


class SkipGuard:
    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.streak = 0  # skipped updates since the last applied one
        self.total = 0

    def skipped(self, iteration: int, why: str) -> None:
        """Count a skipped update; raises FloatingPointError at `max_in_a_row` in a row."""
        self.streak += 1
        self.total += 1
        log.warning("iteration %d: %s: update skipped (%d in a row)", iteration, why, self.streak)
        if self.streak >= self.max_in_a_row:
            raise FloatingPointError(f"{self.streak} consecutive updates skipped, the last for a {why} "
                                     f"(run.max_nonfinite={self.max_in_a_row}): stopping")

    def applied(self) -> None:
        self.streak = 0

    def state_dict(self) -> dict:
        return {"streak": self.streak, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.total = int(state["streak"]), int(state["total"])
