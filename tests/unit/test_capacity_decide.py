"""The decide step with rank pods the scheduler holds for lack of capacity: the attempt waits, on
every attempt, with a WaitingForCapacity condition saying for what and since when; it fails only
past runPolicy.schedulingTimeoutSeconds when one is set; the wait is charged to goodput's bucket of
whatever started the attempt (queueing for the first, the restart's class for a restarted one)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from finetune_operator.api import parse_manifest
from finetune_operator.api.status import Phase
from finetune_operator.policy.decide import Decision, Observed, decide
from finetune_operator.policy.observed import observe_pod

from tests.support.factories import manifest
from tests.support.pods import CREATED, JOB_UID, NO_GPU_FREE, NO_NODE_MATCHES, after, pod, unschedulable

STARTUP = 600


def _job(status: dict[str, Any], **changes: Any) -> Any:
    data = manifest({"spec.resources.nodes": 2, "spec.runPolicy.startupTimeoutSeconds": STARTUP, **changes})
    data["metadata"].update(uid=JOB_UID, generation=1)
    data["status"] = status
    return parse_manifest(data)


def _decide(job: Any, pods: list[dict[str, Any]], now: datetime) -> Decision:
    observed = tuple(observe_pod(p) for p in pods)
    return decide(Observed(job=job, pods=observed, service_exists=True, now=now))


def _next(d: Decision, **changes: Any) -> Any:
    return _job(d.status.model_dump(mode="json", by_alias=True, exclude_none=True), **changes)


def _starting(attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"phase": "Starting", "attempt": attempt, "startTime": CREATED.isoformat(), **extra}


def _waiting(attempt: int = 1, message: str = NO_GPU_FREE) -> list[dict[str, Any]]:
    return [unschedulable(message, rank=r, attempt=attempt) for r in range(2)]


def _condition(d: Decision, kind: str = "WaitingForCapacity") -> Any:
    return next((c for c in d.status.conditions if c.type == kind), None)


def test_an_attempt_waiting_for_capacity_shows_the_schedulers_words_and_since_when() -> None:
    d = _decide(_job(_starting()), _waiting(), after(30))
    waiting = _condition(d)
    assert (waiting.status, waiting.reason) == ("True", "WaitingForCapacity")
    assert "Insufficient nvidia.com/gpu" in waiting.message and "attempt 1" in waiting.message
    assert waiting.last_transition_time == after(30)
    assert [e.reason for e in d.events] == ["WaitingForCapacity"]


def test_the_wait_keeps_its_beginning_and_announces_itself_once() -> None:
    first = _decide(_job(_starting()), _waiting(), after(30))
    later = _decide(_next(first), _waiting(), after(STARTUP * 5))
    assert _condition(later).last_transition_time == after(30)
    assert later.events == []


def test_a_restarted_attempt_waits_for_capacity_past_the_startup_deadline() -> None:
    d = _decide(_job(_starting(attempt=2, restarts=1)), _waiting(attempt=2), after(STARTUP * 10))
    assert d.status.phase == Phase.STARTING and _condition(d, "Failed") is None
    assert _condition(d).status == "True"


def test_an_attempt_no_node_can_take_fails_past_the_startup_deadline() -> None:
    d = _decide(_job(_starting(attempt=2, restarts=1)), _waiting(2, NO_NODE_MATCHES), after(STARTUP + 1))
    failed = _condition(d, "Failed")
    assert d.status.phase == Phase.FAILED and failed.reason == "Unschedulable"
    assert "didn't match Pod's node affinity/selector" in failed.message
    assert _condition(d) is None  # it never waited for capacity


def test_the_scheduling_timeout_fails_a_capacity_wait_and_ends_the_condition() -> None:
    limit = {"spec.runPolicy.schedulingTimeoutSeconds": 3600}
    first = _decide(_job(_starting(), **limit), _waiting(), after(30))
    late = _decide(_next(first, **limit), _waiting(), after(3601))
    failed = _condition(late, "Failed")
    assert late.status.phase == Phase.FAILED and failed.reason == "SchedulingTimeout"
    assert "schedulingTimeoutSeconds 3600" in failed.message
    assert (_condition(late).status, _condition(late).reason) == ("False", "Failed")


def test_a_capacity_wait_with_a_scheduling_timeout_wakes_the_job_at_it() -> None:
    limit = {"spec.runPolicy.schedulingTimeoutSeconds": 900}
    d = _decide(_job(_starting(), **limit), _waiting(), after(400))
    assert d.requeue_after == 501  # the pods were created at 0: 900 s pass at 900 (plus a second)


def test_ranks_running_end_the_wait() -> None:
    first = _decide(_job(_starting()), _waiting(), after(30))
    running = _decide(_next(first), [pod(rank=0), pod(rank=1)], after(4000))
    assert running.status.phase == Phase.RUNNING
    done = _condition(running)
    assert (done.status, done.reason, done.last_transition_time) == ("False", "CapacityFound", after(4000))


def test_the_first_attempts_wait_is_queueing_time() -> None:
    first = _decide(_job(_starting()), _waiting(), after(0))
    first.status.goodput.waiting_for = "Queue"  # type: ignore[union-attr]  (as the attempt's start sets it)
    later = _decide(_next(first), _waiting(), after(3000))
    assert later.status.goodput is not None and later.status.goodput.queued_seconds == 3000


def test_a_restarted_attempts_wait_is_charged_to_the_restart() -> None:
    """Had the job not failed, it would still hold its nodes: the wait is the restart's cost."""
    status = _starting(attempt=2, restarts=1, restartClass="Application")
    status["goodput"] = {"accountedUntil": after(0).isoformat(), "waitingFor": "Application"}
    later = _decide(_job(status), _waiting(attempt=2), after(3000))
    goodput = later.status.goodput
    assert goodput is not None and (goodput.application_restart_seconds, goodput.queued_seconds) == (3000, 0)
