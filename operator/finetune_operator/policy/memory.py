"""Out of memory adapts: the micro batch after an OutOfMemory failure (trainer exit 4). Pure.

An out-of-memory failure repeats identically on every restart, so restarting it as it was only
burns the restart budget. What can change without changing the training is how each rank's share
of a global batch is cut: the micro batch shrinks and gradient accumulation grows by the same
factor. The batch schedule picks a step's examples from the step alone (batch_schedule.py), the loss
is the global batch's token-weighted mean however the batch is cut (token_loss.py) and the learning
rate is a function of the optimizer step, so the attempt after the change trains exactly the steps
the original configuration would have (up to floating-point summation order).

- The next size is the largest proper divisor of the current one: half of an even size, and for an
  odd size the most that still divides it (9 -> 3 -> 1), so accumulation stays a whole number and
  the global batch stays exact. From 1 there is nothing left: the job fails with OutOfMemory.
- Such a restart is not counted toward maxRestarts and has no backoff: it is not a retry of the
  same thing, and it is bounded on its own (at most log2(microBatchSize) of them). Its time is
  charged to application restarts in goodput (an application failure caused it).
- The size stays for the rest of the job: status.microBatch is the memory, read by every later
  attempt's trainer config (api/trainer_config.py), whatever failed afterwards, and across operator
  restarts. runPolicy.adaptMicroBatchOnOutOfMemory false stops further reductions; it does not undo one.
"""

from __future__ import annotations

from datetime import datetime

from finetune_operator.api import FineTuneJob
from finetune_operator.api.status import FineTuneJobStatus, MicroBatch
from finetune_operator.api.trainer_config import global_batch_size, micro_batch_in_effect
from finetune_operator.policy.conditions import ConditionType, Reason, condition
from finetune_operator.policy.failures import Outcome, Verdict

OUT_OF_MEMORY = "OutOfMemory"  # the trainer's exit 4 as policy/failures.py names it


def smaller_size(size: int) -> int | None:
    """The largest proper divisor of `size` (its half when even); None for 1."""
    for divisor in range(2, int(size**0.5) + 1):
        if size % divisor == 0:
            return size // divisor
    return 1 if size > 1 else None


def accumulation(job: FineTuneJob, size: int) -> int:
    """Gradient accumulation steps that keep the global batch at micro batch `size`."""
    return global_batch_size(job) // (size * job.spec.data_parallel_size)


def in_effect(job: FineTuneJob, status: FineTuneJobStatus, now: datetime) -> MicroBatch:
    """status.microBatch for an attempt about to start: the size in effect, with its accumulation
    worked out for the current world size (reason and since kept)."""
    size = micro_batch_in_effect(job.model_copy(update={"status": status}))
    kept = status.micro_batch
    if kept is not None and kept.size == size:
        return kept.model_copy(update={"gradient_accumulation_steps": accumulation(job, size)})
    return MicroBatch(
        size=size, gradient_accumulation_steps=accumulation(job, size), reason="Spec", since=now
    )


def reduced(job: FineTuneJob, status: FineTuneJobStatus, cause: Verdict, now: datetime) -> MicroBatch | None:
    """The micro batch the next attempt trains with after `cause`, or None when the failure is not
    an out-of-memory one, adaptation is off, or the micro batch is already 1 (the job fails)."""
    if cause.outcome is not Outcome.FAIL or cause.reason != OUT_OF_MEMORY:
        return None
    if not job.spec.run_policy.adapt_micro_batch_on_out_of_memory:
        return None
    size = micro_batch_in_effect(job.model_copy(update={"status": status}))
    smaller = smaller_size(size)
    if smaller is None:
        return None
    was = f"{size} x {accumulation(job, size)} accumulation"
    return MicroBatch(
        size=smaller,
        gradient_accumulation_steps=accumulation(job, smaller),
        reason="OutOfMemory",
        message=f"attempt {status.attempt} ran out of memory at micro batch {was}",
        since=now,
    )


def announcement(job: FineTuneJob, status: FineTuneJobStatus, micro: MicroBatch) -> str:
    """The Normal event's text: what the next attempt trains with, and that the global batch stays."""
    return (
        f"attempt {status.attempt + 1} with micro batch {micro.size} x "
        f"{micro.gradient_accumulation_steps} accumulation "
        f"(global batch {global_batch_size(job)} unchanged); not counted toward maxRestarts"
    )


def restarting_smaller(status: FineTuneJobStatus) -> bool:
    """The restart under way is a micro batch reduction (it has no backoff)."""
    restarting = condition(status, ConditionType.RESTARTING)
    return (
        restarting is not None
        and restarting.status == "True"
        and restarting.reason == Reason.MICRO_BATCH_REDUCED
    )
