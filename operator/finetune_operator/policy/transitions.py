"""The decide step's vocabulary and its transitions: what a pass observed, what it decided, and
the moves every branch of `decide` shares (deleting pods, starting an attempt, suspending, failing,
finishing). Pure, like the rest of the decide step."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from finetune_operator.api import FineTuneJob
from finetune_operator.api.status import FineTuneJobStatus, Phase, RankCounts
from finetune_operator.policy import goodput, memory, refusals
from finetune_operator.policy.actions import (
    Action,
    CreateAttempt,
    DeleteAttemptConfig,
    DeleteJob,
    DeletePods,
    Event,
)
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition
from finetune_operator.policy.observed import ObservedGroup, ObservedPod
from finetune_operator.progress import ProgressReport

FORCE_DELETE_AFTER = timedelta(seconds=60)  # past a pod's deletion deadline: its node is gone


@dataclass(frozen=True)
class Observed:
    job: FineTuneJob
    pods: tuple[ObservedPod, ...]
    service_exists: bool
    now: datetime
    progress: ProgressReport | None = None
    groups: tuple[ObservedGroup, ...] = ()  # spec.gang's PodGroups (Volcano, Coscheduling)


@dataclass
class Decision:
    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def wake(self, seconds: float) -> None:
        seconds = max(1.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def delete_pods(pods: list[ObservedPod], now: datetime) -> list[Action]:
    """Delete what is not yet going; force what has outstayed its deletion deadline. Names sorted:
    the same observation gives the same actions whatever order a backend listed the pods in."""
    fresh = tuple(sorted(p.name for p in pods if not p.deleting))
    stuck = tuple(
        sorted(
            p.name
            for p in pods
            if p.deleting
            and p.deletion_deadline is not None
            and now - p.deletion_deadline > FORCE_DELETE_AFTER
        )
    )
    out: list[Action] = []
    if fresh:
        out.append(DeletePods(fresh))
    if stuck:
        out.append(DeletePods(stuck, force=True))
    return out


def start_attempt(obs: Observed, d: Decision, *, resumed: bool = False) -> None:
    st, nodes = d.status, obs.job.spec.resources.nodes
    if st.attempt:
        d.actions.append(DeleteAttemptConfig(st.attempt))
    st.attempt += 1
    st.start_time = st.start_time or obs.now
    queued = resumed or st.attempt == 1
    goodput.start_attempt(st, "Queue" if queued else (st.restart_class or "Application"))
    st.phase = Phase.STARTING
    st.ranks = RankCounts()
    st.attempt_in_place_restarts = 0
    st.micro_batch = memory.in_effect(obs.job, st, obs.now)
    refusals.clear_for_new_attempt(st, obs.now)
    d.actions.append(CreateAttempt(st.attempt, tuple(range(nodes))))
    if resumed:
        suspended = condition(st, ConditionType.SUSPENDED)
        if suspended is not None and suspended.last_transition_time is not None:
            st.suspended_seconds += max(0.0, (obs.now - suspended.last_transition_time).total_seconds())
        why = "unsuspended: resuming from the latest checkpoint"
        set_condition(st, ConditionType.SUSPENDED, False, Reason.RESUMED, why, obs.now)
        d.events.append(
            Event("Normal", Reason.RESUMED, f"attempt {st.attempt}: resuming from the latest checkpoint")
        )
    elif st.attempt == 1:
        d.events.append(Event("Normal", Reason.CREATED, f"attempt 1: {nodes} rank pod(s)"))
    d.wake(obs.job.spec.run_policy.startup_timeout_seconds)


def suspend(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    st = d.status
    d.actions += delete_pods(current, obs.now)
    st.ranks = RankCounts(total=len(current))
    if st.phase != Phase.SUSPENDED:
        st.phase = Phase.SUSPENDED
        why = "runPolicy.suspend is true: pods deleted, status kept"
        set_condition(st, ConditionType.SUSPENDED, True, Reason.SUSPENDED, why, obs.now)
        set_condition(st, ConditionType.RUNNING, False, Reason.SUSPENDED, "", obs.now)
        d.events.append(
            Event("Normal", ConditionType.SUSPENDED, f"attempt {st.attempt} stopped; unsuspend to resume")
        )


def fail(obs: Observed, d: Decision, current: list[ObservedPod], reason: str, message: str) -> None:
    st = d.status
    st.phase, st.completion_time = Phase.FAILED, obs.now
    set_condition(st, ConditionType.RUNNING, False, reason, "", obs.now)
    set_condition(st, ConditionType.FAILED, True, reason, message, obs.now)
    d.events.append(Event("Warning", ConditionType.FAILED, f"{reason}: {message}"))
    finished(obs, d, current)


def finished(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    policy, st = obs.job.spec.run_policy, d.status
    if policy.clean_pod_policy == "All":
        d.actions += delete_pods(current, obs.now)
    elif policy.clean_pod_policy == "Running":
        d.actions += delete_pods(
            [p for p in current if p.phase in ("Pending", "Running", "Unknown")], obs.now
        )
    if policy.ttl_seconds_after_finished is not None and st.completion_time is not None:
        left = (
            st.completion_time + timedelta(seconds=policy.ttl_seconds_after_finished) - obs.now
        ).total_seconds()
        if left <= 0:
            d.actions.append(DeleteJob())
        else:
            d.wake(left)
