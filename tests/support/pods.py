"""Rank pods in the states a kubelet reports, as the API returns them: tests state only what differs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import contract

CREATED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    *,
    rank: int = 0,
    attempt: int = 1,
    phase: str = "Running",
    reason: str | None = None,
    waiting: tuple[str, str] | None = None,
    exit_code: int | None = None,
    terminated_reason: str | None = None,
    message: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": _iso(CREATED)}}
    if waiting:
        state = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    if exit_code is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": terminated_reason or "Error"}
        if message:
            terminated["message"] = message + "\n"
        state = {"terminated": terminated}
    meta: dict[str, Any] = {
        "name": f"demo-a{attempt}-n{rank}",
        "creationTimestamp": _iso(CREATED),
        "labels": {
            contract.LABEL_JOB: "demo",
            contract.LABEL_ATTEMPT: str(attempt),
            contract.LABEL_RANK: str(rank),
        },
    }
    if deleting:
        meta["deletionTimestamp"] = _iso(CREATED + timedelta(minutes=5))
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions or [],
        "containerStatuses": [{"name": contract.CONTAINER_NAME, "state": state}],
    }
    if reason:
        status["reason"] = reason
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


def disrupted(reason: str, **kw: Any) -> dict[str, Any]:
    condition = {"type": "DisruptionTarget", "status": "True", "reason": reason}
    return pod(conditions=[condition], **kw)


def unschedulable(**kw: Any) -> dict[str, Any]:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
    }
    return pod(phase="Pending", conditions=[condition], **kw)


def after(seconds: float) -> datetime:
    return CREATED + timedelta(seconds=seconds)
