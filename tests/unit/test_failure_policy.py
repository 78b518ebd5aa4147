"""Every row of the failure-class table: what one rank pod's state means for the gang."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.policy.backoff import backoff_seconds, jitter_fraction
from finetune_operator.policy.failures import Outcome, Verdict, classify, gang_verdict
from finetune_operator.policy.observed import observe_pod

from tests.support.pods import after, disrupted, pod, unschedulable

STARTUP = 600
R, INFRA, FAIL = Outcome.RESTART, Outcome.INFRA_RESTART, Outcome.FAIL


def _verdict(raw: dict[str, Any], seconds: float = 30) -> Verdict:
    return classify(observe_pod(raw), now=after(seconds), startup_timeout_seconds=STARTUP)


@pytest.mark.parametrize(
    ("raw", "outcome", "reason"),
    [
        (pod(phase="Succeeded", exit_code=0, terminated_reason="Completed"), Outcome.SUCCEEDED, "Completed"),
        (pod(phase="Failed", exit_code=2, message="invalid trainer config"), FAIL, "InvalidConfig"),
        (
            pod(phase="Failed", exit_code=3, message="dataset s3://d/x.jsonl: not found"),
            FAIL,
            "InputNotFound",
        ),
        (pod(phase="Failed", exit_code=75, message="storage unavailable"), R, "Transient"),
        (pod(phase="Failed", exit_code=1, message="ValueError at step 12: boom"), R, "RankFailed"),
        (pod(phase="Failed", exit_code=137), R, "RankFailed"),
        (pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), R, "OOMKilled"),
        (pod(phase="Failed", exit_code=143, message="terminated: emergency checkpoint"), INFRA, "Terminated"),
        (pod(phase="Failed", reason="Evicted"), INFRA, "Evicted"),
        (pod(phase="Failed", reason="NodeLost"), INFRA, "NodeLost"),
        (pod(phase="Unknown"), INFRA, "NodeLost"),
        (pod(phase="Failed", reason="OutOfnvidia.com/gpu"), INFRA, "OutOfnvidia.com/gpu"),
        (disrupted("PreemptionByScheduler", phase="Failed", exit_code=143), INFRA, "Preempted"),
        (disrupted("DeletionByTaintManager", phase="Running"), INFRA, "NodeLost"),
        (disrupted("EvictionByEvictionAPI", phase="Failed", exit_code=1), INFRA, "Evicted"),
        (disrupted("TerminationByKubelet", phase="Failed", exit_code=137), INFRA, "Evicted"),
        (pod(deleting=True), INFRA, "PodDeleted"),
        (pod(phase="Running"), Outcome.RUNNING, "Running"),
        (pod(phase="Pending"), Outcome.PENDING, "Pending"),
    ],
)
def test_a_rank_pod_is_classified(raw: dict[str, Any], outcome: Outcome, reason: str) -> None:
    verdict = _verdict(raw)
    assert (verdict.outcome, verdict.reason) == (outcome, reason)


@pytest.mark.parametrize(
    "waiting",
    [
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    ],
)
def test_cluster_configuration_errors_wait_for_the_startup_deadline_then_fail(waiting: str) -> None:
    raw = pod(phase="Pending", waiting=(waiting, 'secret "s3-creds" not found'))
    assert _verdict(raw, STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, waiting) and "s3-creds" in late.message


def test_an_unschedulable_rank_fails_only_past_the_startup_deadline() -> None:
    assert _verdict(unschedulable(), STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(unschedulable(), STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, "Unschedulable") and "nvidia.com/gpu" in late.message


def test_the_termination_message_reaches_the_verdict() -> None:
    verdict = _verdict(pod(phase="Failed", exit_code=1, message="out of memory at step 1200"))
    assert verdict.message == "rank 0 (demo-a1-n0) exited 1: out of memory at step 1200"


def _v(outcome: Outcome, reason: str) -> Verdict:
    return Verdict(outcome, reason)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([_v(Outcome.SUCCEEDED, "Completed")] * 3, "Completed"),
        ([_v(Outcome.SUCCEEDED, "Completed"), _v(Outcome.RUNNING, "Running")], "Running"),
        ([_v(R, "Transient"), _v(R, "RankFailed")], "RankFailed"),  # the survivors of a crash
        ([_v(R, "Transient"), _v(INFRA, "NodeLost")], "NodeLost"),  # the survivors of a lost node
        ([_v(INFRA, "Evicted"), _v(FAIL, "InvalidConfig")], "InvalidConfig"),
        ([_v(R, "Transient"), _v(R, "Transient")], "Transient"),
        ([], "Pending"),
    ],
)
def test_the_gang_takes_its_most_telling_verdict(verdicts: list[Verdict], expected: str) -> None:
    assert gang_verdict(verdicts).reason == expected


@pytest.mark.parametrize(("restarts", "ceiling"), [(0, 10), (1, 20), (3, 80), (5, 300), (30, 300)])
def test_backoff_doubles_per_counted_restart_up_to_the_cap(restarts: int, ceiling: float) -> None:
    delay = backoff_seconds(restarts=restarts, base=10, cap=300, uid="u", attempt=restarts + 1)
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_jitter_is_the_same_for_the_same_attempt_and_spread_across_jobs() -> None:
    assert jitter_fraction("job-a", 3) == jitter_fraction("job-a", 3)
    spread = {round(jitter_fraction(f"job-{i}", 1), 3) for i in range(20)}
    assert len(spread) > 15
