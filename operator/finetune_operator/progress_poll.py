"""Progress of Running jobs, read apart from the reconcile pass.

A Running job's rank 0 prints a report every few steps; copying it into status is the operator's
most frequent work, and at hundreds of jobs it is most of the API traffic. So it is not a reconcile
pass (a job read, a pod list, a Service read, a log read, and the watch echo of its own write
running the same again): once per poll interval each Running job costs one bounded log read (what
rank 0 wrote since the previous poll, at most TAIL_BYTES) and, only when that holds a newer report,
one merge patch of status.progress. The pass still decides everything (the stall check reads the
patched progress back); its own writes' watch echoes are dropped by the watch filter.

Which jobs are Running, with which rank-0 pod, is what the last pass of each job saw: a cache of
the cluster's state, rebuilt by the passes after a restart, never a fact of its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import urllib3
from kubernetes.client.exceptions import ApiException

from finetune_operator import contract
from finetune_operator.api import FineTuneJob, FineTuneJobStatus, Phase
from finetune_operator.backends.base import JobKey
from finetune_operator.backends.kube_api import KubeApi
from finetune_operator.builders.naming import pod_name
from finetune_operator.clock import Clock
from finetune_operator.policy.observed import ObservedPod, rank0_of_current_attempt
from finetune_operator.progress import TAIL_BYTES, ProgressReport, parse_last
from finetune_operator.watch_filter import WatchFilter

log = logging.getLogger("finetune_operator.progress")
LOG_TAIL_LINES = 200  # progress lines are written every few steps; warnings in between are few


class ProgressLog:
    """Rank 0's reports: read from its log, copied into the job's status."""

    def __init__(self, api: KubeApi, watch: WatchFilter) -> None:
        self.api, self.watch = api, watch

    async def for_pass(self, job: FineTuneJob, pods: Iterable[ObservedPod]) -> ProgressReport | None:
        """The report a reconcile pass reads itself: a finished rank 0's last one, or a running
        one's before its job is Running. A Running job's running rank 0 is the poller's, so the
        pass costs a job read and a pod list, nothing more."""
        rank0 = rank0_of_current_attempt(job, pods)
        if rank0 is None or rank0.phase not in ("Running", "Succeeded", "Failed"):
            return None
        job_running = job.status is not None and job.status.phase == Phase.RUNNING
        if job_running and rank0.phase == "Running":
            return None
        return await self.read_progress(job.metadata.namespace, rank0.name)

    async def read_progress(
        self, namespace: str, pod: str, since_seconds: int | None = None
    ) -> ProgressReport | None:
        """The newest report in a bounded read of the pod's log: the last LOG_TAIL_LINES lines, or
        with `since_seconds` what the trainer wrote since then, at most TAIL_BYTES either way (the
        kubelet streams a whole log otherwise). None when unreadable or without a report."""
        bounds: dict[str, Any] = {"limit_bytes": TAIL_BYTES}
        if since_seconds is None:
            bounds["tail_lines"] = LOG_TAIL_LINES
        else:
            bounds["since_seconds"] = since_seconds
        try:
            response = await self.api.call(
                "get pods/log",
                self.api.core.read_namespaced_pod_log,
                pod,
                namespace,
                container=contract.CONTAINER_NAME,
                **bounds,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.debug("log of %s unreadable: %s", pod, type(exc).__name__)
            return None
        return parse_last(response.data.decode("utf-8", errors="replace"))

    async def patch_progress(self, key: JobKey, report: ProgressReport) -> bool:
        """Copy a report into status.progress/latestCheckpoint: a merge patch of those fields only,
        unconditional (they are the trainer's word, which no decision rests on but the stall check,
        which the next pass reads back). False when the job is gone."""
        status: dict[str, Any] = {"progress": report.progress.to_wire()}
        if report.latest_checkpoint is not None:
            status["latestCheckpoint"] = report.latest_checkpoint.to_wire()
        try:
            await self.watch.own_write(key, self.api.patch_status(key, {"status": status}))
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


class ProgressSource(Protocol):
    async def read_progress(
        self, namespace: str, pod: str, since_seconds: int | None = None
    ) -> ProgressReport | None: ...

    async def patch_progress(self, key: JobKey, report: ProgressReport) -> bool: ...


@dataclass
class Target:
    pod: str  # the current attempt's rank-0 pod
    updated_at: datetime | None  # the report already in status
    in_place_counted: int = 0  # the attempt's in-place restarts the status counts


def _restarted_in_place(report: ProgressReport, counted: int) -> bool:
    return any(r.number > counted for r in report.progress.in_place_restarts or [])


class ProgressPoller:
    def __init__(self, source: ProgressSource, clock: Clock, interval: float, concurrency: int) -> None:
        self.source, self.clock, self.interval = source, clock, interval
        self.concurrency = max(1, concurrency)
        self.targets: dict[JobKey, Target] = {}
        # A report of an in-place restart is a decision's input (it counts toward maxRestarts), not
        # only the trainer's word: it asks for a pass (the runtime's queue).
        self.on_restart: Callable[[JobKey], None] = lambda key: None

    def follow(self, key: JobKey, status: FineTuneJobStatus | None) -> float | None:
        """After a pass (status None: the job is gone): poll its rank 0 while it is Running. The
        pass itself need not come back for progress, so no wake-up is asked for."""
        if status is None or status.phase != Phase.RUNNING:
            self.track(key, None)
        else:
            updated_at = status.progress.updated_at if status.progress else None
            self.track(key, pod_name(key[1], status.attempt, 0), updated_at, status.attempt_in_place_restarts)
        return None

    def track(
        self, key: JobKey, pod: str | None, updated_at: datetime | None = None, in_place_counted: int = 0
    ) -> None:
        """What the latest pass saw: a Running job's rank-0 pod, the report in its status and the
        in-place restarts it counted, or None to stop polling it."""
        if pod is None:
            self.targets.pop(key, None)
        else:
            self.targets[key] = Target(pod, updated_at, in_place_counted)

    async def poll(self, key: JobKey) -> bool:
        """One job's poll; True when a newer report went into its status."""
        target = self.targets.get(key)
        if target is None:
            return False
        # what rank 0 wrote since the previous poll, with a margin for a late or slow one
        since = math.ceil(2 * self.interval) + 5
        report = await self.source.read_progress(key[0], target.pod, since_seconds=since)
        if report is None or report.progress.updated_at is None:
            return False
        if target.updated_at is not None and report.progress.updated_at <= target.updated_at:
            return False
        if not await self.source.patch_progress(key, report):
            self.targets.pop(key, None)
            return False
        target.updated_at = report.progress.updated_at
        if _restarted_in_place(report, target.in_place_counted):
            target.in_place_counted = max(r.number for r in report.progress.in_place_restarts or [])
            self.on_restart(key)
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
