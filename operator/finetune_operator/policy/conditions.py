"""Kubernetes-style conditions on the job's status: set one (its transition time moves only when
its status does), read one."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from finetune_operator.api.status import Condition, FineTuneJobStatus


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
