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
from finetune_operator.policy import scheduling
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
    deadline_in: float | None = None  # a pending verdict's seconds until it fails (a capacity wait's)


DISRUPTIONS = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
    "EvictionByEvictionAPI": "Evicted",
    "TerminationByKubelet": "Evicted",
}
NODE_GONE_REASONS = {"NodeLost", "NodeShutdown", "Shutdown", "Terminated"}
# The node shutdown manager's pod reason and message (pkg/kubelet/nodeshutdown/nodeshutdown_manager_linux.go;
# "Shutdown" before 1.22). It leaves a pod that had already succeeded in phase Succeeded.
SHUTDOWN_REASONS = {"Terminated", "Shutdown"}
# The eviction manager's messages for a pod over its OWN limits (pkg/kubelet/eviction/helpers.go:
# containerEphemeralStorageMessageFmt, podEphemeralStorageMessageFmt, emptyDirMessageFmt). Such an
# eviction is the job's doing and repeats every attempt; a node-pressure one ("The node was low on
# resource", "The node had condition") is not. Only status.message tells them apart.
OWN_LIMIT_MESSAGES = (
    "exceeded its local ephemeral storage limit",
    "Pod ephemeral local storage usage exceeds the total limit of containers",
    "Usage of EmptyDir volume",
)
# Waiting reasons the kubelet does not get past by itself: pkg/kubelet/images/types.go (image errors)
# and pkg/kubelet/container/sync_result.go (sandbox, config, run errors). Everything waiting that is not
# ContainerCreating/PodInitializing is treated this way; these are the documented ones.
CLUSTER_CONFIG_WAITING = {
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "ImageInspectError",
    "RegistryUnavailable",
    "InvalidImageName",
    "SignatureValidationFailed",
    "CreateContainerConfigError",  # e.g. the credentials Secret is missing
    "CreateContainerError",
    "CreatePodSandboxError",
    "ConfigPodSandboxError",
    "RunContainerError",
    "PreStartHookError",
    "CrashLoopBackOff",  # a native sidecar that keeps dying before the trainer starts
}
EXIT_VERDICTS = {
    contract.ExitCode.INVALID_CONFIG: (Outcome.FAIL, "InvalidConfig"),
    contract.ExitCode.INPUT_NOT_FOUND: (Outcome.FAIL, "InputNotFound"),
    contract.ExitCode.OUT_OF_MEMORY: (Outcome.FAIL, "OutOfMemory"),
    contract.ExitCode.STORAGE_REFUSED: (Outcome.FAIL, "StorageRefused"),
    contract.ExitCode.TRANSIENT: (Outcome.RESTART, "Transient"),
    contract.ExitCode.TERMINATED: (Outcome.INFRA_RESTART, "Terminated"),
}
WAITING_FOR_CAPACITY = "WaitingForCapacity"  # a pending verdict: the scheduler lacks room right now
WAITED_TOO_LONG = "SchedulingTimeout"  # runPolicy.schedulingTimeoutSeconds passed while waiting
SIGKILL_EXIT = contract.SIGKILL_EXIT  # the kernel's OOM killer sends SIGKILL; any other exit was not its kill
# How long a counted gang failure waits while another rank still looks running, for that rank's node
# to show itself lost. The node lifecycle controller marks a silent node's pods NotReady after
# nodeMonitorGracePeriod (40 s by default, checked every nodeMonitorPeriod, 5 s); the ranks on
# healthy nodes fail within seconds of losing a peer, so they are seen first.
NODE_LOSS_SETTLE_SECONDS = 60.0


def _age(pod: ObservedPod, now: datetime, since: datetime | None = None) -> float:
    """How long the pod has been waiting to start: since its creation, since its gang was admitted,
    or since it got a node (a wait for capacity before that is not startup time)."""
    start = max((t for t in (pod.created_at, since, pod.scheduled_at) if t is not None), default=None)
    return (now - start).total_seconds() if start else 0.0


def _said(*parts: str | None) -> str:
    text = next((p for p in parts if p), "")
    return f": {text}" if text else ""


def _over_own_limit(pod: ObservedPod) -> bool:
    evicted = pod.reason == "Evicted" or pod.disruption == "TerminationByKubelet"
    text = f"{pod.message or ''} {pod.disruption_message or ''}"
    return evicted and any(m in text for m in OWN_LIMIT_MESSAGES)


