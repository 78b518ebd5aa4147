"""The operator's sense of time. Every deadline, backoff and timeout is computed from `now()` and
waited for with `sleep()`, so tests can drive hours of job lifetime with a clock they advance."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        """Return after `seconds`, or as soon as `wake` is set."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        await wait_event(wake, seconds)


async def wait_event(event: asyncio.Event, seconds: float | None) -> bool:
    """Wait until `event` is set (True) or `seconds` pass (False; None waits without a limit).

    Not `asyncio.wait_for`: on Python 3.11 it drops a cancellation that arrives in the same loop
    iteration as the event, so a loop sleeping on it (the operator's timers) cannot be stopped and
    kopf waits for it forever at shutdown. `asyncio.timeout` lets the cancellation through."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(None if seconds is None else max(0.0, seconds)):
            await event.wait()
            return True
    return False
