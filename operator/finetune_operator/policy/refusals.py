"""Creates the API server refused, as the decide step reads them from status.createRefusal (written
by the apply step): shown as a CreateRefused condition with the API's reason and one Warning event;
400 and 422 (the object itself is invalid) fail the job at once; 403 (a quota frees up, an admin
fixes a LimitRange or a namespace label) is tried again every REFUSAL_RETRY_SECONDS and fails once
startupTimeoutSeconds has passed since the first refusal."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from finetune_operator.api.status import CreateRefusal, FineTuneJobStatus
from finetune_operator.policy.actions import Event
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition

REFUSAL_RETRY_SECONDS = 30.0
RETRIABLE_REFUSALS = frozenset({403})


@dataclass
class Judgement:
    events: list[Event] = field(default_factory=list)
    fail: str | None = None  # the Failed condition's message, when the job fails
    wake: float | None = None


def current(st: FineTuneJobStatus) -> CreateRefusal | None:
    refusal = st.create_refusal
    return refusal if refusal is not None and refusal.attempt == st.attempt else None


def hold_seconds(st: FineTuneJobStatus, now: datetime) -> float:
    """How long no create may go out yet: each refused try is a status write, and an immediate
    retry would be refused the same way."""
    refusal = current(st)
    if refusal is None:
        return 0.0
    return max(0.0, REFUSAL_RETRY_SECONDS - (now - refusal.last).total_seconds())


def judge(st: FineTuneJobStatus, *, all_created: bool, startup_timeout: int, now: datetime) -> Judgement:
    """Show the refusal and say whether the job fails; clears it once every child exists."""
    out = Judgement()
    refusal = current(st)
    if refusal is None:
        return out
    if all_created:
        st.create_refusal = None
        why = f"attempt {st.attempt}: every child created"
        set_condition(st, ConditionType.CREATE_REFUSED, False, Reason.CREATED, why, now)
        return out
    text = (
        f"attempt {st.attempt}: the API server refused to create a child "
        f"({refusal.code} {refusal.reason}): {refusal.message}"
    )
    shown = condition(st, ConditionType.CREATE_REFUSED)
    if shown is None or shown.status != "True":
        out.events.append(Event("Warning", ConditionType.CREATE_REFUSED, text))
    set_condition(st, ConditionType.CREATE_REFUSED, True, refusal.reason, text, now)
    if refusal.code not in RETRIABLE_REFUSALS:
        out.fail = text
    elif (now - refusal.since).total_seconds() >= startup_timeout:
        out.fail = f"{text}; still refused after startupTimeoutSeconds {startup_timeout}"
    else:
        out.wake = (refusal.since + timedelta(seconds=startup_timeout) - now).total_seconds()
    return out


def clear_for_new_attempt(st: FineTuneJobStatus, now: datetime) -> None:
    """An earlier attempt's refusal: the new attempt starts with a clean slate."""
    if st.create_refusal is not None:
        st.create_refusal = None
        why = f"attempt {st.attempt} started"
        set_condition(st, ConditionType.CREATE_REFUSED, False, Reason.NEW_ATTEMPT, why, now)
