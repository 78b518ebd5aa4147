"""The decide step: observed state in, actions, the new status and events out. Pure: the clock is
an input, randomness is derived from the job, and everything remembered lives in the status.

Phases: Pending -> Starting -> Running -> Succeeded | Failed, with Restarting (a rank failed: the
attempt's pods are deleted, the backoff runs, then attempt N+1 starts), Suspended, and Queued (between
Starting and Running while spec.gang's scheduler holds the attempt's gang: policy/gang.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from finetune_operator.api import FineTuneJob
from finetune_operator.api.status import FineTuneJobStatus, MicroBatch, Phase, RankCounts
from finetune_operator.builders.naming import pod_name
from finetune_operator.policy import capacity, goodput, grace, in_place, memory, refusals
from finetune_operator.policy import gang as gangs
from finetune_operator.policy.actions import (
    Action,
    CreateAttempt,
    CreatePodGroup,
    CreateService,
    DeleteAttemptConfig,
    DeleteJob,
    DeletePods,
    Event,
)
from finetune_operator.policy.backoff import backoff_seconds
from finetune_operator.policy.conditions import ConditionType, Reason, condition, set_condition
from finetune_operator.policy.failures import (
    WAITED_TOO_LONG,
    WAITING_FOR_CAPACITY,
    Outcome,
    Verdict,
    classify,
    gang_verdict,
    rooted_in_a_lost_node,
)
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


def _delete(pods: list[ObservedPod], now: datetime) -> list[Action]:
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


def _counts(pods: list[ObservedPod], verdicts: list[Verdict]) -> RankCounts:
    outcomes = [v.outcome for v in verdicts]
    return RankCounts(
        total=len(pods),
        pending=outcomes.count(Outcome.PENDING),
        running=outcomes.count(Outcome.RUNNING),
        succeeded=outcomes.count(Outcome.SUCCEEDED),
        failed=sum(o in (Outcome.RESTART, Outcome.INFRA_RESTART, Outcome.FAIL) for o in outcomes),
    )


def decide(obs: Observed) -> Decision:
    job, now = obs.job, obs.now
    old = job.status or FineTuneJobStatus()
    d = Decision(status=old.model_copy(deep=True))
    st = d.status
    st.observed_generation = job.metadata.generation
    if obs.progress is not None:
        st.progress = obs.progress.progress
        st.latest_checkpoint = obs.progress.latest_checkpoint or st.latest_checkpoint
    goodput.account(old, st, now)
    in_place.count(st, now, d.events)
    grace.warn(job.spec.run_policy.termination_grace_period_seconds, st, d.events)
    uid = job.metadata.uid
    # Children are matched by the job's uid, not only by label: a job deleted and applied again under
    # the same name must not adopt the old incarnation's still-terminating pods (the garbage
    # collector removes those; they are left alone, and their names are not reused until gone).
    mine = [p for p in obs.pods if p.owner_uid is None or uid is None or p.owner_uid == uid]
    foreign = {p.name for p in obs.pods if p not in mine}
    current = [p for p in mine if p.attempt == st.attempt]
    stale = [p for p in mine if p.attempt != st.attempt]
    d.actions += _delete(stale, now)
    if st.phase in (Phase.SUCCEEDED, Phase.FAILED):
        _finished(obs, d, current)
    elif job.spec.run_policy.suspend:
        _suspend(obs, d, current)
    elif st.phase == Phase.SUSPENDED and current:
        # The old attempt's ranks may still be writing their emergency checkpoint: the next attempt
        # resumes from it only once they are gone.
        d.actions += _delete(current, now)
        d.wake(5.0)
    elif st.attempt == 0 or st.phase == Phase.SUSPENDED:
        _start_attempt(obs, d, resumed=st.phase == Phase.SUSPENDED)
    elif _past_deadline(obs, st):
        _fail(
            obs,
            d,
            current,
            Reason.DEADLINE_EXCEEDED,
            f"activeDeadlineSeconds {job.spec.run_policy.active_deadline_seconds} passed",
        )
    elif st.phase == Phase.RESTARTING:
        _restarting(obs, d, current)
    else:
        _attempt(obs, d, current)
    if not obs.service_exists and st.phase not in (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):
        d.actions.insert(0, CreateService())
    capacity.settle(st, now)
    d.actions = gangs.group_actions(job, st, obs.groups, d.actions)
    _hold_refused_creates(obs, d)
    _hold_names_taken(d, obs.job.metadata.name, foreign)
    _watch_terminating(obs, d)
    return d


def _hold_names_taken(d: Decision, job: str, foreign: set[str]) -> None:
    """Ranks whose pod name an older incarnation's pod still holds are created once it is gone."""
    if not foreign:
        return
    held = False
    actions: list[Action] = []
    for action in d.actions:
        if isinstance(action, CreateAttempt):
            free = tuple(r for r in action.ranks if pod_name(job, action.attempt, r) not in foreign)
            held = held or len(free) < len(action.ranks)
            if free:
                actions.append(CreateAttempt(action.attempt, free))
        else:
            actions.append(action)
    d.actions = actions
    if held:
        d.wake(5.0)


