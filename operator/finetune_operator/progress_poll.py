"""Progress of Running jobs, read apart from the reconcile pass.

A Running job's rank 0 prints a report every few steps; copying it into status is the operator's
most frequent work, and at hundreds of jobs it is most of the API traffic. So it is not a reconcile
pass (a job read, a pod list, a Service read, a log read, and the watch echo of its own write
running the same again): once per poll interval each Running job costs one bounded log read (what
rank 0 wrote since the previous poll, at most TAIL_BYTES) and, only when that holds a newer report,
one merge patch of status.progress. The pass still decides everything (the stall check reads the
patched progress back); its own writes' watch echoes are dropped by the handlers.

Which jobs are Running, with which rank-0 pod, is what the last pass of each job saw: a cache of
the cluster's state, rebuilt by the passes after a restart, never a fact of its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime

from finetune_operator.backends.base import JobKey
from finetune_operator.backends.kubernetes import KubernetesBackend
from finetune_operator.clock import Clock

log = logging.getLogger("finetune_operator.progress")


@dataclass
class Target:
    pod: str  # the current attempt's rank-0 pod
    updated_at: datetime | None  # the report already in status


class ProgressPoller:
    def __init__(self, backend: KubernetesBackend, clock: Clock, interval: float, concurrency: int) -> None:
        self.backend, self.clock, self.interval = backend, clock, interval
        self.concurrency = max(1, concurrency)
        self.targets: dict[JobKey, Target] = {}

    def track(self, key: JobKey, pod: str | None, updated_at: datetime | None = None) -> None:
        """What the latest pass saw: a Running job's rank-0 pod and the report in its status, or
        None to stop polling it."""
        if pod is None:
            self.targets.pop(key, None)
        else:
            self.targets[key] = Target(pod, updated_at)

    async def poll(self, key: JobKey) -> bool:
        """One job's poll; True when a newer report went into its status."""
        target = self.targets.get(key)
        if target is None:
            return False
        # what rank 0 wrote since the previous poll, with a margin for a late or slow one
        since = math.ceil(2 * self.interval) + 5
        report = await self.backend.read_progress(key[0], target.pod, since_seconds=since)
        if report is None or report.progress.updated_at is None:
            return False
        if target.updated_at is not None and report.progress.updated_at <= target.updated_at:
            return False
        if not await self.backend.patch_progress(key, report):
            self.targets.pop(key, None)
            return False
        target.updated_at = report.progress.updated_at
        return True

    async def run(self) -> None:
        wake = asyncio.Event()
        gate = asyncio.Semaphore(self.concurrency)

        async def one(key: JobKey) -> None:
            async with gate:
                try:
                    await self.poll(key)
                except Exception as exc:  # a failed poll is retried by the next one
                    log.debug("progress of %s/%s not read: %s", *key, type(exc).__name__)

        while True:
            await self.clock.sleep(self.interval, wake)
            await asyncio.gather(*(one(key) for key in list(self.targets)))
