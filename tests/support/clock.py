"""A clock for tests: it runs at real speed, and a test can jump it forward (past a startup
timeout, a TTL) without waiting. Thread-safe: the operator runs in a thread of its own, so sleepers
look at the clock every few milliseconds instead of waiting on an event of another loop."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

from finetune_operator.clock import wait_event

TICK = 0.02


class JumpingClock:
    def __init__(self) -> None:
        self._offset = timedelta()
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset

    def jump(self, seconds: float) -> None:
        with self._lock:
            self._offset += timedelta(seconds=seconds)

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        until = self.now() + timedelta(seconds=seconds)
        while not wake.is_set():
            left = (until - self.now()).total_seconds()
            if left <= 0:
                return
            await wait_event(wake, min(left, TICK))
