"""A clock for tests: it runs at real speed, and a test can jump it forward (past a startup
timeout, a TTL) without waiting. Sleepers wake on every jump and check their deadline again."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta


class JumpingClock:
    def __init__(self) -> None:
        self._offset = timedelta()
        self._jumped = asyncio.Event()

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def jump(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)
        self._jumped.set()
        self._jumped = asyncio.Event()

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        until = self.now() + timedelta(seconds=seconds)
        while not wake.is_set():
            left = (until - self.now()).total_seconds()
            if left <= 0:
                return
            waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(self._jumped.wait())]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
