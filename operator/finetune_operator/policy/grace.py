"""The emergency checkpoint against the pod's grace period: one rule, three users.

On SIGTERM a rank has the pod's terminationGracePeriodSeconds less contract.SHUTDOWN_MARGIN_SECONDS
(torchrun's agent SIGKILLs the workers then: TORCH_ELASTIC_SHUTDOWN_TIMEOUT) to write its emergency
checkpoint. The trainer starts that save only when the last save's measured duration, with a safety
margin, fits the time left (finetune_trainer/grace.py); the operator and `ftjob validate` warn when
the configured grace period could not fit the job's measured save even if the SIGTERM came at once.
All three use `fits`, so a warning means exactly "the trainer would skip its emergency save".

The margin: saves vary (the link, the disk, the other ranks), so the estimate is scaled by
SAFETY_FACTOR and padded by SAFETY_SECONDS. A save that starts and cannot finish loses nothing
(no manifest, no checkpoint), but it turns a clean exit 143 into a SIGKILL and holds the node for
the whole grace period, which is why a save is skipped only on evidence: with nothing measured
(the first save of a run), the trainer tries.
"""

from __future__ import annotations

import math

from finetune_operator import contract
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.policy.actions import Event

SAFETY_FACTOR = 1.25
SAFETY_SECONDS = 2.0
FIELD = "spec.runPolicy.terminationGracePeriodSeconds"
REASON = "GracePeriodTooShort"


def shutdown_seconds(grace_period: int) -> int:
    """What the ranks get after a SIGTERM: the grace period less the launcher's margin."""
    return max(1, grace_period - contract.SHUTDOWN_MARGIN_SECONDS)


def needed(save_seconds: float) -> float:
    """The time a save measured at `save_seconds` is given to start at all."""
    return save_seconds * SAFETY_FACTOR + SAFETY_SECONDS


def fits(save_seconds: float, left_seconds: float) -> bool:
    return needed(save_seconds) <= left_seconds


def warning(grace_period: int, save_seconds: float | None) -> str | None:
    """Why the grace period cannot hold the emergency checkpoint, or None (also when nothing was
    measured yet: a floor by model size would be a guess the storage link decides, not the model)."""
    if save_seconds is None:
        return None
    budget = shutdown_seconds(grace_period)
    if fits(save_seconds, budget):
        return None
    raise_to = math.ceil(needed(save_seconds)) + contract.SHUTDOWN_MARGIN_SECONDS
    return (
        f"{FIELD} is {grace_period}s: after the {contract.SHUTDOWN_MARGIN_SECONDS}s margin a rank has "
        f"{budget}s for its emergency checkpoint, but the last save took {save_seconds:.0f}s "
        f"(x{SAFETY_FACTOR} + {SAFETY_SECONDS:.0f}s margin = {needed(save_seconds):.0f}s); on SIGTERM the "
        f"trainer will skip it and resume from the last committed checkpoint. Raise {FIELD} to at least "
        f"{raise_to}s"
    )


def warn(grace_period: int, status: FineTuneJobStatus, events: list[Event]) -> None:
    """Keep status.gracePeriodWarning current; the Warning event goes out when it first appears
    (not on every pass, nor on every checkpoint's slightly different figure)."""
    measured = status.latest_checkpoint.duration_seconds if status.latest_checkpoint else None
    message = warning(grace_period, measured)
    if message is not None and status.grace_period_warning is None:
        events.append(Event("Warning", REASON, message))
    status.grace_period_warning = message