def _hold_refused_creates(obs: Observed, d: Decision) -> None:
    left = refusals.hold_seconds(d.status, obs.now)
    if left > 0 and d.status.phase not in (Phase.SUCCEEDED, Phase.FAILED):
        d.actions = [
            a for a in d.actions if not isinstance(a, (CreateService, CreateAttempt, CreatePodGroup))
        ]
        d.wake(left)


def _watch_terminating(obs: Observed, d: Decision) -> None:
    """Look again when a terminating pod outstays its deadline, to force-delete it then: a pod on a
    lost node sends no further events."""
    for p in obs.pods:
        if p.deleting and p.deletion_deadline is not None:
            left = (p.deletion_deadline + FORCE_DELETE_AFTER - obs.now).total_seconds()
            if left > 0:
                d.wake(left + 1)


def _past_deadline(obs: Observed, st: FineTuneJobStatus) -> bool:
    """activeDeadlineSeconds counts the time the job was active: suspended time is left out."""
    deadline = obs.job.spec.run_policy.active_deadline_seconds
    if not deadline or not st.start_time:
        return False
    return (obs.now - st.start_time).total_seconds() - st.suspended_seconds >= deadline


def _start_attempt(obs: Observed, d: Decision, *, resumed: bool = False) -> None:
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


def _suspend(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    st = d.status
    d.actions += _delete(current, obs.now)
    st.ranks = RankCounts(total=len(current))
    if st.phase != Phase.SUSPENDED:
        st.phase = Phase.SUSPENDED
        why = "runPolicy.suspend is true: pods deleted, status kept"
        set_condition(st, ConditionType.SUSPENDED, True, Reason.SUSPENDED, why, obs.now)
        set_condition(st, ConditionType.RUNNING, False, Reason.SUSPENDED, "", obs.now)
        d.events.append(
            Event("Normal", ConditionType.SUSPENDED, f"attempt {st.attempt} stopped; unsuspend to resume")
        )


def _attempt(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    job, st, now = obs.job, d.status, obs.now
    policy, nodes = job.spec.run_policy, job.spec.resources.nodes
    queued = gangs.waiting(job, st.attempt, current, obs.groups)
    since = gangs.track_queue(st, queued, now, d.events)
    verdicts = [
        classify(
            p,
            now=now,
            startup_timeout_seconds=policy.startup_timeout_seconds,
            since=since,
            scheduling_timeout_seconds=policy.scheduling_timeout_seconds,
        )
        for p in current
    ]
    waits = [v.message for v in verdicts if v.reason in (WAITING_FOR_CAPACITY, WAITED_TOO_LONG)]
    capacity.track(st, waits, now, d.events)
    missing = sorted(set(range(nodes)) - {p.rank for p in current})
    judged = refusals.judge(
        st,
        all_created=not missing and obs.service_exists,
        startup_timeout=policy.startup_timeout_seconds,
        now=now,
    )
    d.events += judged.events
    if judged.fail is not None:
        _fail(obs, d, current, ConditionType.CREATE_REFUSED, judged.fail)
        return
    if judged.wake is not None:
        d.wake(judged.wake)
    if missing and st.phase == Phase.RUNNING:
        verdicts.append(
            Verdict(Outcome.INFRA_RESTART, Reason.POD_MISSING, f"rank pod(s) {missing} disappeared")
        )
    elif missing:
        # The pass that started this attempt wrote its status first and may have died before its
        # actions: finish them all, the previous attempt's config included (deleting a gone one is a no-op).
        if st.attempt > 1:
            d.actions.append(DeleteAttemptConfig(st.attempt - 1))
        d.actions.append(CreateAttempt(st.attempt, tuple(missing)))
    st.ranks = _counts(current, verdicts)
    gang = gang_verdict(verdicts)
    if gang.outcome is Outcome.RESTART:
        rooted = rooted_in_a_lost_node(now, current, verdicts, gang)
        if not isinstance(rooted, Verdict):
            d.wake(rooted)
            return  # settling: a lost node may yet show itself
        gang = rooted
    if gang.outcome is Outcome.SUCCEEDED and not missing:
        st.phase, st.completion_time = Phase.SUCCEEDED, now
        set_condition(st, ConditionType.RUNNING, False, Reason.COMPLETED, "", now)
        why = f"every rank of attempt {st.attempt} finished"
        set_condition(st, ConditionType.SUCCEEDED, True, Reason.COMPLETED, why, now)
        d.events.append(
            Event("Normal", ConditionType.SUCCEEDED, f"attempt {st.attempt}: every rank finished")
        )
        _finished(obs, d, current)
    elif gang.outcome is Outcome.FAIL and (smaller := memory.reduced(job, st, gang, now)) is not None:
        _restart_smaller(obs, d, current, gang, smaller)
    elif gang.outcome is Outcome.FAIL:
        _fail(obs, d, current, gang.reason, gang.message)
    elif gang.outcome in (Outcome.RESTART, Outcome.INFRA_RESTART):
        _begin_restart(obs, d, current, gang)
    elif (
        gang.outcome is Outcome.RUNNING
        and not missing
        and all(v.outcome is Outcome.RUNNING for v in verdicts)
    ) or (st.phase == Phase.RUNNING and _finishing(verdicts)):
        if _stalled(obs, st):
            seconds = policy.progress_timeout_seconds
            _begin_restart(
                obs, d, current, Verdict(Outcome.RESTART, Reason.STALLED, f"no progress for {seconds}s")
            )
            return
        if st.phase != Phase.RUNNING:
            st.phase = Phase.RUNNING
            why = f"attempt {st.attempt}: {nodes} rank(s)"
            set_condition(st, ConditionType.RUNNING, True, Reason.ALL_RANKS_RUNNING, why, now)
            d.events.append(
                Event("Normal", ConditionType.RUNNING, f"attempt {st.attempt}: all {nodes} rank(s) running")
            )
        if policy.progress_timeout_seconds:
            d.wake(policy.progress_timeout_seconds)
    else:
        # A queued gang has no startup deadline, nor has a wait for capacity without a scheduling
        # deadline: the resync looks again, and pod events wake it.
        st.phase = Phase.QUEUED if queued else Phase.STARTING
        d.wake(policy.startup_timeout_seconds)
        for v in verdicts:
            if v.deadline_in is not None:
                d.wake(v.deadline_in)


def _finishing(verdicts: list[Verdict]) -> bool:
    """Some ranks finished and the others still run: the job is still Running (not Starting)."""
    return all(v.outcome in (Outcome.RUNNING, Outcome.SUCCEEDED) for v in verdicts) and any(
        v.outcome is Outcome.RUNNING for v in verdicts
    )


def _stalled(obs: Observed, st: FineTuneJobStatus) -> bool:
    """No progress report for progressTimeoutSeconds while training. Before this attempt's first
    report (model download, tokenization, checkpoint download) and after its last step (final save
    and export) the trainer reports no steps: those phases are bounded by the trainer's own
    phaseTimeoutSeconds, so the operator waits that long on top before calling them stalled."""
    policy = obs.job.spec.run_policy
    timeout = policy.progress_timeout_seconds
    if not timeout or st.phase != Phase.RUNNING:
        return False
    running = condition(st, ConditionType.RUNNING)
    began = running.last_transition_time if running else None
    progress = st.progress
    reported = progress.updated_at if progress else None
    step, total = (progress.step, progress.total_steps) if progress else (None, None)
    last_step_done = step is not None and bool(total) and step >= (total or 0)
    training = reported is not None and (began is None or reported >= began) and not last_step_done
    if not training:
        timeout += policy.phase_timeout_seconds
    since = [t for t in (reported, began) if t]
    return bool(since) and (obs.now - max(since)).total_seconds() > timeout


def _begin_restart(obs: Observed, d: Decision, current: list[ObservedPod], cause: Verdict) -> None:
    st, policy = d.status, obs.job.spec.run_policy
    counted = cause.outcome is Outcome.RESTART
    if counted and st.restarts >= policy.max_restarts:
        message = f"{cause.reason}: {cause.message}; maxRestarts {policy.max_restarts} reached"
        _fail(obs, d, current, Reason.BACKOFF_LIMIT_EXCEEDED, message)
        return
    if not counted and st.infra_restarts >= policy.max_infrastructure_restarts:
        limit = policy.max_infrastructure_restarts
        message = f"{cause.reason}: {cause.message}; maxInfrastructureRestarts {limit} reached"
        _fail(obs, d, current, Reason.INFRASTRUCTURE_RESTART_LIMIT_EXCEEDED, message)
        return
    if counted:
        st.restarts += 1
    else:
        st.infra_restarts += 1
    st.restart_class = "Application" if counted else "Infrastructure"
    st.phase = Phase.RESTARTING
    set_condition(st, ConditionType.RESTARTING, True, cause.reason, cause.message, obs.now)
    set_condition(st, ConditionType.RUNNING, False, cause.reason, "", obs.now)
    delay = _backoff(obs, st)
    d.events.append(Event("Warning", Reason.RANK_FAILED, cause.message or cause.reason))
    note = "" if counted else ", not counted toward maxRestarts"
    message = f"attempt {st.attempt} failed ({cause.reason}); attempt {st.attempt + 1} in {delay:.0f}s{note}"
    d.events.append(Event("Normal", ConditionType.RESTARTING, message))
    d.actions += _delete(current, obs.now)
    d.wake(delay)


def _restart_smaller(
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
    d.actions += _delete(current, obs.now)
    d.wake(1.0)


def _backoff(obs: Observed, st: FineTuneJobStatus) -> float:
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


def _restarting(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    st = d.status
    restarting = condition(st, ConditionType.RESTARTING)
    began = restarting.last_transition_time if restarting and restarting.last_transition_time else obs.now
    ready_at = began + timedelta(seconds=_backoff(obs, st))
    if current:
        d.actions += _delete(current, obs.now)  # the gang must be gone before the next one rendezvous
        d.wake(max(5.0, (ready_at - obs.now).total_seconds()))
    elif obs.now < ready_at:
        d.wake((ready_at - obs.now).total_seconds())
    else:
        why = f"attempt {st.attempt + 1} started"
        set_condition(st, ConditionType.RESTARTING, False, Reason.RESTARTED, why, obs.now)
        _start_attempt(obs, d)


def _fail(obs: Observed, d: Decision, current: list[ObservedPod], reason: str, message: str) -> None:
    st = d.status
    st.phase, st.completion_time = Phase.FAILED, obs.now
    set_condition(st, ConditionType.RUNNING, False, reason, "", obs.now)
    set_condition(st, ConditionType.FAILED, True, reason, message, obs.now)
    d.events.append(Event("Warning", ConditionType.FAILED, f"{reason}: {message}"))
    _finished(obs, d, current)


def _finished(obs: Observed, d: Decision, current: list[ObservedPod]) -> None:
    policy, st = obs.job.spec.run_policy, d.status
    if policy.clean_pod_policy == "All":
        d.actions += _delete(current, obs.now)
    elif policy.clean_pod_policy == "Running":
        d.actions += _delete([p for p in current if p.phase in ("Pending", "Running", "Unknown")], obs.now)
    if policy.ttl_seconds_after_finished is not None and st.completion_time is not None:
        left = (
            st.completion_time + timedelta(seconds=policy.ttl_seconds_after_finished) - obs.now
        ).total_seconds()
        if left <= 0:
            d.actions.append(DeleteJob())
        else:
            d.wake(left)
