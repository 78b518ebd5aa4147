"""Stand-ins for the gang schedulers, doing to pods and PodGroups what the real ones do, as far as
the operator can see it.

Kueue (kubernetes-sigs/kueue): its pod webhook (pkg/controller/jobs/pod/pod_webhook.go, Default)
adds the `kueue.x-k8s.io/admission` scheduling gate to every pod it manages (one with the queue-name
label); the API server then reports PodScheduled=False/SchedulingGated (kubernetes
pkg/registry/core/pod/strategy.go). Once the group's Workload is admitted, its pod reconciler
(pod_controller.go, Run -> ungate) removes the gate from every pod of the group, and only a
group whose pods all exist (pod-group-total-count of them) forms a Workload.

Volcano (volcano-sh/volcano): a PodGroup's status.phase is Pending until the enqueue action admits
it, Inqueue until minMember pods are bound, then Running; while the gang does not fit, the scheduler
records PodScheduled=False/Unschedulable on its pods with a gang message ("pod group is not ready").

The test kubelet plays the default scheduler too: a held pod is neither bound nor started.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import kmock
from finetune_operator import contract

from tests.support.cluster import COSCHEDULING_PODGROUPS, PODS, VOLCANO_PODGROUPS, ClusterEmulator
from tests.support.kubelet import Kubelet


class KueueStandIn:
    def __init__(
        self, cluster: ClusterEmulator, kubelet: Kubelet, *, admit_whole_groups: bool = False
    ) -> None:
        """`admit_whole_groups`: a LocalQueue with room for every gang, admitted as soon as it is
        complete; otherwise the test admits each group with `admit`."""
        self.cluster, self.admit_whole_groups = cluster, admit_whole_groups
        self._admissions: set[asyncio.Task[None]] = set()
        cluster.mutators.append(self._webhook)
        kubelet.holds.append(lambda pod: bool((pod.get("spec") or {}).get("schedulingGates")))

    def _webhook(self, resource: kmock.resource, namespace: str, obj: dict[str, Any]) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if resource != PODS or contract.KUEUE_QUEUE_LABEL not in labels:
            return
        obj.setdefault("spec", {})["schedulingGates"] = [{"name": contract.KUEUE_ADMISSION_GATE}]
        gated = {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                 "message": "Scheduling is blocked due to non-empty scheduling gates"}  # fmt: skip
        obj.setdefault("status", {})["conditions"] = [gated]
        if self.admit_whole_groups:
            task = asyncio.create_task(
                self._admit_when_complete(namespace, labels[contract.KUEUE_GROUP_LABEL])
            )
            self._admissions.add(task)
            task.add_done_callback(self._admissions.discard)

    async def _admit_when_complete(self, namespace: str, group: str) -> None:
        await asyncio.sleep(0.05)  # the create that called the webhook stores the pod first
        pods = self.group(namespace, group)
        if pods and len(pods) == int(
            pods[0]["metadata"]["annotations"][contract.KUEUE_TOTAL_COUNT_ANNOTATION]
        ):
            await self.admit(namespace, group)

    def group(self, namespace: str, group: str) -> list[dict[str, Any]]:
        pods = self.cluster.list(PODS, f"{contract.KUEUE_GROUP_LABEL}={group}")
        return [p for p in pods if p["metadata"].get("namespace") == namespace]

    async def admit(self, namespace: str, group: str) -> None:
        """The group's Workload is admitted: every pod is ungated (the whole group must exist)."""
        pods = self.group(namespace, group)
        total = int(pods[0]["metadata"]["annotations"][contract.KUEUE_TOTAL_COUNT_ANNOTATION])
        assert len(pods) == total, f"Kueue forms no Workload until all {total} pods exist"
        for pod in pods:
            await self.cluster.write(
                PODS,
                namespace,
                pod["metadata"]["name"],
                {"spec": {"schedulingGates": []}, "status": {"conditions": []}},
            )


class PodGroupStandIn:
    """Volcano or scheduler-plugins' Coscheduling: a PodGroup stays in its waiting phase (Volcano:
    Pending; Coscheduling: Pending, apis/scheduling/v1alpha1/types.go) and its pods unschedulable
    until the test releases it (or at once with `admit_at_once`)."""

    KINDS: ClassVar[dict[str, tuple[kmock.resource, str, str, str]]] = {
        "Volcano": (VOLCANO_PODGROUPS, "volcano", "annotations", contract.VOLCANO_GROUP_ANNOTATION),
        "Coscheduling": (
            COSCHEDULING_PODGROUPS,
            "scheduler-plugins-scheduler",
            "labels",
            contract.COSCHEDULING_GROUP_LABEL,
        ),
    }

    def __init__(
        self,
        cluster: ClusterEmulator,
        kubelet: Kubelet,
        kind: str = "Volcano",
        *,
        admit_at_once: bool = False,
    ) -> None:
        self.cluster, self.admit_at_once = cluster, admit_at_once
        self.resource, self.scheduler, self._where, self._key = self.KINDS[kind]
        cluster.mutators.append(self._status)
        kubelet.holds.append(self._waits_for_its_gang)

    def _status(self, resource: kmock.resource, namespace: str, obj: dict[str, Any]) -> None:
        if resource == self.resource:
            obj["status"] = {"phase": "Running" if self.admit_at_once else "Pending"}
        elif resource == PODS and self._group_of(obj) is not None and not self.admit_at_once:
            unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": "pod group is not ready, 2 Pending, 2 minAvailable"}  # fmt: skip
            obj.setdefault("status", {})["conditions"] = [unschedulable]

    def _group_of(self, pod: dict[str, Any]) -> str | None:
        if (pod.get("spec") or {}).get("schedulerName") != self.scheduler:
            return None
        return ((pod.get("metadata") or {}).get(self._where) or {}).get(self._key)

    def _waits_for_its_gang(self, pod: dict[str, Any]) -> bool:
        group = self._group_of(pod)
        if group is None:
            return False
        found = self.cluster.get(self.resource, pod["metadata"].get("namespace", ""), group)
        return found is None or (found.get("status") or {}).get("phase") != "Running"

    async def release(self, namespace: str, group: str) -> None:
        """The gang fits: the group runs and the scheduler binds its pods (the kubelet takes over)."""
        await self.cluster.write(self.resource, namespace, group, {"status": {"phase": "Running"}})
        for pod in self.cluster.list(PODS):
            if pod["metadata"].get("namespace") == namespace and self._group_of(pod) == group:
                scheduled = {"type": "PodScheduled", "status": "True"}
                await self.cluster.write(
                    PODS, namespace, pod["metadata"]["name"], {"status": {"conditions": [scheduled]}}
                )
