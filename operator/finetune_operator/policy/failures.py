"""Failure classes: what one rank pod's state means for the gang (docs/architecture.md's table).

Infrastructure comes first: a pod that was evicted, preempted or lost its node reports whatever exit
its kill produced, and that must not count against the job. Between ranks of one gang the most
telling verdict wins: a configuration failure over an infrastructure one over a counted restart, and
among counted restarts a root cause over `Transient`, which is what the surviving ranks of a dead
peer report.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from finetune_operator import contract
from finetune_operator.policy.observed import ObservedPod


class Outcome(IntEnum):
    """Ordered by how much a verdict tells; the gang takes the highest."""

    RUNNING = 0
    PENDING = 1
    SUCCEEDED = 2
    RESTART = 3  # gang restart, counts toward maxRestarts
    INFRA_RESTART = 4  # gang restart, not counted
    FAIL = 5  # the job fails, no restart


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str  # a condition/event reason: CamelCase, stable
    message: str = ""


DISRUPTIONS = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
    "EvictionByEvictionAPI": "Evicted",
    "TerminationByKubelet": "Evicted",
}
NODE_GONE_REASONS = {"NodeLost", "NodeShutdown", "Shutdown", "Terminated"}
CLUSTER_CONFIG_WAITING = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",  # e.g. the credentials Secret is missing
    "CreateContainerError",
}
EXIT_VERDICTS = {
    contract.ExitCode.INVALID_CONFIG: (Outcome.FAIL, "InvalidConfig"),
    contract.ExitCode.INPUT_NOT_FOUND: (Outcome.FAIL, "InputNotFound"),
    contract.ExitCode.TRANSIENT: (Outcome.RESTART, "Transient"),
    contract.ExitCode.TERMINATED: (Outcome.INFRA_RESTART, "Terminated"),
}


def _age(pod: ObservedPod, now: datetime) -> float:
    return (now - pod.created_at).total_seconds() if pod.created_at else 0.0


def classify(pod: ObservedPod, *, now: datetime, startup_timeout_seconds: int) -> Verdict:
    who = f"rank {pod.rank} ({pod.name})"
    if pod.disruption:
        reason = DISRUPTIONS.get(pod.disruption, "Disrupted")
        return Verdict(Outcome.INFRA_RESTART, reason, f"{who}: {pod.disruption}")
    if pod.reason == "Evicted":
        return Verdict(Outcome.INFRA_RESTART, "Evicted", f"{who} was evicted")
    if pod.reason in NODE_GONE_REASONS or pod.phase == "Unknown":
        return Verdict(
            Outcome.INFRA_RESTART, "NodeLost", f"{who}: its node is gone ({pod.reason or 'Unknown'})"
        )
    if pod.phase == "Succeeded" or (pod.exit_code == 0 and pod.phase != "Failed"):
        return Verdict(Outcome.SUCCEEDED, "Completed")
    if pod.exit_code is not None:
        return _exited(pod, who)
    if pod.phase == "Failed":
        # Failed before the trainer ran (node admission: OutOfcpu, UnexpectedAdmissionError...).
        return Verdict(Outcome.INFRA_RESTART, pod.reason or "PodFailed", f"{who} failed on its node")
    if pod.deleting:
        return Verdict(Outcome.INFRA_RESTART, "PodDeleted", f"{who} is being deleted by someone else")
    late = _age(pod, now) > startup_timeout_seconds
    if pod.waiting_reason in CLUSTER_CONFIG_WAITING:
        message = f"{who}: {pod.waiting_reason}: {pod.waiting_message or ''}".rstrip(": ")
        return Verdict(Outcome.FAIL if late else Outcome.PENDING, pod.waiting_reason or "", message)
    if pod.unschedulable:
        message = f"{who} cannot be scheduled: {pod.unschedulable}"
        return Verdict(Outcome.FAIL if late else Outcome.PENDING, "Unschedulable", message)
    if pod.phase == "Running":
        return Verdict(Outcome.RUNNING, "Running")
    return Verdict(Outcome.PENDING, "Pending")


def _exited(pod: ObservedPod, who: str) -> Verdict:
    code = pod.exit_code
    assert code is not None
    said = pod.termination_message
    if pod.terminated_reason == "OOMKilled":
        return Verdict(Outcome.RESTART, "OOMKilled", f"{who} ran out of memory (OOMKilled)")
    outcome, reason = EXIT_VERDICTS.get(code, (Outcome.RESTART, "RankFailed"))  # type: ignore[call-overload]
    return Verdict(outcome, reason, f"{who} exited {code}: {said}" if said else f"{who} exited {code}")


def gang_verdict(verdicts: list[Verdict]) -> Verdict:
    """The gang's verdict: the most telling rank's. Succeeded only when every rank succeeded."""
    if not verdicts:
        return Verdict(Outcome.PENDING, "Pending")
    if all(v.outcome is Outcome.SUCCEEDED for v in verdicts):
        return verdicts[0]
    live = [v for v in verdicts if v.outcome is not Outcome.SUCCEEDED]
    top = max(v.outcome for v in live)
    candidates = [v for v in live if v.outcome is top]
    if top is Outcome.RESTART:
        # A dead peer makes every survivor report Transient; the cause is the other verdict.
        candidates = [v for v in candidates if v.reason != "Transient"] or candidates
    return candidates[0]
