"""The WaitingForCapacity condition: an attempt whose rank pods the scheduler holds for lack of room
(policy/scheduling.py) says so, with the scheduler's own words and since when, instead of failing at
the startup deadline. Pure, like the rest of policy.

True while any rank of the current attempt waits for capacity (its lastTransitionTime is when the
wait began; an event marks the beginning); False once none does, or once the job is no longer
starting (it runs, restarts, fails, is suspended).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from finetune_operator.api.status import FineTuneJobStatus, Phase
from finetune_operator.policy.actions import Event
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition

WAITING_FOR_CAPACITY: Final = ConditionType.WAITING_FOR_CAPACITY
STARTING_PHASES = frozenset({Phase.STARTING, Phase.QUEUED})


def track(st: FineTuneJobStatus, waits: Sequence[str], now: datetime, events: list[Event]) -> None:
    """Record the attempt's capacity wait. `waits`: the messages of the ranks waiting for capacity
    (failures.WAITING_FOR_CAPACITY verdicts), empty when none waits."""
    current = condition(st, WAITING_FOR_CAPACITY)
    waiting = current is not None and current.status == "True"
    if waits:
        others = f" (and {len(waits) - 1} more rank(s))" if len(waits) > 1 else ""
        message = f"attempt {st.attempt}: {waits[0]}{others}"
        if not waiting:
            events.append(Event("Normal", WAITING_FOR_CAPACITY, message))
        set_condition(st, WAITING_FOR_CAPACITY, True, Reason.WAITING_FOR_CAPACITY, message, now)
    elif waiting:
        why = f"attempt {st.attempt}: no rank waits for capacity any more"
        set_condition(st, WAITING_FOR_CAPACITY, False, Reason.CAPACITY_FOUND, why, now)


def settle(st: FineTuneJobStatus, now: datetime) -> None:
    """A job that left Starting (or Queued) waits for nothing: the condition turns False."""
    current = condition(st, WAITING_FOR_CAPACITY)
    if current is None or current.status != "True" or st.phase in STARTING_PHASES or st.phase is None:
        return
    phase = str(st.phase)
    set_condition(st, WAITING_FOR_CAPACITY, False, phase, f"attempt {st.attempt}: the job is {phase}", now)
