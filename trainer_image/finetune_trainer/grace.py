"""Whether to start the emergency checkpoint after a SIGTERM: only if it can finish in time.

The deadline: torchrun's agent gives the workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after it
forwarded the SIGTERM (the pod's grace period less contract.SHUTDOWN_MARGIN_SECONDS; the local
backend sets the same env), then SIGKILLs them; so each rank's deadline is its own signal's arrival
plus that timeout. Without the env (or on a rank that was told to stop by the vote before its own
signal came) the deadline is unknown and the save is started, as it always was.

The estimate: the last save's duration from its snapshot to its commit, measured by rank 0
(checkpointing.py), plus what is left (by that measure) of a save still in flight, which the
emergency save waits for first. With no save measured yet (a process's first), it is unknown and the
save is started: a save cut short by the SIGKILL loses nothing, it is never committed.

Agreement: the ranks reach this point at the same step (the stop was voted), and one all-reduce
(max) gives every rank the same four figures: the tightest time left over all ranks, and rank 0's
last save, in-flight remainder and last committed step. Every rank then computes the same plan from
them, so a gang never has half its ranks in a save the others skipped. The rule itself is the operator's
(finetune_operator.policy.grace.fits), so its warnings and this decision cannot drift apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import contract
from finetune_operator.policy.grace import SAFETY_FACTOR, SAFETY_SECONDS, fits, needed

from finetune_trainer import process_group

NOTHING = -1.0  # "no figure" in the all-reduce: every real figure is >= 0


@dataclass(frozen=True)
class Plan:
    save: bool
    why: str  # the log line and, when skipped, the termination reason


def deadline(signalled_at: float | None, env: Mapping[str, str] = os.environ) -> float | None:
    """The monotonic time the agent SIGKILLs this rank, or None when it cannot be known."""
    raw = env.get(contract.ENV_SHUTDOWN_TIMEOUT)
    if signalled_at is None or not raw:
        return None
    try:
        return signalled_at + float(raw)
    except ValueError:
        return None


def plan(
    *, last_save: float | None, left: float | None, last_committed: int | None, step: int,
    in_flight: float = 0.0,
) -> Plan:  # fmt: skip
    """Pure: start the emergency save of `step`, or skip it, and why. `in_flight`: what is left of a
    save still running, which the emergency save waits for first."""
    if left is None:
        return Plan(True, f"emergency checkpoint of step {step}: deadline unknown, saving")
    if last_save is None:
        why = f"emergency checkpoint of step {step}: no save measured yet, {left:.0f}s left, saving"
        return Plan(True, why)
    tail = f" (and {in_flight:.0f}s for the save still in flight)" if in_flight >= 0.5 else ""
    estimate = last_save + in_flight
    if fits(estimate, left):
        return Plan(True, f"emergency checkpoint of step {step}: the last save took {last_save:.0f}s"
                          f"{tail}, {left:.0f}s left")  # fmt: skip
    committed = f"step {last_committed}" if last_committed is not None else "none"
    return Plan(
        False,
        f"emergency checkpoint skipped: the last save took {last_save:.0f}s{tail}, {left:.0f}s left before "
        f"the grace period ends (needs {needed(estimate):.0f}s: x{SAFETY_FACTOR} + {SAFETY_SECONDS:.0f}s); "
        f"the last committed checkpoint is {committed}",
    )


def agreed_plan(
    device: Any, *, step: int, deadline_at: float | None, last_save: float | None, in_flight: float | None,
    last_committed: int | None, now: float | None = None,
) -> Plan:  # fmt: skip
    """Collective: every rank calls it at the same step and gets the same plan (the figures a rank
    does not hold, it passes as None)."""
    now = time.monotonic() if now is None else now
    # max over -left is the smallest left; a rank without a deadline sends -inf (it does not bind).
    own = float("-inf") if deadline_at is None else -max(0.0, deadline_at - now)
    tightest, saved, flight, newest = process_group.all_reduce(
        [own, _figure(last_save), _figure(in_flight), _figure(last_committed)], "max", device
    )
    return plan(
        last_save=saved if saved >= 0 else None,
        in_flight=max(0.0, flight),
        left=-tightest if tightest != float("-inf") else None,
        last_committed=int(newest) if newest >= 0 else None,
        step=step,
    )


def _figure(value: float | None) -> float:
    return NOTHING if value is None else float(value)
