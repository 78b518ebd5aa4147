"""The decide step, table by table, with an injected clock: observed state in, actions, status and
events out."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api import parse_manifest
from finetune_operator.api.status import Phase
from finetune_operator.policy.actions import (
    CreateAttempt,
    CreateService,
    DeleteAttemptConfig,
    DeleteJob,
    DeletePods,
)
from finetune_operator.policy.decide import Decision, Observed, decide
from finetune_operator.policy.observed import observe_pod
from finetune_operator.progress import ProgressReport

from tests.support.factories import manifest
from tests.support.pods import CREATED, after, disrupted, pod

UID = "3f1c2d4e-0000-4000-8000-000000000001"
POLICY = {
    "spec.resources.nodes": 2,
    "spec.runPolicy.maxRestarts": 2,
    "spec.runPolicy.backoffBaseSeconds": 10,
    "spec.runPolicy.backoffCapSeconds": 60,
    "spec.runPolicy.startupTimeoutSeconds": 600,
}


def _job(status: dict[str, Any] | None = None, **changes: Any) -> Any:
    data = manifest({**POLICY, **{k.replace("__", "."): v for k, v in changes.items()}})
    data["metadata"].update(uid=UID, generation=3)
    if status is not None:
        data["status"] = status
    return parse_manifest(data)


def _decide(
    job: Any, pods: list[dict[str, Any]], now: datetime, *, progress: ProgressReport | None = None
) -> Decision:
    observed = tuple(observe_pod(p) for p in pods)
    return decide(Observed(job=job, pods=observed, service_exists=True, now=now, progress=progress))


def _gang(attempt: int = 1, **kw: Any) -> list[dict[str, Any]]:
    return [pod(rank=r, attempt=attempt, **kw) for r in range(2)]


def _running(attempt: int = 1, restarts: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "phase": "Running",
        "attempt": attempt,
        "restarts": restarts,
        "startTime": CREATED.isoformat(),
        "conditions": [{"type": "Running", "status": "True", "lastTransitionTime": CREATED.isoformat()}],
        **extra,
    }


def _reasons(d: Decision) -> list[str]:
    return [e.reason for e in d.events]


def test_a_new_job_gets_its_service_and_attempt_1() -> None:
    d = decide(Observed(job=_job(), pods=(), service_exists=False, now=CREATED))
    assert d.actions == [CreateService(), CreateAttempt(1, (0, 1))]
    assert (d.status.phase, d.status.attempt, d.status.observed_generation) == (Phase.STARTING, 1, 3)
    assert _reasons(d) == ["Created"]


def test_ranks_missing_while_starting_are_created_again() -> None:
    d = _decide(_job({"phase": "Starting", "attempt": 1}), [pod(rank=0)], after(5))
    assert CreateAttempt(1, (1,)) in d.actions


def test_an_interrupted_start_of_attempt_2_also_finishes_deleting_attempt_1s_config() -> None:
    """The status said attempt 2 before the pass that wrote it could act (status-first ordering)."""
    d = _decide(_job({"phase": "Starting", "attempt": 2, "restarts": 1}), [], after(5))
    assert d.actions == [DeleteAttemptConfig(1), CreateAttempt(2, (0, 1))]


def test_all_ranks_running_is_running_with_one_event() -> None:
    d = _decide(_job({"phase": "Starting", "attempt": 1}), _gang(), after(30))
    assert d.status.phase == Phase.RUNNING and _reasons(d) == ["Running"]
    again = _decide(
        _job(d.status.model_dump(mode="json", by_alias=True, exclude_none=True)), _gang(), after(60)
    )
    assert again.events == [] and again.actions == []


def test_every_rank_succeeding_is_success() -> None:
    d = _decide(_job(_running()), _gang(phase="Succeeded", exit_code=0), after(100))
    assert d.status.phase == Phase.SUCCEEDED and d.status.completion_time == after(100)
    assert _reasons(d) == ["Succeeded"]


@pytest.mark.parametrize(
    ("failed", "counted", "reason"),
    [
        (pod(rank=1, phase="Failed", exit_code=1, message="boom"), True, "RankFailed"),
        (pod(rank=1, phase="Failed", exit_code=75), True, "Transient"),
        (pod(rank=1, phase="Failed", exit_code=137, terminated_reason="OOMKilled"), True, "OOMKilled"),
        (pod(rank=1, phase="Failed", reason="Evicted"), False, "Evicted"),
        (disrupted("PreemptionByScheduler", rank=1, phase="Failed", exit_code=143), False, "Preempted"),
        (pod(rank=1, phase="Failed", exit_code=143), False, "Terminated"),
    ],
)
def test_a_failed_rank_restarts_the_gang(failed: dict[str, Any], counted: bool, reason: str) -> None:
    d = _decide(_job(_running()), [pod(rank=0), failed], after(200))  # past the node-loss settle window
    assert d.status.phase == Phase.RESTARTING
    assert (d.status.restarts, d.status.infra_restarts) == ((1, 0) if counted else (0, 1))
    assert _reasons(d) == ["RankFailed", "Restarting"]
    assert DeletePods(("demo-a1-n0", "demo-a1-n1")) in d.actions
    restarting = next(c for c in d.status.conditions if c.type == "Restarting")
    assert restarting.reason == reason and restarting.status == "True"


@pytest.mark.parametrize(
    ("code", "reason"),
    [(2, "InvalidConfig"), (3, "InputNotFound"), (4, "OutOfMemory"), (77, "StorageRefused")],
)
def test_deterministic_failures_fail_at_once_without_a_counted_restart(code: int, reason: str) -> None:
    failed = pod(rank=0, phase="Failed", exit_code=code, message="dataset s3://d/x: not found")
    d = _decide(_job(_running()), [failed, pod(rank=1)], after(100))
    assert d.status.phase == Phase.FAILED and d.status.restarts == 0
    failed_condition = next(c for c in d.status.conditions if c.type == "Failed")
    assert failed_condition.reason == reason and "dataset s3://d/x" in (failed_condition.message or "")
    assert DeletePods(("demo-a1-n1",)) in d.actions  # cleanPodPolicy Running


def test_restarts_beyond_max_restarts_fail_with_backoff_limit_exceeded() -> None:
    failed = pod(rank=1, phase="Failed", exit_code=1)
    d = _decide(_job(_running(restarts=2)), [pod(rank=0), failed], after(200))
    assert d.status.phase == Phase.FAILED
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "BackoffLimitExceeded"


def _restarting(began: datetime, restarts: int = 1) -> dict[str, Any]:
    return {
        "phase": "Restarting",
        "attempt": 1,
        "restarts": restarts,
        "startTime": CREATED.isoformat(),
        "conditions": [
            {
                "type": "Restarting",
                "status": "True",
                "reason": "RankFailed",
                "lastTransitionTime": began.isoformat(),
            }
        ],
    }


def test_the_next_attempt_waits_for_the_old_pods_to_go() -> None:
    d = _decide(_job(_restarting(after(0))), _gang(deleting=True), after(3600))
    assert not any(isinstance(a, CreateAttempt) for a in d.actions)


def test_pods_stuck_terminating_past_their_deadline_are_force_deleted() -> None:
    d = _decide(_job(_restarting(after(0))), _gang(deleting=True), after(600))
    assert DeletePods(("demo-a1-n0", "demo-a1-n1"), force=True) in d.actions


def test_the_next_attempt_waits_for_the_backoff_then_starts() -> None:
    early = _decide(_job(_restarting(after(0))), [], after(4))  # backoff 10 s, jittered into [5, 10]
    assert early.actions == [] and early.requeue_after is not None and 1 <= early.requeue_after <= 6
    late = _decide(_job(_restarting(after(0))), [], after(11))
    assert late.actions == [DeleteAttemptConfig(1), CreateAttempt(2, (0, 1))]
    assert late.status.attempt == 2 and late.status.phase == Phase.STARTING


@pytest.mark.parametrize(("restarts", "low", "high"), [(1, 5, 10), (2, 10, 20), (3, 20, 40), (6, 30, 60)])
def test_backoff_doubles_with_each_counted_restart(restarts: int, low: float, high: float) -> None:
    d = _decide(_job(_restarting(after(0), restarts=restarts)), [], after(0))
    assert d.requeue_after is not None and low <= d.requeue_after <= high


def test_an_image_pull_error_past_the_startup_timeout_fails_the_job() -> None:
    pulling = _gang(phase="Pending", waiting=("ImagePullBackOff", "not found"))
    assert (
        _decide(_job({"phase": "Starting", "attempt": 1}), pulling, after(599)).status.phase == Phase.STARTING
    )
    d = _decide(_job({"phase": "Starting", "attempt": 1}), pulling, after(601))
    assert d.status.phase == Phase.FAILED
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "ImagePullBackOff"


def test_the_active_deadline_fails_the_job() -> None:
    d = _decide(_job(_running(), spec__runPolicy__activeDeadlineSeconds=3600), _gang(), after(3601))
    assert d.status.phase == Phase.FAILED
    assert next(c for c in d.status.conditions if c.type == "Failed").reason == "DeadlineExceeded"


def _reported(step: int, at: datetime, total: int = 100) -> ProgressReport:
    return ProgressReport.model_validate(
        {"progress": {"step": step, "totalSteps": total, "updatedAt": at.isoformat()}}
    )


def test_no_progress_for_the_progress_timeout_restarts_the_gang_as_stalled() -> None:
    job = _job(_running(), spec__runPolicy__progressTimeoutSeconds=300)
    d = _decide(job, _gang(), after(401), progress=_reported(10, after(100)))
    assert d.status.phase == Phase.RESTARTING and d.status.restarts == 1
    assert next(c for c in d.status.conditions if c.type == "Restarting").reason == "Stalled"


def test_setup_before_the_first_report_has_the_phase_timeout_on_top_of_the_progress_timeout() -> None:
    # Downloading a 70B model or tokenizing GBs reports no step; the trainer bounds those phases itself.
    job = _job(
        _running(), spec__runPolicy__progressTimeoutSeconds=300, spec__runPolicy__phaseTimeoutSeconds=3600
    )
    assert _decide(job, _gang(), after(3899)).status.phase == Phase.RUNNING
    assert _decide(job, _gang(), after(3901)).status.phase == Phase.RESTARTING


def test_a_report_from_the_previous_attempt_does_not_start_the_stall_clock() -> None:
    job = _job(
        _running(), spec__runPolicy__progressTimeoutSeconds=300, spec__runPolicy__phaseTimeoutSeconds=3600
    )
    before_this_attempt = _reported(50, CREATED - timedelta(seconds=30))
    assert _decide(job, _gang(), after(1000), progress=before_this_attempt).status.phase == Phase.RUNNING


def test_the_final_save_and_export_after_the_last_step_have_the_phase_timeout_too() -> None:
    job = _job(
        _running(), spec__runPolicy__progressTimeoutSeconds=300, spec__runPolicy__phaseTimeoutSeconds=3600
    )
    last_step = _reported(100, after(100), total=100)
    assert _decide(job, _gang(), after(1000), progress=last_step).status.phase == Phase.RUNNING
    assert _decide(job, _gang(), after(4001), progress=last_step).status.phase == Phase.RESTARTING


def test_reported_progress_keeps_a_job_from_stalling() -> None:
    report = ProgressReport.model_validate({"progress": {"step": 10, "updatedAt": after(250).isoformat()}})
    d = _decide(
        _job(_running(), spec__runPolicy__progressTimeoutSeconds=300), _gang(), after(301), progress=report
    )
    assert d.status.phase == Phase.RUNNING and d.status.progress is not None and d.status.progress.step == 10


def test_suspend_deletes_the_pods_and_keeps_the_status() -> None:
    d = _decide(_job(_running(restarts=1), spec__runPolicy__suspend=True), _gang(), after(100))
    assert d.status.phase == Phase.SUSPENDED and d.status.restarts == 1
    assert DeletePods(("demo-a1-n0", "demo-a1-n1")) in d.actions and _reasons(d) == ["Suspended"]


def test_unsuspend_starts_a_new_attempt() -> None:
    status = {**_running(), "phase": "Suspended"}
    d = _decide(_job(status), [], after(200))
    assert CreateAttempt(2, (0, 1)) in d.actions and _reasons(d) == ["Resumed"]


def test_ttl_after_finishing_deletes_the_job() -> None:
    done = {"phase": "Succeeded", "attempt": 1, "completionTime": after(0).isoformat()}
    waiting = _decide(_job(done, spec__runPolicy__ttlSecondsAfterFinished=60), [], after(30))
    assert DeleteJob() not in waiting.actions and waiting.requeue_after == pytest.approx(30)
    assert (
        DeleteJob() in _decide(_job(done, spec__runPolicy__ttlSecondsAfterFinished=60), [], after(61)).actions
    )


def test_pods_of_an_older_attempt_are_deleted() -> None:
    d = _decide(
        _job({"phase": "Starting", "attempt": 2}), [pod(rank=0, attempt=1), *_gang(attempt=2)], after(10)
    )
    assert DeletePods(("demo-a1-n0",)) in d.actions


def test_a_rank_pod_vanishing_mid_run_is_an_infrastructure_restart() -> None:
    d = _decide(_job(_running()), [pod(rank=0)], after(100))
    assert d.status.phase == Phase.RESTARTING and d.status.infra_restarts == 1 and d.status.restarts == 0


def test_the_same_observation_gives_the_same_decision() -> None:
    first = _decide(_job(_restarting(after(0))), [], after(4))
    assert first == _decide(_job(_restarting(after(0))), [], after(4))


def test_timestamps_are_the_injected_clock() -> None:
    d = decide(Observed(job=_job(), pods=(), service_exists=True, now=CREATED + timedelta(hours=1)))
    assert d.status.start_time == CREATED + timedelta(hours=1)


def _refused(code: int, reason: str, *, since: float, last: float, attempt: int = 1) -> dict[str, Any]:
    message = (
        'pods "demo-a1-n1" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=8, '
        "used: nvidia.com/gpu=8, limited: nvidia.com/gpu=8"
        if code == 403
        else 'Pod "demo-a1-n1" is invalid: spec.affinity.nodeAffinity: Invalid value: "Inn"'
    )
    return {
        "phase": "Starting",
        "attempt": attempt,
        "startTime": CREATED.isoformat(),
        "createRefusal": {
            "attempt": attempt,
            "code": code,
            "reason": reason,
            "message": message,
            "since": after(since).isoformat(),
            "last": after(last).isoformat(),
        },
    }


def _condition(d: Decision, kind: str) -> Any:
    return next(c for c in d.status.conditions if c.type == kind)


def test_a_quota_refusal_shows_as_a_condition_and_a_warning_event_naming_the_apis_reason() -> None:
    d = _decide(_job(_refused(403, "Forbidden", since=10, last=10)), [pod(rank=0)], after(11))
    refused = _condition(d, "CreateRefused")
    assert (refused.status, refused.reason) == ("True", "Forbidden") and "exceeded quota" in refused.message
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "CreateRefused")]
    assert "403 Forbidden" in d.events[0].message and d.status.phase == Phase.STARTING


def test_a_refused_create_is_not_tried_again_before_the_retry_interval() -> None:
    d = _decide(_job(_refused(403, "Forbidden", since=10, last=10)), [pod(rank=0)], after(20))
    assert not any(isinstance(a, CreateAttempt) for a in d.actions)
    assert d.requeue_after == pytest.approx(20)


def test_a_quota_refusal_is_tried_again_after_the_retry_interval() -> None:
    d = _decide(_job(_refused(403, "Forbidden", since=10, last=10)), [pod(rank=0)], after(41))
    assert CreateAttempt(1, (1,)) in d.actions and d.status.phase == Phase.STARTING


def test_a_quota_refusal_past_the_startup_deadline_fails_the_job() -> None:
    d = _decide(_job(_refused(403, "Forbidden", since=10, last=590)), [pod(rank=0)], after(611))
    assert d.status.phase == Phase.FAILED and _condition(d, "Failed").reason == "CreateRefused"
    assert "exceeded quota" in _condition(d, "Failed").message


def test_an_invalid_pod_refused_with_422_fails_at_once() -> None:
    d = _decide(_job(_refused(422, "Invalid", since=10, last=10)), [pod(rank=0)], after(11))
    assert d.status.phase == Phase.FAILED and _condition(d, "Failed").reason == "CreateRefused"
    assert "422 Invalid" in _condition(d, "Failed").message
    assert _reasons(d) == ["CreateRefused", "Failed"]


def test_once_every_child_exists_the_refusal_is_cleared() -> None:
    d = _decide(_job(_refused(403, "Forbidden", since=10, last=10)), _gang(), after(50))
    assert d.status.create_refusal is None and _condition(d, "CreateRefused").status == "False"
    assert d.status.phase == Phase.RUNNING


# Node loss as a current control plane shows it (tests/support/nodes.py cites the controllers): the
# ranks on healthy nodes fail first (NCCL: exit 1, 75 or 134), the lost node's rank still looks
# Running; its Ready condition turns False only after the node monitor grace period.
SURVIVOR = pod(
    rank=1, phase="Failed", exit_code=134, message="NCCL error: remote process exited", finished_at=60
)


def test_a_failure_while_another_rank_still_looks_running_waits_for_a_lost_node_to_show() -> None:
    d = _decide(_job(_running()), [pod(rank=0), SURVIVOR], after(61))
    assert d.status.phase == Phase.RUNNING and (d.status.restarts, d.status.infra_restarts) == (0, 0)
    assert d.actions == [] and d.requeue_after == pytest.approx(59)


def test_a_rank_gone_not_ready_turns_the_survivors_failure_into_an_uncounted_node_loss() -> None:
    """MarkPodsNotReady (pkg/controller/util/node/controller_utils.go): phase Running, Ready False."""
    lost = pod(rank=0, phase="Running", ready=False)
    d = _decide(_job(_running()), [lost, SURVIVOR], after(101))
    assert d.status.phase == Phase.RESTARTING and (d.status.restarts, d.status.infra_restarts) == (0, 1)
    restarting = _condition(d, "Restarting")
    assert restarting.reason == "NodeLost" and "rank 0 (demo-a1-n0): its node is lost" in restarting.message


def test_a_rank_evicted_by_the_taint_manager_makes_the_gang_failure_a_node_loss() -> None:
    lost = disrupted("DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint", rank=0)
    d = _decide(_job(_running()), [lost, SURVIVOR], after(400))
    assert (d.status.restarts, d.status.infra_restarts) == (0, 1)


def test_after_the_settle_window_with_every_other_rank_ready_the_failure_counts() -> None:
    d = _decide(_job(_running()), [pod(rank=0), SURVIVOR], after(121))
    assert (d.status.restarts, d.status.infra_restarts) == (1, 0)


def test_a_rank_without_a_ready_condition_cannot_show_a_lost_node_so_the_failure_counts_at_once() -> None:
    """The local backend's processes have no node and no Ready condition."""
    local = pod(rank=0)
    local["status"]["conditions"] = []
    d = _decide(_job(_running()), [local, SURVIVOR], after(61))
    assert (d.status.restarts, d.status.infra_restarts) == (1, 0)


