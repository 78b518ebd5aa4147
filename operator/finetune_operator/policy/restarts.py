"""Restarting the gang at pod level: counting the failure toward its class's limit, the backoff,
and the next attempt once the old gang is gone; or, after an out-of-memory failure with a smaller
micro batch left, at once (policy/memory.py). In-place restarts are counted in policy/in_place.py."""

from __future__ import annotations

from datetime import timedelta

from finetune_operator.api.status import FineTuneJobStatus, MicroBatch, Phase
from finetune_operator.policy import memory
from finetune_operator.policy.actions import Event
from finetune_operator.policy.backoff import backoff_seconds
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition
from finetune_operator.policy.failures import Outcome, Verdict
from finetune_operator.policy.observed import ObservedPod
from finetune_operator.policy.transitions import Decision, Observed, delete_pods, fail, start_attempt


def begin_restart(obs: Observed, d: Decision, current: list[ObservedPod], cause: Verdict) -> None:
    st, policy = d.status, obs.job.spec.run_policy
    counted = cause.outcome is Outcome.RESTART
    if counted and st.restarts >= policy.max_restarts:
        message = f"{cause.reason}: {cause.message}; maxRestarts {policy.max_restarts} reached"
        fail(obs, d, current, Reason.BACKOFF_LIMIT_EXCEEDED, message)
        return
    if not counted and st.infra_restarts >= policy.max_infrastructure_restarts:
        limit = policy.max_infrastructure_restarts
        message = f"{cause.reason}: {cause.message}; maxInfrastructureRestarts {limit} reached"
        fail(obs, d, current, Reason.INFRASTRUCTURE_RESTART_LIMIT_EXCEEDED, message)
        return
    if counted:
        st.restarts += 1
    else:
        st.infra_restarts += 1
    st.restart_class = "Application" if counted else "Infrastructure"
    st.phase = Phase.RESTARTING
    set_condition(st, ConditionType.RESTARTING, True, cause.reason, cause.message, obs.now)
    set_condition(st, ConditionType.RUNNING, False, cause.reason, "", obs.now)
    delay = backoff(obs, st)
    d.events.append(Event("Warning", Reason.RANK_FAILED, cause.message or cause.reason))
    note = "" if counted else ", not counted toward maxRestarts"
    message = f"attempt {st.attempt} failed ({cause.reason}); attempt {st.attempt + 1} in {delay:.0f}s{note}"
    d.events.append(Event("Normal", ConditionType.RESTARTING, message))
    d.actions += delete_pods(current, obs.now)
    d.wake(delay)


def restart_smaller(
    obs: Observed, d: Decision, current: list[ObservedPod], cause: Verdict, smaller: MicroBatch
) -> None:
    """Out of memory with a smaller micro batch left (policy/memory.py): the gang restarts at once,
    uncounted, charged to application restarts. The size is written in this pass, which creates no
    pods; the pass that starts the next attempt builds its config from it."""
    st = d.status
    st.micro_batch = smaller
    st.restart_class = "Application"
    st.phase = Phase.RESTARTING
    set_condition(
        st, ConditionType.RESTARTING, True, Reason.MICRO_BATCH_REDUCED, smaller.message or "", obs.now
    )
    set_condition(st, ConditionType.RUNNING, False, cause.reason, "", obs.now)
    d.events.append(Event("Warning", Reason.RANK_FAILED, cause.message or cause.reason))
    d.events.append(Event("Normal", Reason.MICRO_BATCH_REDUCED, memory.announcement(obs.job, st, smaller)))
    d.actions += delete_pods(current, obs.now)
    d.wake(1.0)


def backoff(obs: Observed, st: FineTuneJobStatus) -> float:
    """Each class backs off on its own count: an eviction loop slows down however few application
    failures there were, and a lost node does not lengthen the next crash's delay."""
    if memory.restarting_smaller(st):
        return 0.0  # not a retry of the same thing: nothing to back off from
    policy = obs.job.spec.run_policy
    count = st.infra_restarts if st.restart_class == "Infrastructure" else st.restarts
    return backoff_seconds(
        restarts=max(0, count - 1),
        base=policy.backoff_base_seconds,
        cap=policy.backoff_cap_seconds,
        uid=obs.job.metadata.uid or obs.job.metadata.name,
        attempt=st.attempt,
    )


def restarting(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    st = d.status
    restarting = condition(st, ConditionType.RESTARTING)
    began = restarting.last_transition_time if restarting and restarting.last_transition_time else obs.now
    ready_at = began + timedelta(seconds=backoff(obs, st))
    if current:
        d.actions += delete_pods(current, obs.now)  # the gang must be gone before the next one rendezvous
        d.wake(max(5.0, (ready_at - obs.now).total_seconds()))
    elif obs.now < ready_at:
        d.wake((ready_at - obs.now).total_seconds())
    else:
        why = f"attempt {st.attempt + 1} started"
        set_condition(st, ConditionType.RESTARTING, False, Reason.RESTARTED, why, obs.now)
        start_attempt(obs, d)
