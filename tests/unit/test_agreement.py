"""The ranks' vote on stopping and checkpointing: what every rank decides after a step, tested with a
stand-in all-reduce (a world of one: the result is this rank's own flags)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from finetune_trainer import agreement
from finetune_trainer.agreement import StopOrCheckpointVote


class _Stop:
    requested = False


class _Reduce:
    """Records the votes cast and how many results were read."""

    def __init__(self) -> None:
        self.cast: list[list[float]] = []
        self.read = 0

    def __call__(
        self, values: list[float], op: str, device: Any, timeout: timedelta
    ) -> Callable[[], list[float]]:
        assert op == "max"
        self.cast.append(list(values))

        def result() -> list[float]:
            self.read += 1
            return list(values)

        return result


@pytest.fixture
def reduce(monkeypatch: pytest.MonkeyPatch) -> _Reduce:
    fake = _Reduce()
    monkeypatch.setattr(agreement.process_group, "all_reduce_started", fake)
    return fake


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _vote(stop: _Stop, every_seconds: float = 0.0, clock: _Clock | None = None) -> StopOrCheckpointVote:
    return StopOrCheckpointVote(
        stop,  # type: ignore[arg-type]
        every_seconds=every_seconds, start=0, device=None, timeout=timedelta(seconds=5),
        clock=clock or _Clock(),
    )  # fmt: skip


def test_a_stop_decides_one_step_after_the_vote_that_carried_it(reduce: _Reduce) -> None:
    stop = _Stop()
    vote = _vote(stop)
    assert not vote.agree(1, last=False).stop
    stop.requested = True
    assert not vote.agree(2, last=False).stop  # cast now, read after the next step
    assert vote.agree(3, last=False).stop


def test_the_last_step_decides_on_its_own_vote(reduce: _Reduce) -> None:
    stop = _Stop()
    vote = _vote(stop)
    vote.agree(1, last=False)
    stop.requested = True
    assert vote.agree(2, last=True).stop
    vote.settle()  # nothing left in flight
    assert reduce.read == 2


def test_a_time_trigger_raised_before_the_previous_checkpoint_does_not_checkpoint_again(
    reduce: _Reduce,
) -> None:
    clock = _Clock()
    vote = _vote(_Stop(), every_seconds=60, clock=clock)
    clock.now = 60
    vote.agree(1, last=False)
    assert vote.agree(2, last=False).time_due  # step 1's vote: time is up
    vote.checkpointed(2)
    assert not vote.agree(3, last=False).time_due  # step 2's vote was cast before that checkpoint
    assert not vote.agree(4, last=False).time_due  # the clock started over at the checkpoint
    clock.now = 120
    vote.agree(5, last=False)
    assert vote.agree(6, last=False).time_due


def test_settle_waits_for_the_vote_in_flight(reduce: _Reduce) -> None:
    vote = _vote(_Stop())
    vote.agree(1, last=False)
    vote.settle()
    assert (len(reduce.cast), reduce.read) == (1, 1)