def node_lost(pod: ObservedPod) -> str | None:
    """Why this pod's node looks lost, or None. A current control plane leaves a lost node's pods in
    phase Running and only flips their Ready condition to False (pkg/controller/nodelifecycle:
    MarkPodsNotReady after nodeMonitorGracePeriod), then taint eviction deletes them with
    DisruptionTarget=DeletionByTaintManager (pkg/controller/tainteviction) and pod GC fails those of
    deleted nodes with DeletionByPodGC (pkg/controller/podgc). A running trainer in a pod that is not
    Ready is that first sign: the kubelet itself would report a running container without a
    readiness probe as ready."""
    if pod.phase == "Unknown" or pod.reason == "NodeLost":
        return pod.reason or "Unknown"
    if pod.disruption in ("DeletionByTaintManager", "DeletionByPodGC"):
        return pod.disruption
    if pod.phase == "Running" and pod.running and pod.ready is False:
        return "NotReady"
    return None


def classify(
    pod: ObservedPod,
    *,
    now: datetime,
    startup_timeout_seconds: int,
    since: datetime | None = None,
    scheduling_timeout_seconds: int | None = None,
) -> Verdict:
    """One rank pod's verdict. The rules run in this order:
    1. a trainer that exited 0 finished its rank, whatever a sidecar, an eviction or a node shutdown
       did afterwards (the shutdown manager keeps a Succeeded pod Succeeded, but a sidecar's 143 or a
       late OOMKilled label can still fail the pod);
    2. an eviction for the pod's own storage limits counts; other disruptions, evictions and lost
       nodes do not;
    3. a failed init container counts (the pod never ran the trainer);
    4. the trainer's exit: OOMKilled only as the kernel's SIGKILL (137), never for a pod being deleted;
    5. failed without a trainer exit (node admission), or deleted by someone else: not counted;
    6. waiting: non-recovering waits, unschedulable, or scheduled but never started fail past the
       startup deadline (counted from `since` when that is later than the pod's creation: a gang
       scheduler admitted the gang then); before it everything waits. A pod the scheduler holds
       for lack of capacity (policy/scheduling.py) waits, however long, unless
       `scheduling_timeout_seconds` is set and has passed.
    """
    who = f"rank {pod.rank} ({pod.name})"
    if pod.exit_code == 0 or (pod.phase == "Succeeded" and pod.init_failure is None):
        return Verdict(Outcome.SUCCEEDED, "Completed")
    if _over_own_limit(pod):
        message = (
            f"{who} was evicted for exceeding its own limits{_said(pod.message, pod.disruption_message)}"
        )
        return Verdict(Outcome.RESTART, "EvictedOverLimit", message)
    if pod.reason in SHUTDOWN_REASONS and (pod.disruption or pod.phase == "Failed"):
        return Verdict(Outcome.INFRA_RESTART, "NodeShutdown", f"{who}{_said(pod.message, 'node shutdown')}")
    if pod.disruption:
        reason = DISRUPTIONS.get(pod.disruption, "Disrupted")
        return Verdict(
            Outcome.INFRA_RESTART, reason, f"{who}: {pod.disruption}{_said(pod.disruption_message)}"
        )
    if pod.reason == "Evicted":
        return Verdict(Outcome.INFRA_RESTART, "Evicted", f"{who} was evicted{_said(pod.message)}")
    if pod.reason in NODE_GONE_REASONS or pod.phase == "Unknown":
        return Verdict(
            Outcome.INFRA_RESTART, "NodeLost", f"{who}: its node is gone ({pod.reason or 'Unknown'})"
        )
    if pod.init_failure is not None:
        init = pod.init_failure
        message = f"{who}: init container {init.container} exited {init.exit_code}{_said(init.message)}"
        return Verdict(Outcome.RESTART, "InitContainerFailed", message)
    if pod.exit_code is not None:
        return _exited(pod, who)
    if pod.phase == "Failed":
        # Failed before the trainer ran (node admission: OutOfcpu, UnexpectedAdmissionError...).
        return Verdict(
            Outcome.INFRA_RESTART, pod.reason or "PodFailed", f"{who} failed on its node{_said(pod.message)}"
        )
    if pod.deleting:
        return Verdict(Outcome.INFRA_RESTART, "PodDeleted", f"{who} is being deleted by someone else")
    if pod.running:
        return Verdict(Outcome.RUNNING, "Running")
    age = _age(pod, now, since)
    if pod.unschedulable and pod.blocked_by is None:
        placed = scheduling.placement(pod.unschedulable, nominated=pod.nominated_node is not None)
        if placed is scheduling.Placement.CAPACITY:
            return _capacity(pod, who, age, scheduling_timeout_seconds)
    return _waiting(pod, who, late=age > startup_timeout_seconds, limit=startup_timeout_seconds)


