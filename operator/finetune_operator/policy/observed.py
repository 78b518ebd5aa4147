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
class ObservedPod:
    name: str
    attempt: int
    rank: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    created_at: datetime | None = None
    deleting: bool = False
    deletion_deadline: datetime | None = None  # metadata.deletionTimestamp: when it should be gone
    reason: str | None = None  # pod-level: Evicted, NodeLost, ...
    disruption: str | None = None  # reason of a True DisruptionTarget condition
    unschedulable: str | None = None  # message of PodScheduled=False/Unschedulable
    waiting_reason: str | None = None  # trainer container waiting: ImagePullBackOff, ...
    waiting_message: str | None = None
    exit_code: int | None = None  # trainer container terminated
    terminated_reason: str | None = None  # OOMKilled, Error, Completed
    termination_message: str | None = None


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


def observe_pod(pod: dict[str, Any]) -> ObservedPod:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget")
    scheduled = conditions.get("PodScheduled")
    container = _trainer_status(status)
    state = container.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    return ObservedPod(
        name=meta.get("name", ""),
        attempt=int(labels.get(contract.LABEL_ATTEMPT, 0)),
        rank=int(labels.get(contract.LABEL_RANK, 0)),
        phase=status.get("phase") or "Pending",
        created_at=parse_time(meta.get("creationTimestamp")),
        deleting=bool(meta.get("deletionTimestamp")),
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        reason=status.get("reason"),
        disruption=disruption.get("reason") or "DisruptionTarget"
        if disruption and disruption.get("status") == "True"
        else None,
        unschedulable=(scheduled.get("message") or "unschedulable")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable"
        else None,
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        exit_code=terminated.get("exitCode"),
        terminated_reason=terminated.get("reason"),
        termination_message=(terminated.get("message") or "").strip() or None,
    )
