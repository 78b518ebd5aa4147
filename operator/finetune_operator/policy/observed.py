"""What the operator reads off a rank pod, reduced to the facts the failure policy needs.

Parsed from the pod as the API returns it (a plain dict, camelCase), so the policy stays pure and the
same code serves the Kubernetes and the local backend (which writes the same shape).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from finetune_operator import contract
from finetune_operator.api import FineTuneJob


@dataclass(frozen=True)
class ContainerNote:
    """A container other than the trainer that holds the pod back or failed it."""

    container: str
    reason: str
    message: str | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class ObservedPod:
    name: str
    attempt: int
    rank: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    created_at: datetime | None = None
    owner_uid: str | None = None  # the controller owner reference's uid: which job incarnation
    deleting: bool = False
    deletion_deadline: datetime | None = None  # metadata.deletionTimestamp: when it should be gone
    reason: str | None = None  # pod-level: Evicted, NodeLost, Terminated (node shutdown), ...
    message: str | None = None  # pod-level status.message (the eviction manager's cause, ...)
    disruption: str | None = None  # reason of a True DisruptionTarget condition
    disruption_message: str | None = None
    unschedulable: str | None = None  # message of PodScheduled=False/Unschedulable
    nominated_node: str | None = None  # status.nominatedNodeName: preemption is making room there
    gated: tuple[str, ...] = ()  # spec.schedulingGates: the scheduler does not look at it yet
    scheduled: bool = False  # bound to a node
    # PodScheduled=True's lastTransitionTime: the binding (pkg/registry/core/pod/storage/storage.go
    # setPodNodeAndMetadata sets the condition through podutil.UpdatePodCondition, which stamps it)
    scheduled_at: datetime | None = None
    ready: bool | None = None  # the Ready condition; None when the pod has none yet
    waiting_reason: str | None = None  # trainer container waiting: ImagePullBackOff, ...
    waiting_message: str | None = None
    started: bool = False  # the trainer container has run (running or terminated)
    running: bool = False  # the trainer container is running now
    exit_code: int | None = None  # trainer container terminated
    terminated_reason: str | None = None  # OOMKilled, Error, Completed
    termination_message: str | None = None
    finished_at: datetime | None = None  # when the trainer container terminated
    init_failure: ContainerNote | None = None  # a (non-sidecar) init container that exited non-zero
    blocked_by: ContainerNote | None = None  # another container waiting on a non-transient reason


def parse_time(value: Any) -> datetime | None:
    """A Kubernetes timestamp ("2026-11-23T12:00:00Z") as a datetime; None for none."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def format_time(moment: datetime) -> str:
    """The API server's timestamp format (seconds, UTC, "Z")."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rank0_of_current_attempt(job: FineTuneJob, pods: Iterable[ObservedPod]) -> ObservedPod | None:
    """The pod whose log carries the job's progress reports (both backends read it)."""
    attempt = job.status.attempt if job.status else 0
    return next((p for p in pods if p.attempt == attempt and p.rank == 0), None)


def _trainer_status(status: dict[str, Any]) -> dict[str, Any]:
    for container in status.get("containerStatuses") or []:
        if container.get("name") == contract.CONTAINER_NAME:
            return dict(container)
    return {}


# The kubelet's own waiting reasons while a container is being set up normally
# (pkg/kubelet/kubelet_pods.go: "ContainerCreating" by default, "PodInitializing" behind init containers).
TRANSIENT_WAITING = frozenset({"ContainerCreating", "PodInitializing"})


def _sidecars(spec: dict[str, Any]) -> set[str]:
    """Native sidecars: init containers with restartPolicy Always (KEP-753). They run beside the
    trainer and the kubelet ignores their exit when it computes the pod's phase."""
    return {c.get("name", "") for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"}


def _init_failure(status: dict[str, Any], sidecars: set[str]) -> ContainerNote | None:
    for container in status.get("initContainerStatuses") or []:
        if container.get("name") in sidecars:
            continue
        terminated = (container.get("state") or {}).get("terminated") or {}
        code = terminated.get("exitCode")
        if code:  # not None and not 0
            return ContainerNote(
                container=container.get("name", ""),
                reason=terminated.get("reason") or "Error",
                message=(terminated.get("message") or "").strip() or None,
                exit_code=int(code),
            )
    return None


def _blocked_by(status: dict[str, Any]) -> ContainerNote | None:
    """The first container (init, sidecar or trainer) waiting on something the kubelet will not get
    past by itself (image, config, sandbox); None when all waits are the normal set-up ones."""
    for key in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(key) or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason")
            if reason and reason not in TRANSIENT_WAITING:
                return ContainerNote(container.get("name", ""), reason, waiting.get("message") or None)
    return None


def _owner_uid(meta: dict[str, Any]) -> str | None:
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner.get("uid") or "") or None
    return None


def observe_pod(pod: dict[str, Any]) -> ObservedPod:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget")
    disrupted = bool(disruption and disruption.get("status") == "True")
    scheduled = conditions.get("PodScheduled")
    ready = conditions.get("Ready")
    container = _trainer_status(status)
    state = container.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    return ObservedPod(
        name=meta.get("name", ""),
        attempt=int(labels.get(contract.LABEL_ATTEMPT, 0)),
        rank=int(labels.get(contract.LABEL_RANK, 0)),
        phase=status.get("phase") or "Pending",
        created_at=parse_time(meta.get("creationTimestamp")),
        owner_uid=_owner_uid(meta),
        deleting=bool(meta.get("deletionTimestamp")),
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        reason=status.get("reason"),
        message=(status.get("message") or "").strip() or None,
        disruption=(disruption or {}).get("reason") or "DisruptionTarget" if disrupted else None,
        disruption_message=(disruption or {}).get("message") if disrupted else None,
        unschedulable=(scheduled.get("message") or "unschedulable")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        else None,
        nominated_node=status.get("nominatedNodeName") or None,
        gated=tuple(str(g.get("name", "")) for g in (pod.get("spec") or {}).get("schedulingGates") or []),
        scheduled=bool((pod.get("spec") or {}).get("nodeName"))
        or bool(scheduled and scheduled.get("status") == "True"),
        scheduled_at=parse_time(scheduled.get("lastTransitionTime"))
        if scheduled and scheduled.get("status") == "True"
        else None,
        ready=None if ready is None else ready.get("status") == "True",
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        started=bool(state.get("running") or terminated),
        running=bool(state.get("running")),
        exit_code=terminated.get("exitCode"),
        terminated_reason=terminated.get("reason"),
        termination_message=(terminated.get("message") or "").strip() or None,
        finished_at=parse_time(terminated.get("finishedAt")),
        init_failure=_init_failure(status, _sidecars(pod.get("spec") or {})),
        blocked_by=_blocked_by(status),
    )


@dataclass(frozen=True)
class ObservedGroup:
    """A gang scheduler's PodGroup of one attempt (Volcano, Coscheduling)."""

    attempt: int
    phase: str | None  # status.phase; None before the scheduler looked at it
    owner_uid: str | None = None


def observe_group(group: dict[str, Any]) -> ObservedGroup:
    meta = group.get("metadata") or {}
    labels = meta.get("labels") or {}
    return ObservedGroup(
        attempt=int(labels.get(contract.LABEL_ATTEMPT, 0)),
        phase=(group.get("status") or {}).get("phase") or None,
        owner_uid=_owner_uid(meta),
    )
