"""What the batcher has seen of its engine, for readiness and liveness: stalled or not, and failed calls in a row (a
pod whose engine keeps failing, or stays stalled, is better restarted by its orchestrator than left answering 5xx)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class EngineHealth:
    """What the batcher has seen of its engine. ``stalled_since``: when the watchdog gave up on a call that has not
    returned yet. Not alive (restart me) after ``max_failures`` failed calls in a row, or when stalled for
    ``restart_after_s``."""

    max_failures: int = 3
    restart_after_s: float = 60.0
    failures_in_a_row: int = 0
    stalled_since: float | None = None

    @property
    def stalled(self) -> bool:
        return self.stalled_since is not None

    @property
    def alive(self) -> bool:
        if self.failures_in_a_row >= self.max_failures:
            return False
        return self.stalled_since is None or time.monotonic() - self.stalled_since < self.restart_after_s

    def describe(self) -> dict:
        return {"alive": self.alive, "stalled": self.stalled, "failures_in_a_row": self.failures_in_a_row,
                "max_failures": self.max_failures}