def _capacity(pod: ObservedPod, who: str, age: float, limit: int | None) -> Verdict:
    said = pod.unschedulable or ""
    if pod.nominated_node:
        said = f"preempting on {pod.nominated_node}: {said}"
    if limit is not None and age > limit:
        message = f"{who} not scheduled within schedulingTimeoutSeconds {limit}: {said}"
        return Verdict(Outcome.FAIL, WAITED_TOO_LONG, message)
    left = None if limit is None else limit - age + 1
    return Verdict(Outcome.PENDING, WAITING_FOR_CAPACITY, f"{who} waits for capacity: {said}", left)


def _waiting(pod: ObservedPod, who: str, *, late: bool, limit: int) -> Verdict:
    outcome = Outcome.FAIL if late else Outcome.PENDING
    blocked = pod.blocked_by
    if blocked is not None:
        which = "" if blocked.container == contract.CONTAINER_NAME else f" (container {blocked.container})"
        return Verdict(outcome, blocked.reason, f"{who}{which}: {blocked.reason}{_said(blocked.message)}")
    if pod.unschedulable:
        if scheduling.placement(pod.unschedulable) is scheduling.Placement.NEVER:
            # the scheduler's message names what no node satisfies (selector, taint, volume...)
            return Verdict(
                outcome, "Unschedulable", f"{who} cannot be scheduled as the cluster is: {pod.unschedulable}"
            )
        return Verdict(outcome, "Unschedulable", f"{who} cannot be scheduled: {pod.unschedulable}")
    if pod.scheduled:
        # e.g. a volume that never mounts: the kubelet shows nothing but ContainerCreating.
        doing = pod.waiting_reason or "not started"
        return Verdict(
            outcome, "StartupTimeout", f"{who} scheduled but not started within {limit}s ({doing})"
        )
    return Verdict(outcome, "Pending", f"{who} not scheduled within {limit}s")


def _exited(pod: ObservedPod, who: str) -> Verdict:
    code = pod.exit_code
    assert code is not None
    said = pod.termination_message
    if pod.deleting and code in (SIGKILL_EXIT, contract.ExitCode.TERMINATED):
        return Verdict(
            Outcome.INFRA_RESTART, "PodDeleted", f"{who} was deleted by someone else (exit {code})"
        )
    if pod.terminated_reason == "OOMKilled" and code == SIGKILL_EXIT:
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


def rooted_in_a_lost_node(
    now: datetime, pods: list[ObservedPod], verdicts: list[Verdict], gang: Verdict
) -> Verdict | float:
    """A counted gang failure whose root is a lost node is not counted. On a current control plane
    the lost node's rank still looks Running (its Ready condition turns False only after the node
    monitor grace period) while the ranks on healthy nodes already failed. So: a rank whose node
    looks lost makes the failure NodeLost; while another rank still looks running, the verdict waits
    NODE_LOSS_SETTLE_SECONDS from the first failure (returned: the seconds left to wait)."""
    for pod in pods:
        why = node_lost(pod)
        if why is not None:
            message = f"rank {pod.rank} ({pod.name}): its node is lost ({why}); then {gang.message}"
            return Verdict(Outcome.INFRA_RESTART, "NodeLost", message)
    pairs = list(zip(pods, verdicts, strict=False))
    # Only a rank whose readiness the cluster reports can show a lost node (the local backend's
    # processes have no node and no Ready condition: nothing to wait for).
    if not any(v.outcome is Outcome.RUNNING and p.ready is not None for p, v in pairs):
        return gang
    failed = [p.finished_at for p, v in pairs if v.outcome is Outcome.RESTART and p.finished_at is not None]
    if not failed:
        return gang
    left = NODE_LOSS_SETTLE_SECONDS - (now - min(failed)).total_seconds()
    return gang if left <= 0 else left
