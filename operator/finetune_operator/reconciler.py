"""One reconcile pass: observe -> decide -> write status -> emit events -> act.

The status is written BEFORE the actions. It is the record of intent: a pass that dies after writing
"attempt 2 starting" but before creating the pods is finished by the next pass (the pods are missing,
so they are created), whereas pods created before a status that never got written would be taken for
strangers and deleted. The write is conditional on the job being unchanged since it was observed, so
two passes that decided from the same state (a retry, a second replica) cannot both count a restart:
the loser observes again and finds the restart already recorded.

A create the API server refuses (quota, LimitRange, Pod Security, a webhook, invalid fields) is not
retried blindly: the refusal (the API's code, reason and message) is recorded in
status.createRefusal, and the decide step, which sees it as observed state, shows it as a
condition and an event, retries a retriable one until the startup deadline, and fails an invalid
one at once.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from finetune_operator.api import FineTuneJobStatus
from finetune_operator.api.status import ACTIVE_PHASES, CreateRefusal, Phase
from finetune_operator.backends.base import Backend, CreateRefused, JobKey
from finetune_operator.clock import Clock
from finetune_operator.metrics import Metrics
from finetune_operator.policy.decide import decide
from finetune_operator.settings import OperatorSettings

log = logging.getLogger("finetune_operator.reconcile")


class ProgressFollower(Protocol):
    def follow(self, key: JobKey, status: FineTuneJobStatus | None) -> float | None:
        """Told the status each pass left (None: the job is gone); returns when the pass must look
        again to read progress itself (None: someone else reads it)."""


class PassReadsProgress:
    """Where nothing reads progress apart from the pass (the local backend reads it in `observe`): a
    Running job is looked at again every poll interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    def follow(self, key: JobKey, status: FineTuneJobStatus | None) -> float | None:
        return self.interval if status is not None and status.phase == Phase.RUNNING else None


def status_changed(old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> bool:
    """Whether the status must be written. Goodput alone is not a reason: it is accounted up to
    `now` on every pass, and the next write carries whatever accrued meanwhile."""

    def wire(status: FineTuneJobStatus) -> dict[str, object]:
        body = status.to_wire()
        body.pop("goodput", None)
        return body

    return wire(old or FineTuneJobStatus()) != wire(new)


class Reconciler:
    def __init__(
        self,
        backend: Backend,
        clock: Clock,
        settings: OperatorSettings,
        metrics: Metrics | None = None,
        progress: ProgressFollower | None = None,  # on a cluster: the poller of Running jobs
    ) -> None:
        self.backend, self.clock, self.settings = backend, clock, settings
        self.metrics = metrics or Metrics()
        self.progress = progress or PassReadsProgress(settings.progress_poll_seconds)

    async def reconcile(self, key: JobKey) -> float | None:
        """One pass; returns when the job wants looking at again (seconds), None for never."""
        started = time.perf_counter()
        try:
            return await self._pass(key)
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    async def _pass(self, key: JobKey) -> float | None:
        observed = await self.backend.observe(key, self.clock.now())
        if observed is None:
            self.metrics.forget(key)
            self.progress.follow(key, None)
            return None
        job = observed.job
        decision = decide(observed)
        old, new = job.status, decision.status
        if status_changed(old, new):
            if not await self.backend.write_status(job, new):
                log.info("%s/%s changed while it was reconciled; observing it again", *key)
                return 0.0
            self.metrics.count_restarts(old, new)
            self.metrics.count_time(key, old, new)
        # Events describe the transitions just recorded, so they go out before the actions: an
        # action that fails is retried by the next pass, which has no transition to tell again.
        for event in decision.events:
            await self.backend.emit(job, event)
            log.info(
                "%s/%s %s: %s",
                *key,
                event.reason,
                event.message,
                extra={"job": f"{key[0]}/{key[1]}", "reason": event.reason},
            )
        for action in decision.actions:
            try:
                await self.backend.apply(job, action)
            except CreateRefused as refused:
                log.warning("%s/%s: a create was refused: %s %s", *key, refused.code, refused.reason)
                await self._record_refusal(key, refused)
                return 0.0  # decide on it now
        self.metrics.set_phase(key, new.phase)
        return self._next_look(decision.requeue_after, new, self.progress.follow(key, new))

    async def _record_refusal(self, key: JobKey, refused: CreateRefused) -> None:
        """Write the refusal into the status, on the job as it is now (this pass already wrote its
        status, so the one it observed is stale). A conflict just leaves it to the next pass."""
        observed = await self.backend.observe(key, self.clock.now())
        if observed is None:
            return
        job, now = observed.job, observed.now
        status = (job.status or FineTuneJobStatus()).model_copy(deep=True)
        old = status.create_refusal
        same = old is not None and old.attempt == status.attempt and old.code == refused.code
        status.create_refusal = CreateRefusal(
            attempt=status.attempt,
            code=refused.code,
            reason=refused.reason,
            message=refused.message,
            since=old.since if same and old is not None else now,
            last=now,
        )
        await self.backend.write_status(job, status)

    def _next_look(
        self, requeue_after: float | None, status: FineTuneJobStatus, progress_after: float | None
    ) -> float | None:
        if status.phase not in ACTIVE_PHASES:
            return requeue_after  # finished or suspended: only a TTL or a cleanup brings it back
        polls = [self.settings.resync_seconds]
        polls += [after for after in (requeue_after, progress_after) if after is not None]
        return min(polls)
