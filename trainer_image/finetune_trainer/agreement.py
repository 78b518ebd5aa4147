"""The ranks' agreement, after every optimizer step, on whether to stop or to checkpoint.

A SIGTERM reaches each rank at its own moment and each rank's clock says "checkpoint.everyMinutes
elapsed" at its own step, but a stop or a checkpoint is collective: a rank acting alone would wait
in a collective the others skipped. So after each step the ranks all-reduce (max) the two flags,
started at once and running while the next step computes; its result decides after that next step,
the same step on every rank. On the final step there is no next step to overlap with, so that
step's own flags decide.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from finetune_trainer import process_group


class StopFlag:
    """Set by SIGTERM/SIGINT; read at step boundaries, never acted on inside a collective."""

    def __init__(self) -> None:
        self.requested = False
        self.at: float | None = None  # when the first signal came (monotonic): the grace period's start
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.at = self.at if self.at is not None else time.monotonic()


@dataclass(frozen=True)
class Agreed:
    stop: bool
    time_due: bool  # checkpoint.everyMinutes elapsed since the last checkpoint on some rank


class StopOrCheckpointVote:
    """One vote per step; `agree` returns what every rank decided, identical on all of them."""

    def __init__(
        self, stop: StopFlag, *, every_seconds: float, start: int, device: Any, timeout: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.stop = stop
        self.every_seconds = every_seconds
        self.device = device
        self.timeout = timeout
        self._clock = clock
        self._last_checkpoint = clock()
        self._checkpointed_at = start
        self._in_flight: Callable[[], list[float]] | None = None

    def agree(self, done: int, *, last: bool) -> Agreed:
        """Cast this step's vote and read the previous step's result (this one's on the last step)."""
        time_due = self.every_seconds > 0 and self._clock() - self._last_checkpoint >= self.every_seconds
        agreed = self._in_flight() if self._in_flight is not None else [0.0, 0.0]
        if self._checkpointed_at == done - 1:
            agreed[1] = 0.0  # raised before the checkpoint the previous step took
        self._in_flight = process_group.all_reduce_started(
            [float(self.stop.requested), float(time_due)], "max", self.device, self.timeout
        )
        if last:
            agreed, self._in_flight = self._in_flight(), None
        return Agreed(stop=bool(agreed[0]), time_due=bool(agreed[1]))

    def checkpointed(self, done: int) -> None:
        """A checkpoint was taken after step `done`: the time trigger starts over."""
        self._last_checkpoint, self._checkpointed_at = self._clock(), done

    def settle(self) -> None:
        """Wait for the vote still in flight: every collective this rank started is finished before exit."""
        if self._in_flight is not None:
            self._in_flight()