def test_infrastructure_restarts_stop_at_their_own_budget() -> None:
    evicted = pod(
        rank=1, phase="Failed", reason="Evicted", pod_message="The node was low on resource: memory. "
    )
    status = _running(infraRestarts=4)
    d = _decide(
        _job(status, spec__runPolicy__maxInfrastructureRestarts=4), [pod(rank=0), evicted], after(100)
    )
    assert d.status.phase == Phase.FAILED and d.status.infra_restarts == 4
    failed = _condition(d, "Failed")
    assert (
        failed.reason == "InfrastructureRestartLimitExceeded"
        and "maxInfrastructureRestarts 4" in failed.message
    )


def test_an_infrastructure_restart_within_its_budget_is_recorded_with_its_class() -> None:
    evicted = pod(rank=1, phase="Failed", reason="Evicted")
    d = _decide(_job(_running(infraRestarts=3)), [pod(rank=0), evicted], after(100))
    assert (d.status.infra_restarts, d.status.restart_class) == (4, "Infrastructure")


def _restarting_after(cls: str, *, restarts: int, infra: int) -> dict[str, Any]:
    return {**_restarting(after(0), restarts=restarts), "infraRestarts": infra, "restartClass": cls}


@pytest.mark.parametrize(
    ("cls", "restarts", "infra", "low", "high"),
    [
        ("Infrastructure", 0, 1, 5, 10),  # base 10 s, equal jitter
        ("Infrastructure", 0, 4, 40, 60),  # doubles per infrastructure restart, cap 60
        ("Application", 1, 6, 5, 10),  # a crash after many evictions waits the first delay
    ],
)
def test_each_restart_class_backs_off_on_its_own_count(
    cls: str, restarts: int, infra: int, low: float, high: float
) -> None:
    d = _decide(_job(_restarting_after(cls, restarts=restarts, infra=infra)), [], after(0))
    assert d.requeue_after is not None and low <= d.requeue_after <= high


