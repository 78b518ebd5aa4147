"""Stopping the operator's runtime (kopf's cleanup): workers and timers end, the backend's threads are
released, and a stop that is itself cancelled does not pretend to have finished."""

from __future__ import annotations

import asyncio

import pytest
from finetune_operator.runtime import Runtime
from kubernetes import client

from tests.support.operator import TEST_SETTINGS


def _runtime() -> tuple[Runtime, list[str]]:
    runtime = Runtime(TEST_SETTINGS, client.ApiClient(client.Configuration(host="http://127.0.0.1:9")))
    closed: list[str] = []
    original = runtime.backend.close
    runtime.backend.close = lambda: (closed.append("backend"), original())[1]  # type: ignore[method-assign]
    return runtime, closed


async def _slow_to_die() -> None:
    """A task that takes a while to finish once cancelled (a pass in the middle of an API call)."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(0.5)
        raise


@pytest.mark.asyncio
async def test_stop_ends_every_worker_the_timers_and_the_poller_and_closes_the_backend() -> None:
    runtime, closed = _runtime()
    runtime.start()
    tasks = list(runtime._tasks)
    assert (
        runtime.healthy() and len(tasks) == TEST_SETTINGS.workers + 2
    )  # + the timers and the progress poller
    await asyncio.wait_for(runtime.stop(), timeout=5)
    assert all(t.done() for t in tasks) and not runtime.healthy()
    assert closed == ["backend"]


@pytest.mark.asyncio
async def test_a_stop_cancelled_while_it_waits_is_cancelled_and_still_closes_the_backend() -> None:
    runtime, closed = _runtime()
    runtime.start()
    runtime._tasks.append(asyncio.create_task(_slow_to_die()))
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(runtime.stop())
    await asyncio.sleep(0.05)  # stop() now waits for the slow task
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert closed == ["backend"]
