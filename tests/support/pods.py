"""Rank pods in the states a kubelet reports, as the API returns them: tests state only what differs.

The defaults follow what the kubelet writes (pkg/kubelet/status/generate.go, kubelet_pods.go): a
Running pod is bound to a node and Ready while its containers run; a pod that has not started shows
its trainer waiting in ContainerCreating; a terminated container carries its finishedAt.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator import contract

CREATED = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
JOB_UID = "3f1c2d4e-0000-4000-8000-000000000001"


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def container(name: str, state: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ready": "running" in state, "started": "running" in state, "state": state}


def running_state() -> dict[str, Any]:
    return {"running": {"startedAt": _iso(CREATED)}}


def terminated_state(
    code: int, reason: str | None = None, message: str | None = None, at: float = 60
) -> dict[str, Any]:
    terminated: dict[str, Any] = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "finishedAt": _iso(CREATED + timedelta(seconds=at)),
    }
    if message:
        terminated["message"] = message + "\n"
    return {"terminated": terminated}


def waiting_state(reason: str, message: str | None = None) -> dict[str, Any]:
    return {"waiting": {"reason": reason, **({"message": message} if message else {})}}


def pod(
    *,
    rank: int = 0,
    attempt: int = 1,
    phase: str = "Running",
    reason: str | None = None,
    pod_message: str | None = None,
    waiting: tuple[str, str] | None = None,
    exit_code: int | None = None,
    terminated_reason: str | None = None,
    message: str | None = None,
    finished_at: float = 60,
    conditions: list[dict[str, Any]] | None = None,
    deleting: bool = False,
    ready: bool | None = None,
    scheduled: bool | None = None,
    init_statuses: list[dict[str, Any]] | None = None,
    init_specs: list[dict[str, Any]] | None = None,
    sidecars: list[dict[str, Any]] | None = None,
    owner_uid: str = JOB_UID,
) -> dict[str, Any]:
    if exit_code is not None:
        state = terminated_state(exit_code, terminated_reason, message, finished_at)
    elif waiting:
        state = waiting_state(*waiting)
    elif phase == "Running":
        state = running_state()
    else:
        state = waiting_state("ContainerCreating")
    meta: dict[str, Any] = {
        "name": f"demo-a{attempt}-n{rank}",
        "uid": f"pod-{attempt}-{rank}",
        "creationTimestamp": _iso(CREATED),
        "labels": {
            contract.LABEL_JOB: "demo",
            contract.LABEL_ATTEMPT: str(attempt),
            contract.LABEL_RANK: str(rank),
        },
        "ownerReferences": [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "demo",
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if deleting:
        meta["deletionTimestamp"] = _iso(CREATED + timedelta(minutes=5))
    bound = scheduled if scheduled is not None else phase != "Pending" or waiting is not None
    all_conditions = list(conditions or [])
    if bound and not any(c["type"] == "PodScheduled" for c in all_conditions):
        all_conditions.append({"type": "PodScheduled", "status": "True"})
    is_ready = ready if ready is not None else phase == "Running" and "running" in state
    if bound and not any(c["type"] == "Ready" for c in all_conditions):
        ready_condition = {"type": "Ready", "status": "True" if is_ready else "False"}
        if not is_ready:
            ready_condition["reason"] = (
                "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
            )
        all_conditions.append(ready_condition)
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": all_conditions,
        "containerStatuses": [container(contract.CONTAINER_NAME, state), *(sidecars or [])],
    }
    if init_statuses:
        status["initContainerStatuses"] = init_statuses
    if reason:
        status["reason"] = reason
    if pod_message:
        status["message"] = pod_message
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [{"name": contract.CONTAINER_NAME}]}
    if init_specs:
        spec["initContainers"] = init_specs
    if bound:
        spec["nodeName"] = f"node-{rank}"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def disrupted(cause: str, message: str | None = None, **kw: Any) -> dict[str, Any]:
    """A pod with DisruptionTarget=True for `cause` (the condition's reason)."""
    condition = {"type": "DisruptionTarget", "status": "True", "reason": cause}
    if message:
        condition["message"] = message
    return pod(conditions=[condition, *kw.pop("conditions", [])], **kw)


# kube-scheduler's messages (pkg/scheduler/framework/types.go FitError.Error, the reasons of
# noderesources/fit.go and nodeaffinity/node_affinity.go, defaultpreemption's "preemption: " suffix)
NO_GPU_FREE = (
    "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available: "
    "4 No preemption victims found for incoming pod."
)
NO_NODE_MATCHES = (
    "0/4 nodes are available: 4 node(s) didn't match Pod's node affinity/selector. preemption: "
    "0/4 nodes are available: 4 Preemption is not helpful for scheduling."
)


def unschedulable(message: str = NO_GPU_FREE, nominated: str | None = None, **kw: Any) -> dict[str, Any]:
    """A pod kube-scheduler could not place, with its message (and the node it nominated while
    preempting there, status.nominatedNodeName)."""
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    built = pod(phase="Pending", conditions=[condition], scheduled=False, **kw)
    if nominated:
        built["status"]["nominatedNodeName"] = nominated
    return built


def after(seconds: float) -> datetime:
    return CREATED + timedelta(seconds=seconds)


def gated(gate: str = contract.KUEUE_ADMISSION_GATE, **kw: Any) -> dict[str, Any]:
    """A pod held by a scheduling gate: unbound, with the PodScheduled=False/SchedulingGated
    condition the API server sets on such a pod (kubernetes pkg/registry/core/pod/strategy.go,
    applySchedulingGatedCondition)."""
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "SchedulingGated",
        "message": "Scheduling is blocked due to non-empty scheduling gates",
    }
    built = pod(phase="Pending", conditions=[condition], scheduled=False, **kw)
    built["spec"]["schedulingGates"] = [{"name": gate}]
    return built
