"""The decide step: observed state in, actions, the new status and events out. Pure: the clock is
an input, randomness is derived from the job, and everything remembered lives in the status.

Phases: Pending -> Starting -> Running -> Succeeded | Failed, with Restarting (a rank failed: the
attempt's pods are deleted, the backoff runs, then attempt N+1 starts), Suspended, and Queued (between
Starting and Running while spec.gang's scheduler holds the attempt's gang: policy/gang.py).
Here: which branch a pass takes and the running attempt's verdict; the moves the branches share are
policy/transitions.py's, a pod-level restart and its backoff policy/restarts.py's.
"""

from __future__ import annotations

from finetune_operator.api.status import FineTuneJobStatus, Phase, RankCounts
from finetune_operator.builders.naming import pod_name
from finetune_operator.policy import capacity, goodput, grace, in_place, memory, refusals
from finetune_operator.policy import gang as gangs
from finetune_operator.policy.actions import (
    Action,
    CreateAttempt,
    CreatePodGroup,
    CreateService,
    DeleteAttemptConfig,
    Event,
)
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
from finetune_operator.policy.observed import ObservedPod
from finetune_operator.policy.restarts import begin_restart, restart_smaller, restarting
from finetune_operator.policy.transitions import (
    FORCE_DELETE_AFTER,
    Decision,
    Observed,
    delete_pods,
    fail,
    finished,
    start_attempt,
    suspend,
)

__all__ = ["Decision", "Observed", "decide"]  # what a pass is, from the module that makes one


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
    d.actions += delete_pods(stale, now)
    if st.phase in (Phase.SUCCEEDED, Phase.FAILED):
        finished(obs, d, current)
    elif job.spec.run_policy.suspend:
        suspend(obs, d, current)
    elif st.phase == Phase.SUSPENDED and current:
        # The old attempt's ranks may still be writing their emergency checkpoint: the next attempt
        # resumes from it only once they are gone.
        d.actions += delete_pods(current, now)
        d.wake(5.0)
    elif st.attempt == 0 or st.phase == Phase.SUSPENDED:
        start_attempt(obs, d, resumed=st.phase == Phase.SUSPENDED)
    elif _past_deadline(obs, st):
        fail(
            obs,
            d,
            current,
            Reason.DEADLINE_EXCEEDED,
            f"activeDeadlineSeconds {job.spec.run_policy.active_deadline_seconds} passed",
        )
    elif st.phase == Phase.RESTARTING:
        restarting(obs, d, current)
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
        fail(obs, d, current, ConditionType.CREATE_REFUSED, judged.fail)
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
        finished(obs, d, current)
    elif gang.outcome is Outcome.FAIL and (smaller := memory.reduced(job, st, gang, now)) is not None:
        restart_smaller(obs, d, current, gang, smaller)
    elif gang.outcome is Outcome.FAIL:
        fail(obs, d, current, gang.reason, gang.message)
    elif gang.outcome in (Outcome.RESTART, Outcome.INFRA_RESTART):
        begin_restart(obs, d, current, gang)
    elif (
        gang.outcome is Outcome.RUNNING
        and not missing
        and all(v.outcome is Outcome.RUNNING for v in verdicts)
    ) or (st.phase == Phase.RUNNING and _finishing(verdicts)):
        if _stalled(obs, st):
            seconds = policy.progress_timeout_seconds
            begin_restart(
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
