"""Learning-rate search: start at a calibrated rate, step outward while the best is at an edge.

Every learning rate is a rung of one half-decade ladder (1e-5, 3e-5, 1e-4, ..., 1). A search tries
its calibrated start (the best of an earlier full run) and the rung on each side; while the best
result so far sits on the lowest or highest rung tried, it tries the next rung outward, until the
best is bracketed by worse results or stands on the family's bound (`Search.at_bound`: what the
tables mark "(edge)"). A fixed grid either wastes runs far from the best or ends at the best; this
spends runs only where the best might still be.

Scores are "lower is better" (callers negate accuracies, diverged runs score +inf). A search can
follow several scores of the same runs at once (the width sweep reads two step counts): it goes on
while any of them has its best on an edge.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def rungs(low: float, high: float) -> tuple[float, ...]:
    """The ladder's rungs from `low` to `high` (both on the ladder)."""
    for bound in (low, high):
        if bound not in LADDER:
            raise ValueError(f"{bound:g} is not on the learning-rate ladder {LADDER}")
    return tuple(lr for lr in LADDER if low <= lr <= high)


@dataclass
class Search:
    """One method's search on one task; feed it scores with `add`, ask `next()` what to run."""

    rungs: tuple[float, ...]  # the learning rates allowed, ascending
    start: float
    scores: dict[float, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.start not in self.rungs:
            raise ValueError(f"start {self.start:g} is not among the rungs {self.rungs}")

    def first(self) -> list[float]:
        """The start and its neighbouring rungs."""
        i = self.rungs.index(self.start)
        return list(self.rungs[max(0, i - 1): i + 2])

    def add(self, lr: float, scores: Sequence[float]) -> None:
        self.scores[lr] = tuple(math.inf if math.isnan(s) else s for s in scores)

    def best(self, which: int = 0) -> float:
        """The learning rate with the lowest score `which` (the lower rate on a tie)."""
        return min(sorted(self.scores), key=lambda lr: self.scores[lr][which])

    def _criteria(self) -> range:
        return range(len(next(iter(self.scores.values()))))

    def bests(self) -> list[float]:
        """The best learning rate of every score, without repeats."""
        return list(dict.fromkeys(self.best(i) for i in self._criteria()))

    def next(self) -> list[float]:
        """The rungs to try next: one step outward from every edge that holds a best; [] when done."""
        tried = sorted(self.scores)
        out = []
        for best in self.bests():
            i = self.rungs.index(best)
            if best == tried[0] and i > 0:
                out.append(self.rungs[i - 1])
            if best == tried[-1] and i < len(self.rungs) - 1:
                out.append(self.rungs[i + 1])
        return list(dict.fromkeys(out))

    def at_bound(self, which: int = 0) -> bool:
        """Whether the best sits on a bound of the rungs (so a better rate may lie beyond it)."""
        return len(self.rungs) > 1 and self.best(which) in (self.rungs[0], self.rungs[-1])
