"""The load-adaptive ``auto`` model: step down to smaller submodels under load, back up after.

The policy is pure: it sees a load signal (the number of waiting requests and the measured time
of a scheduler iteration, i.e. the gap between two tokens of every active request) and keeps a
*level*, an index into the submodels ordered from cheapest to largest. Requests for ``auto``
are answered by the submodel of the current level when they are admitted. Tests drive it with
made-up signals; the scheduler feeds it real ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from .registry import Servable


class AutoPolicy:
    """Hysteresis controller over submodel levels.

    One level down after ``patience`` consecutive overloaded observations (iteration time above
    ``target_ms``, or more than ``queue_high`` requests waiting); one level up after
    ``patience`` consecutive relaxed ones (nothing waiting and, with a target, iteration time
    below ``headroom * target_ms``). An idle server goes straight back to the largest level.

    Args:
        levels: Submodels from cheapest to largest (the last one is where ``auto`` starts).
        target_ms: Per-token latency to keep (ms), or None to follow the queue only.
        queue_high: Waiting requests that count as overload.
        patience: Consecutive observations needed for one step.
        headroom: Fraction of the target below which stepping up is allowed.
    """

    def __init__(self, levels: Sequence[Servable], target_ms: float | None = None, *,
                 queue_high: int = 4, patience: int = 3, headroom: float = 0.6) -> None:
        if not levels:
            raise ValueError("AutoPolicy needs at least one submodel")
        if target_ms is not None and not target_ms > 0:
            raise ValueError(f"target_ms={target_ms} must be > 0")
        if queue_high < 0 or patience < 1 or not 0 < headroom < 1:
            raise ValueError(f"queue_high={queue_high} must be >= 0, patience={patience} >= 1, "
                             f"headroom={headroom} in (0, 1)")
        self.levels = list(levels)
        self.target_ms, self.queue_high = target_ms, queue_high
        self.patience, self.headroom = patience, headroom
        self.level = len(self.levels) - 1
        self._over = self._under = 0

    @property
    def current(self) -> Servable:
        return self.levels[self.level]

    def observe(self, queue_len: int, step_ms: float | None) -> int:
        """Take one load observation; return the (possibly new) level."""
        t = self.target_ms
        over = queue_len > self.queue_high or (t is not None and step_ms is not None
                                               and step_ms > t)
        under = queue_len == 0 and (t is None or step_ms is None or step_ms < self.headroom * t)
        self._over = self._over + 1 if over else 0
        self._under = self._under + 1 if under and not over else 0
        if self._over >= self.patience and self.level > 0:
            self.level -= 1
            self._over = 0
        elif self._under >= self.patience and self.level < len(self.levels) - 1:
            self.level += 1
            self._under = 0
        return self.level

    def idle(self) -> None:
        """Nothing running and nothing waiting: the next request gets the largest submodel."""
        self.level = len(self.levels) - 1
        self._over = self._under = 0

    def choose(self, budget_ms: float | None = None) -> Servable:
        """The submodel for an ``auto`` request: the current level, or a smaller one whose
        measured per-token latency fits the request's budget (the cheapest when none does)."""
        if budget_ms is None:
            return self.current
        for sub in reversed(self.levels[: self.level + 1]):
            if sub.decode_ms is not None and sub.decode_ms <= budget_ms:
                return sub
        return self.levels[0]
