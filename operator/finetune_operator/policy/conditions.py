"""Kubernetes-style conditions on the job's status: their types and the reasons the decide step
gives (one spelling each: users and dashboards match on them), set one (its transition time moves
only when its status does), read one."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from finetune_operator.api.status import Condition, FineTuneJobStatus


class ConditionType:
    RUNNING: Final = "Running"
    SUCCEEDED: Final = "Succeeded"
    FAILED: Final = "Failed"
    RESTARTING: Final = "Restarting"
    SUSPENDED: Final = "Suspended"
    QUEUED: Final = "Queued"  # spec.gang: the scheduler holds the attempt's gang
    CREATE_REFUSED: Final = "CreateRefused"  # the API server refused to create a child
    WAITING_FOR_CAPACITY: Final = "WaitingForCapacity"  # a rank waits for room on the cluster (capacity.py)


class Reason:
    """Reasons of conditions and events the decide step sets itself. A failed rank's own reason
    (policy/failures.py) travels as it is; an event announcing a condition has that condition's
    type as its reason."""

    ALL_RANKS_RUNNING: Final = "AllRanksRunning"
    COMPLETED: Final = "Completed"
    CREATED: Final = "Created"
    NEW_ATTEMPT: Final = "NewAttempt"
    SUSPENDED: Final = "Suspended"
    RESUMED: Final = "Resumed"
    RESTARTED: Final = "Restarted"
    RESTARTED_IN_PLACE: Final = "RestartedInPlace"
    RANK_FAILED: Final = "RankFailed"
    POD_MISSING: Final = "PodMissing"
    STALLED: Final = "Stalled"
    GANG_QUEUED: Final = "GangQueued"
    WAITING_FOR_CAPACITY: Final = "WaitingForCapacity"
    CAPACITY_FOUND: Final = "CapacityFound"
    ADMITTED: Final = "Admitted"
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
    INFRASTRUCTURE_RESTART_LIMIT_EXCEEDED: Final = "InfrastructureRestartLimitExceeded"
    # Out of memory: the next attempt trains with a smaller micro batch (policy/memory.py).
    MICRO_BATCH_REDUCED: Final = "MicroBatchReduced"


def set_condition(
    status: FineTuneJobStatus, kind: str, value: bool, reason: str, message: str, now: datetime
) -> None:
    text: Literal["True", "False"] = "True" if value else "False"
    for i, condition in enumerate(status.conditions):
        if condition.type == kind:
            changed = condition.status != text
            status.conditions[i] = condition.model_copy(
                update={
                    "status": text,
                    "reason": reason,
                    "message": message,
                    "last_transition_time": now if changed else condition.last_transition_time,
                }
            )
            return
    status.conditions.append(
        Condition(type=kind, status=text, reason=reason, message=message, last_transition_time=now)
    )


def condition(status: FineTuneJobStatus, kind: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)
