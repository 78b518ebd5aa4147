"""Goodput: where a job's time went, accounted by the decide step, purely.

Each pass charges the time since `goodput.accountedUntil` to what the job was doing according to the
status it started from (its phase before this pass decided anything): Running is productive,
Restarting, the Starting that follows a restart and its Running until it reports the highest step
any attempt reached before (reloading, then redoing the steps since the checkpoint it resumed from)
are lost to that restart's class, the Starting of
the first attempt or of a resumed one is queueing, and so is Queued (a gang scheduler holding any
attempt); Suspended or finished time is not accounted.
A pass whose only change is goodput need not write it: the next write charges the whole interval
since the last one, so nothing is lost and the figures cost no extra status writes.

Checkpoint stalls come from the trainer's progress report (cumulative per attempt), so they are
counted inside productive time and shown apart; the percentage subtracts them.
"""

from __future__ import annotations

from datetime import datetime

from finetune_operator.api.status import FineTuneJobStatus, Goodput, Phase
from finetune_operator.policy.conditions import ConditionType, condition

WAITING = {"Queue": "queued_seconds", "Application": "application_restart_seconds",
           "Infrastructure": "infrastructure_restart_seconds"}  # fmt: skip


def _stepped_this_attempt(status: FineTuneJobStatus) -> bool:
    """A progress report newer than the attempt's Running transition: it has trained a step."""
    running = condition(status, ConditionType.RUNNING)
    reported = status.progress.updated_at if status.progress else None
    began = running.last_transition_time if running else None
    return reported is not None and (began is None or reported >= began)


def _redoing(before: FineTuneJobStatus, goodput: Goodput) -> bool:
    """Still short of the step the attempts before this one reached: training it again."""
    step = before.progress.step if before.progress else None
    return goodput.redo_until_step is not None and step is not None and step < goodput.redo_until_step


def _bucket(before: FineTuneJobStatus, goodput: Goodput) -> str | None:
    if before.phase == Phase.RUNNING:
        if goodput.waiting_for in ("Application", "Infrastructure") and (
            not _stepped_this_attempt(before) or _redoing(before, goodput)
        ):
            # After a restart the ranks run but reload, then redo the steps since the checkpoint.
            return WAITING[goodput.waiting_for]
        return "productive_seconds"
    if before.phase == Phase.QUEUED:
        return "queued_seconds"  # a gang scheduler held the attempt, whatever started it
    if before.phase == Phase.RESTARTING:
        return WAITING["Infrastructure" if before.restart_class == "Infrastructure" else "Application"]
    if before.phase in (Phase.PENDING, Phase.STARTING, None):
        return WAITING[goodput.waiting_for or "Queue"]
    return None  # suspended or finished


def account(before: FineTuneJobStatus, after: FineTuneJobStatus, now: datetime) -> None:
    """Charge the time since the last accounting to `before`'s activity, into `after.goodput`."""
    goodput = (after.goodput or Goodput()).model_copy()
    since = goodput.accounted_until
    bucket = _bucket(before, goodput)
    if since is not None and bucket is not None and now > since:
        setattr(goodput, bucket, getattr(goodput, bucket) + (now - since).total_seconds())
    if after.progress is not None and after.progress.checkpoint_stall_seconds is not None:
        goodput.checkpoint_stall_seconds = (
            goodput.stalls_before_attempt + after.progress.checkpoint_stall_seconds
        )
    if after.progress is not None and after.progress.step is not None:
        goodput.step_reached = max(goodput.step_reached or 0, after.progress.step)
    goodput.accounted_until = now
    _percent(goodput)
    after.goodput = goodput


def _percent(goodput: Goodput) -> None:
    total = (
        goodput.productive_seconds
        + goodput.queued_seconds
        + goodput.application_restart_seconds
        + goodput.infrastructure_restart_seconds
    )
    useful = max(0.0, goodput.productive_seconds - goodput.checkpoint_stall_seconds)
    goodput.percent = round(100.0 * useful / total, 2) if total > 0 else None


def restarted_in_place(status: FineTuneJobStatus, failed_at: datetime, now: datetime) -> None:
    """The attempt's processes restarted in place after a failure at `failed_at`, learnt of now. The
    passes since then saw running pods and charged them as productive: that time moves to application
    restart time, and the steps the restarted processes redo are charged there too (the redo rule)."""
    goodput = (status.goodput or Goodput()).model_copy()
    moved = min(goodput.productive_seconds, max(0.0, (now - failed_at).total_seconds()))
    goodput.productive_seconds -= moved
    goodput.application_restart_seconds += moved
    goodput.waiting_for = "Application"
    goodput.redo_until_step = goodput.step_reached
    _percent(goodput)
    status.goodput = goodput


def start_attempt(status: FineTuneJobStatus, charged_to: str) -> None:
    """A new attempt begins: its Starting time is charged to `charged_to`, the previous attempt's
    checkpoint stalls are kept (the trainer's count starts again), and so is the highest step
    reached so far, up to which the new attempt only redoes work."""
    goodput = (status.goodput or Goodput()).model_copy()
    goodput.waiting_for = charged_to  # type: ignore[assignment]
    goodput.stalls_before_attempt = goodput.checkpoint_stall_seconds
    reported = status.progress.step if status.progress else None
    goodput.redo_until_step = max(goodput.step_reached or 0, reported or 0) or None
    status.goodput = goodput
    if status.progress is not None:
        # The progress shown until the new attempt reports is the old attempt's: its stalls are in
        # stalls_before_attempt now and must not be added again by the passes in between.
        # Its in-place restarts are counted already and are not the new attempt's.
        status.progress = status.progress.model_copy(
            update={"checkpoint_stall_seconds": None, "in_place_restarts": None}
        )
