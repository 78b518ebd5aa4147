"""What the control plane does to the pods of a node whose kubelet stopped reporting, with its real
timing, read from the Kubernetes source:

1. pkg/controller/nodelifecycle (node_lifecycle_controller.go, config/v1alpha1/defaults.go): after
   nodeMonitorGracePeriod (40 s by default) without a heartbeat the node's Ready condition becomes
   Unknown, the node gets the `node.kubernetes.io/unreachable:NoExecute` taint, and MarkPodsNotReady
   (pkg/controller/util/node/controller_utils.go) flips each of its pods' Ready condition to False.
   The pods' phase stays Running: nothing else about them changes.
2. pkg/controller/tainteviction (taint_eviction.go): pods tolerate that taint for tolerationSeconds,
   300 s by default (the DefaultTolerationSeconds admission plugin adds the toleration to every pod);
   then the controller adds DisruptionTarget=True, reason DeletionByTaintManager, message "Taint
   manager: deleting due to NoExecute taint", and deletes the pod with its grace period. The kubelet
   that would finish the deletion is gone, so the pod stays Terminating.
3. pkg/controller/podgc (gc_controller.go): only when the Node object is deleted does pod GC, after
   its 40 s quarantine, mark such a pod Failed with DisruptionTarget reason DeletionByPodGC ("PodGC:
   node no longer exists") and delete it at once (grace period 0).

Meanwhile the ranks on healthy nodes fail within seconds (NCCL errors); the test kubelet scripts them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from tests.support.clock import JumpingClock
from tests.support.cluster import PODS, ClusterEmulator, timestamp

NODE_MONITOR_GRACE_PERIOD = 40.0  # kube-controller-manager --node-monitor-grace-period default
TOLERATION_SECONDS = 300.0  # DefaultTolerationSeconds: not-ready / unreachable NoExecute
POD_GC_QUARANTINE = 40.0  # podgc's quarantineTime for pods of a deleted node
TICK = 0.5  # nodeMonitorPeriod is 5 s; a shorter tick only makes tests quicker


@dataclass
class LostNode:
    name: str
    since: datetime  # the last heartbeat
    not_ready: bool = False
    evicted: bool = False
    deleted_at: datetime | None = None
    collected: bool = False


class NodeLifecycle:
    def __init__(self, cluster: ClusterEmulator, clock: JumpingClock) -> None:
        self.cluster, self.clock = cluster, clock
        self.lost: dict[str, LostNode] = {}

    def lose(self, node: str) -> None:
        """The node's kubelet stops reporting now (a power loss, a partition)."""
        self.lost.setdefault(node, LostNode(node, self.clock.now()))

    def delete_node(self, node: str) -> None:
        """The Node object is deleted (a cloud controller removing the instance)."""
        if node in self.lost:
            self.lost[node].deleted_at = self.clock.now()

    async def run(self) -> None:
        wake = asyncio.Event()
        while True:
            await self.clock.sleep(TICK, wake)
            for node in list(self.lost.values()):
                with contextlib.suppress(KeyError):
                    await self._step(node)

    def _pods_on(self, node: str) -> list[dict]:  # type: ignore[type-arg]
        return [p for p in self.cluster.list(PODS) if (p.get("spec") or {}).get("nodeName") == node]

    async def _step(self, node: LostNode) -> None:
        now = self.clock.now()
        silent = (now - node.since).total_seconds()
        if not node.not_ready and silent >= NODE_MONITOR_GRACE_PERIOD:
            node.not_ready = True
            for pod in self._pods_on(node.name):
                await self._mark_not_ready(pod)
        if node.not_ready and not node.evicted and silent >= NODE_MONITOR_GRACE_PERIOD + TOLERATION_SECONDS:
            node.evicted = True
            for pod in self._pods_on(node.name):
                await self._evict(
                    pod, "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint"
                )
        if (
            node.deleted_at
            and not node.collected
            and now - node.deleted_at >= timedelta(seconds=POD_GC_QUARANTINE)
        ):
            node.collected = True
            for pod in self._pods_on(node.name):
                await self._collect(pod)

    async def _patch_conditions(self, pod: dict, change: dict, **status: str) -> None:  # type: ignore[type-arg]
        meta = pod["metadata"]
        conditions = [
            c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] != change["type"]
        ]
        conditions.append({**change, "lastTransitionTime": timestamp(self.clock)})
        await self.cluster.write(
            PODS, meta["namespace"], meta["name"], {"status": {"conditions": conditions, **status}}
        )

    async def _mark_not_ready(self, pod: dict) -> None:  # type: ignore[type-arg]
        ready = next((c for c in pod["status"].get("conditions") or [] if c["type"] == "Ready"), None)
        if ready is None or ready.get("status") != "True":
            return
        await self._patch_conditions(pod, {**ready, "status": "False"})

    async def _evict(self, pod: dict, cause: str, message: str) -> None:  # type: ignore[type-arg]
        disruption = {"type": "DisruptionTarget", "status": "True", "reason": cause, "message": message}
        await self._patch_conditions(pod, disruption)
        meta = pod["metadata"]
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        if not meta.get("deletionTimestamp"):
            await self.cluster.write(
                PODS,
                meta["namespace"],
                meta["name"],
                {
                    "metadata": {
                        "deletionTimestamp": timestamp(self.clock, grace),
                        "deletionGracePeriodSeconds": grace,
                    }
                },
            )

    async def _collect(self, pod: dict) -> None:  # type: ignore[type-arg]
        disruption = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "DeletionByPodGC",
            "message": "PodGC: node no longer exists",
        }
        await self._patch_conditions(pod, disruption, phase="Failed")
        await self.cluster.remove(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
