"""The interface between the reconcile pass and the world it runs in."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from finetune_operator.api import FineTuneJob, FineTuneJobStatus
from finetune_operator.policy.actions import Action, Event
from finetune_operator.policy.decide import Observed

JobKey = tuple[str, str]  # (namespace, name)

# Refusals that are the object's or the namespace's policy, not a passing API trouble: 403 (quota,
# LimitRange, Pod Security, a webhook's denial), 400 (a webhook's default code) and 422 (invalid
# fields). Retrying them blindly loops for ever; they are recorded in status instead.
REFUSAL_CODES = frozenset({400, 403, 422})


class CreateRefused(Exception):
    """The API server refused to create a child; carries the API's own code, reason and message."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


class Backend(Protocol):
    async def observe(self, key: JobKey, now: datetime) -> Observed | None:
        """The job and its children as they are now; None when the job no longer exists."""

    async def write_status(self, job: FineTuneJob, status: FineTuneJobStatus) -> bool:
        """Store the new status, on the condition that the job is unchanged since it was observed.
        False when it changed meanwhile: the pass must observe again before acting."""

    async def apply(self, job: FineTuneJob, action: Action) -> None:
        """Carry out one action; one already done (created, deleted) is success."""

    async def emit(self, job: FineTuneJob, event: Event) -> None:
        """Record an event for people to read; best effort, never fails the pass."""
