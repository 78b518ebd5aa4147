"""The work queue: one pass per burst of events, never two passes of one job at once, the earliest
timer wins, and failed passes retried with growing delays."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest
from finetune_operator.clock import Clock, SystemClock
from finetune_operator.workqueue import WorkQueue

from tests.support.clock import JumpingClock


async def _run(queue: WorkQueue[str], reconcile: Callable[[str], Awaitable[float | None]], workers: int = 2):
    return [asyncio.create_task(queue.run_worker(reconcile)) for _ in range(workers)] + [
        asyncio.create_task(queue.run_timers())
    ]


async def _settle(tasks: list[asyncio.Task[None]], seconds: float = 0.2) -> None:
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_burst_of_adds_for_one_key_becomes_one_pass() -> None:
    passes: list[str] = []

    async def reconcile(key: str) -> None:
        passes.append(key)

    queue: WorkQueue[str] = WorkQueue(JumpingClock())
    for _ in range(50):
        queue.add("a")
    queue.add("b")
    await _settle(await _run(queue, reconcile))
    assert sorted(passes) == ["a", "b"]


@pytest.mark.asyncio
async def test_a_key_added_while_its_pass_runs_runs_again_after_never_alongside() -> None:
    running, overlaps, passes = set(), [], []
    release = asyncio.Event()
    queue: WorkQueue[str] = WorkQueue(JumpingClock())

    async def reconcile(key: str) -> None:
        overlaps.append(key in running)
        running.add(key)
        passes.append(key)
        if len(passes) == 1:
            queue.add(key)  # an event arrives mid-pass
            await release.wait()
        running.discard(key)

    queue.add("a")
    tasks = await _run(queue, reconcile, workers=4)
    await asyncio.sleep(0.05)
    assert passes == ["a"]
    release.set()
    await _settle(tasks)
    assert passes == ["a", "a"] and not any(overlaps)


@pytest.mark.asyncio
async def test_the_earliest_wake_up_of_a_key_wins_and_a_clock_jump_fires_it() -> None:
    clock = JumpingClock()
    passes: list[str] = []

    async def reconcile(key: str) -> None:
        passes.append(key)

    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add_after("a", 3600)
    queue.add_after("a", 600)
    queue.add_after("a", 7200)
    tasks = await _run(queue, reconcile)
    await asyncio.sleep(0.1)
    assert passes == []
    clock.jump(601)
    await _settle(tasks)
    assert passes == ["a"] and len(queue) == 0


@pytest.mark.asyncio
async def test_a_failing_pass_is_retried_with_doubling_delays_until_it_succeeds() -> None:
    clock = JumpingClock()
    times: list[float] = []

    async def reconcile(key: str) -> None:
        times.append(asyncio.get_running_loop().time())
        if len(times) < 4:
            raise RuntimeError("API server unavailable")

    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add("a")
    await _settle(await _run(queue, reconcile), seconds=4.5)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4
    assert gaps == pytest.approx([0.5, 1.0, 2.0], abs=0.15)


@pytest.mark.asyncio
async def test_a_forgotten_key_loses_its_timers() -> None:
    queue: WorkQueue[str] = WorkQueue(JumpingClock())
    queue.add_after("gone", 10)
    queue.forget("gone")
    assert len(queue) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("clock", [SystemClock(), JumpingClock()], ids=["system clock", "test clock"])
async def test_the_timer_loop_stops_when_cancelled_as_a_timer_is_added(clock: Clock) -> None:
    """The operator's shutdown cancels the timers and waits for them: a cancellation that lands in
    the same loop iteration as the wake-up must still end the loop, or shutdown waits forever."""
    queue: WorkQueue[str] = WorkQueue(clock)
    timers = asyncio.create_task(queue.run_timers())
    await asyncio.sleep(0.05)
    queue.add_after("a", 30)  # wakes the sleeping loop...
    timers.cancel()  # ...in the same iteration as the cancellation
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(timers, timeout=5)