def test_unsuspend_waits_for_the_old_attempts_pods_to_be_gone() -> None:
    """They may still be writing their emergency checkpoint, which the next attempt resumes from."""
    status = {**_running(), "phase": "Suspended"}
    d = _decide(_job(status), _gang(deleting=True), after(200))
    assert not any(isinstance(a, CreateAttempt) for a in d.actions)
    assert d.status.phase == Phase.SUSPENDED and d.status.attempt == 1 and d.requeue_after == pytest.approx(5)


def _suspended_since(seconds: float, **extra: Any) -> dict[str, Any]:
    suspended = {"type": "Suspended", "status": "True", "lastTransitionTime": after(seconds).isoformat()}
    return {**_running(), "phase": "Suspended", "conditions": [suspended], **extra}


def test_resuming_adds_the_time_spent_suspended_to_the_status() -> None:
    d = _decide(_job(_suspended_since(1000)), [], after(4600))
    assert d.status.suspended_seconds == pytest.approx(3600)


def test_time_spent_suspended_does_not_count_toward_the_active_deadline() -> None:
    status = _running(suspendedSeconds=3600.0)
    policy = {"spec__runPolicy__activeDeadlineSeconds": 7200, "spec__runPolicy__progressTimeoutSeconds": None}
    d = _decide(_job(status, **policy), _gang(), after(7300))
    assert d.status.phase == Phase.RUNNING
    late = _decide(_job(status, **policy), _gang(), after(10801))
    assert late.status.phase == Phase.FAILED


