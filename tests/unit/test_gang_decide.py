"""The decide step with spec.gang: a gang its scheduler holds is Queued (not failing at the startup
deadline), its startup clock starts at admission, queueing time is charged to goodput's queued share,
and each attempt has its own PodGroup, created before its pods and deleted after it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from finetune_operator import contract
from finetune_operator.api import parse_manifest
from finetune_operator.api.status import Phase
from finetune_operator.policy.actions import CreateAttempt, CreatePodGroup, CreateService, DeletePodGroup
from finetune_operator.policy.decide import Decision, Observed, decide
from finetune_operator.policy.observed import ObservedGroup, observe_pod

from tests.support.factories import manifest
from tests.support.pods import CREATED, JOB_UID, NO_NODE_MATCHES, after, gated, pod, unschedulable

KUEUE = {"spec.gang": {"scheduler": "Kueue", "queueName": "gpu"}}
VOLCANO = {"spec.gang": {"scheduler": "Volcano"}}
STARTUP = 600


def _job(gang: dict[str, Any], status: dict[str, Any] | None = None, **extra: Any) -> Any:
    data = manifest(
        {"spec.resources.nodes": 2, "spec.runPolicy.startupTimeoutSeconds": STARTUP, **gang, **extra}
    )
    data["metadata"].update(uid=JOB_UID, generation=1)
    if status is not None:
        data["status"] = status
    return parse_manifest(data)


def _decide(
    job: Any, pods: list[dict[str, Any]], now: datetime, groups: tuple[ObservedGroup, ...] = ()
) -> Decision:
    observed = tuple(observe_pod(p) for p in pods)
    return decide(Observed(job=job, pods=observed, service_exists=True, now=now, groups=groups))


def _next(d: Decision, gang: dict[str, Any]) -> Any:
    return _job(gang, d.status.model_dump(mode="json", by_alias=True, exclude_none=True))


def _starting(attempt: int = 1) -> dict[str, Any]:
    return {"phase": "Starting", "attempt": attempt, "startTime": CREATED.isoformat()}


def _condition(d: Decision, kind: str) -> Any:
    return next((c for c in d.status.conditions if c.type == kind), None)


class TestKueue:
    def test_gated_ranks_are_queued_not_starting(self) -> None:
        d = _decide(_job(KUEUE, _starting()), [gated(rank=0), gated(rank=1)], after(10))
        assert d.status.phase == Phase.QUEUED
        queued = _condition(d, "Queued")
        assert queued.status == "True" and "LocalQueue gpu" in queued.message
        assert [e.reason for e in d.events] == ["Queued"]

    def test_ranks_admitted_but_not_yet_placed_by_topology_are_still_queued(self) -> None:
        pods = [gated(contract.KUEUE_TOPOLOGY_GATE, rank=r) for r in range(2)]
        assert _decide(_job(KUEUE, _starting()), pods, after(10)).status.phase == Phase.QUEUED

    def test_a_gate_of_another_controller_is_not_kueues_queue(self) -> None:
        pods = [gated("example.com/quota-check", rank=r) for r in range(2)]
        assert _decide(_job(KUEUE, _starting()), pods, after(10)).status.phase == Phase.STARTING

    def test_a_gang_queued_past_the_startup_deadline_does_not_fail(self) -> None:
        d = _decide(_job(KUEUE, _starting()), [gated(rank=0), gated(rank=1)], after(STARTUP * 10))
        assert d.status.phase == Phase.QUEUED and _condition(d, "Failed") is None

    def test_admission_starts_the_startup_clock(self) -> None:
        """Ungated at 5000 s, the ranks get the whole startup timeout from then on."""
        gang = KUEUE
        queued = _decide(_job(gang, _starting()), [gated(rank=0), gated(rank=1)], after(4000))
        nowhere = [unschedulable(NO_NODE_MATCHES, rank=r) for r in range(2)]
        admitted = _decide(_next(queued, gang), nowhere, after(5000))
        assert admitted.status.phase == Phase.STARTING and "Admitted" in [e.reason for e in admitted.events]
        assert _condition(admitted, "Queued").status == "False"
        waiting = _decide(_next(admitted, gang), nowhere, after(5500))
        assert waiting.status.phase == Phase.STARTING
        late = _decide(_next(waiting, gang), nowhere, after(5601))
        assert late.status.phase == Phase.FAILED

    def test_admitted_ranks_running_is_running(self) -> None:
        queued = _decide(_job(KUEUE, _starting()), [gated(rank=0), gated(rank=1)], after(100))
        running = _decide(_next(queued, KUEUE), [pod(rank=0), pod(rank=1)], after(200))
        assert running.status.phase == Phase.RUNNING

    def test_queueing_time_is_charged_to_goodputs_queued_share(self) -> None:
        first = _decide(_job(KUEUE, _starting()), [gated(rank=0), gated(rank=1)], after(0))
        later = _decide(_next(first, KUEUE), [gated(rank=0), gated(rank=1)], after(300))
        assert later.status.goodput is not None and later.status.goodput.queued_seconds == 300

    def test_a_job_created_suspended_creates_nothing_until_unsuspended(self) -> None:
        d = decide(
            Observed(
                job=_job(KUEUE, None, **{"spec.runPolicy.suspend": True}),
                pods=(),
                service_exists=False,
                now=CREATED,
            )
        )
        assert d.status.phase == Phase.SUSPENDED and d.actions == []

    def test_kueue_needs_no_pod_group_actions(self) -> None:
        d = decide(Observed(job=_job(KUEUE), pods=(), service_exists=False, now=CREATED))
        assert d.actions == [CreateService(), CreateAttempt(1, (0, 1))]


class TestPodGroups:
    def test_the_first_attempts_group_is_created_before_its_pods(self) -> None:
        d = decide(Observed(job=_job(VOLCANO), pods=(), service_exists=False, now=CREATED))
        assert d.actions == [CreateService(), CreatePodGroup(1), CreateAttempt(1, (0, 1))]

    def test_a_pending_group_past_the_startup_deadline_is_still_queued(self) -> None:
        groups = (ObservedGroup(attempt=1, phase="Pending", owner_uid=JOB_UID),)
        pods = [unschedulable(rank=0), unschedulable(rank=1)]
        d = _decide(_job(VOLCANO, _starting()), pods, after(STARTUP * 3), groups)
        assert d.status.phase == Phase.QUEUED and _condition(d, "Failed") is None
        assert "Pending" in _condition(d, "Queued").message

    def test_an_inqueue_group_whose_pods_are_not_bound_is_still_queued(self) -> None:
        groups = (ObservedGroup(attempt=1, phase="Inqueue", owner_uid=JOB_UID),)
        d = _decide(_job(VOLCANO, _starting()), [unschedulable(rank=r) for r in range(2)], after(900), groups)
        assert d.status.phase == Phase.QUEUED

    def test_a_running_group_is_not_queued(self) -> None:
        groups = (ObservedGroup(attempt=1, phase="Running", owner_uid=JOB_UID),)
        d = _decide(_job(VOLCANO, _starting()), [pod(rank=0), pod(rank=1)], after(60), groups)
        assert d.status.phase == Phase.RUNNING and d.actions == []

    def test_a_group_that_disappeared_is_created_again(self) -> None:
        d = _decide(_job(VOLCANO, _starting()), [unschedulable(rank=r) for r in range(2)], after(60))
        assert CreatePodGroup(1) in d.actions

    def test_a_restart_creates_the_next_group_and_deletes_the_old_one(self) -> None:
        restarting = {
            **_starting(),
            "phase": "Restarting",
            "restarts": 1,
            "restartClass": "Application",
            "conditions": [
                {"type": "Restarting", "status": "True", "lastTransitionTime": CREATED.isoformat()}
            ],
        }
        groups = (ObservedGroup(attempt=1, phase="Running", owner_uid=JOB_UID),)
        d = _decide(_job(VOLCANO, restarting), [], after(3600), groups)
        assert d.status.attempt == 2
        assert d.actions.index(CreatePodGroup(2)) < next(
            i for i, a in enumerate(d.actions) if isinstance(a, CreateAttempt)
        )
        assert DeletePodGroup(1) in d.actions and CreatePodGroup(1) not in d.actions

    def test_a_finished_jobs_group_is_deleted(self) -> None:
        done = {**_starting(), "phase": "Succeeded", "completionTime": after(10).isoformat()}
        groups = (ObservedGroup(attempt=1, phase="Running", owner_uid=JOB_UID),)
        d = _decide(_job(VOLCANO, done), [], after(20), groups)
        assert DeletePodGroup(1) in d.actions

    def test_a_pending_coscheduling_group_is_queued_and_a_scheduling_one_is_not(self) -> None:
        cosched = {"spec.gang": {"scheduler": "Coscheduling"}}
        pods = [unschedulable(rank=0), unschedulable(rank=1)]
        pending = (ObservedGroup(attempt=1, phase="Pending", owner_uid=JOB_UID),)
        assert _decide(_job(cosched, _starting()), pods, after(900), pending).status.phase == Phase.QUEUED
        placing = (ObservedGroup(attempt=1, phase="Scheduling", owner_uid=JOB_UID),)
        assert _decide(_job(cosched, _starting()), pods, after(60), placing).status.phase == Phase.STARTING

    def test_a_bound_rank_ends_the_queue_whatever_the_group_says(self) -> None:
        """Volcano may lag in updating the group's phase; a rank bound to a node is admitted."""
        groups = (ObservedGroup(attempt=1, phase="Inqueue", owner_uid=JOB_UID),)
        pods = [pod(rank=0, phase="Pending", scheduled=True), unschedulable(rank=1)]
        assert _decide(_job(VOLCANO, _starting()), pods, after(60), groups).status.phase == Phase.STARTING

    def test_another_incarnations_group_is_left_to_the_garbage_collector(self) -> None:
        groups = (ObservedGroup(attempt=1, phase="Running", owner_uid="someone-else"),)
        d = _decide(_job(VOLCANO, _starting()), [pod(rank=0), pod(rank=1)], after(60), groups)
        assert not any(isinstance(a, DeletePodGroup) for a in d.actions)
