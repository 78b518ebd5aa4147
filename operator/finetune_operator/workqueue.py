"""A work queue of job keys, in the manner of Kubernetes controllers: every trigger (a job or pod
event, a timer) only adds the job's key; workers take keys and run one reconcile pass each.

- A key waiting in the queue is there once, however many events arrive for it (256 pods starting
  cause a handful of passes, not 256).
- A key is never processed by two workers at once; added while processing, it runs again after.
- `add_after` keeps the earliest wake-up per key: deadlines, backoff ends, progress checks.
- A pass that raises is retried with a per-key exponential backoff, reset by the next success.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from finetune_operator.clock import Clock

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)

ERROR_BACKOFF_BASE = 0.5
ERROR_BACKOFF_CAP = 60.0


class WorkQueue(Generic[K]):
    def __init__(self, clock: Clock, *, batch_seconds: float = 0.0) -> None:
        self.clock = clock
        self.batch_seconds = batch_seconds  # coalesce a burst of events into one pass
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._due: dict[K, datetime] = {}
        self._failures: dict[K, int] = {}
        self._timer_changed = asyncio.Event()

    def add(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

    def add_after(self, key: K, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        due = self.clock.now() + timedelta(seconds=seconds)
        if key not in self._due or due < self._due[key]:
            self._due[key] = due
            self._timer_changed.set()

    def forget(self, key: K) -> None:
        """The job is gone: drop its timers and error history (a queued pass still runs once)."""
        self._due.pop(key, None)
        self._failures.pop(key, None)

    def only_timed(self, key: K) -> bool:
        """Whether the key waits for its timer alone: no pass queued or running, a wake-up set."""
        return key in self._due and not ({key} & (self._queued | self._processing | self._dirty))

    def __len__(self) -> int:
        return len(self._queued) + len(self._due)

    async def run_timers(self) -> None:
        while True:
            now = self.clock.now()
            for key, due in list(self._due.items()):
                if due <= now:
                    del self._due[key]
                    self.add(key)
            wait = min(((due - now).total_seconds() for due in self._due.values()), default=3600.0)
            self._timer_changed.clear()
            await self.clock.sleep(wait, self._timer_changed)

    async def run_worker(self, reconcile: Callable[[K], Awaitable[float | None]]) -> None:
        while True:
            key = await self._ready.get()
            if self.batch_seconds:
                await asyncio.sleep(self.batch_seconds)
            self._queued.discard(key)
            self._processing.add(key)
            try:
                requeue_after = await reconcile(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(ERROR_BACKOFF_CAP, ERROR_BACKOFF_BASE * 2 ** (failures - 1))
                log.warning("reconcile of %s failed (%s); retrying in %.1fs", key, _brief(exc), delay)
                self.add_after(key, delay)
            else:
                self._failures.pop(key, None)
                if requeue_after is not None:
                    self.add_after(key, requeue_after)
            finally:
                self._processing.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)


def _brief(exc: BaseException) -> str:
    """One line naming the error; API exceptions carry response bodies that do not belong in logs."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"{type(exc).__name__} {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {str(exc)[:200]}"
