"""In-place restarts: what an attempt's launchers may do on their own, and counting what they did.

The operator never sees an in-place restart happen: the pods keep running while torchrun's agent in
each of them restarts the training processes (trainer_image/finetune_trainer/gang_agent.py). So it
says beforehand how many restarts the attempt may make and how long each backs off (pod env, from the
application budget left when the attempt starts), and afterwards counts the restarts rank 0 reports
in its progress (status.progress.inPlaceRestarts), each (attempt, number) once: toward maxRestarts,
in events and conditions as a pod-level restart is, and in goodput, where the time from the failure
to the pass that learns of it moves from productive to application restart time, and so do the steps
the restarted processes redo (goodput.restarted_in_place).
"""

from __future__ import annotations

from datetime import datetime

from finetune_operator.api import FineTuneJob
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.policy import goodput
from finetune_operator.policy.actions import Event
from finetune_operator.policy.backoff import backoff_seconds
from finetune_operator.policy.conditions import ConditionType, Reason, set_condition


def allowance(job: FineTuneJob) -> int:
    """The in-place restarts the next attempt may make: runPolicy.inPlaceRestarts, within what is
    left of maxRestarts (each counts toward it)."""
    policy, status = job.spec.run_policy, job.status or FineTuneJobStatus()
    return max(0, min(policy.in_place_restarts, policy.max_restarts - status.restarts))


def backoffs(job: FineTuneJob, attempt: int) -> list[float]:
    """The delay before each of those restarts: the application class's backoff, continuing its count."""
    policy, status = job.spec.run_policy, job.status or FineTuneJobStatus()
    return [
        backoff_seconds(
            restarts=status.restarts + i,
            base=policy.backoff_base_seconds,
            cap=policy.backoff_cap_seconds,
            uid=job.metadata.uid or job.metadata.name,
            attempt=attempt,
        )
        for i in range(allowance(job))
    ]


def count(status: FineTuneJobStatus, now: datetime, events: list[Event]) -> None:
    """Count the current attempt's in-place restarts that the progress reports and status does not
    count yet."""
    reported = (status.progress.in_place_restarts if status.progress else None) or []
    new = sorted(
        (r for r in reported if r.attempt == status.attempt and r.number > status.attempt_in_place_restarts),
        key=lambda r: r.number,
    )
    if not new:
        return
    for restart in new:
        status.restarts += 1
        status.in_place_restarts += 1
        events.append(Event("Warning", Reason.RANK_FAILED, restart.reason))
        events.append(
            Event(
                "Normal",
                Reason.RESTARTED_IN_PLACE,
                f"attempt {status.attempt}: training processes restarted in place ({restart.number}) "
                f"after exit {restart.exit_code}; resumed from the latest checkpoint",
            )
        )
    last = new[-1]
    status.attempt_in_place_restarts = last.number
    status.restart_class = "Application"
    message = f"in-place restart {last.number} of attempt {status.attempt}: {last.reason}"
    set_condition(status, ConditionType.RESTARTING, False, Reason.RESTARTED_IN_PLACE, message, now)
    goodput.restarted_in_place(status, min(r.at for r in new), now)