def test_pods_of_an_earlier_incarnation_of_the_same_name_are_not_adopted() -> None:
    """Matched by the owner's uid: the old pods are the garbage collector's, and their names are
    created again only once they are gone."""
    old = [pod(rank=r, owner_uid="an-earlier-incarnation", deleting=True) for r in range(2)]
    d = _decide(_job({"phase": "Starting", "attempt": 1}), old, after(5))
    assert not any(isinstance(a, (CreateAttempt, DeletePods)) for a in d.actions)
    assert d.status.phase == Phase.STARTING and d.status.ranks.total == 0
    assert d.requeue_after == pytest.approx(5)
    gone = _decide(_job({"phase": "Starting", "attempt": 1}), old[:1], after(6))
    assert CreateAttempt(1, (1,)) in gone.actions


def test_ranks_finishing_one_after_another_keep_the_job_running() -> None:
    finishing = [pod(rank=0, phase="Succeeded", exit_code=0), pod(rank=1)]
    d = _decide(_job(_running()), finishing, after(100))
    assert d.status.phase == Phase.RUNNING and d.events == []


def _wire(d: Decision) -> dict[str, Any]:
    return d.status.model_dump(mode="json", by_alias=True, exclude_none=True)


def test_goodput_over_a_life_with_queueing_a_crash_and_a_restart() -> None:
    """Applied at 0, running at 60, rank 1 crashes at 1060 (its peer too), attempt 2 runs at 1100 and
    reports its first step at 1110: the restart cost 1060 to 1110."""
    started = decide(Observed(job=_job(), pods=(), service_exists=True, now=after(0)))
    running = _decide(_job(_wire(started)), _gang(), after(60))
    crashed = [pod(rank=r, phase="Failed", exit_code=1 if r else 75, finished_at=1060) for r in range(2)]
    restarting = _decide(_job(_wire(running)), crashed, after(1060))
    next_attempt = _decide(_job(_wire(restarting)), [], after(1080))
    running_again = _decide(_job(_wire(next_attempt)), _gang(attempt=2), after(1100))
    first_step = _decide(  # attempt 2 reloads its checkpoint and reports its first step at 1110
        _job(_wire(running_again)), _gang(attempt=2), after(1110), progress=_reported(41, after(1110))
    )
    later = _decide(_job(_wire(first_step)), _gang(attempt=2), after(2100))
    g = later.status.goodput
    assert g is not None
    assert (g.queued_seconds, g.productive_seconds, g.application_restart_seconds) == (60, 1990, 50)
    assert g.infrastructure_restart_seconds == 0 and g.percent == pytest.approx(94.76)
