"""A test kube-scheduler: places the emulator's rank pods on emulated nodes, and when it cannot,
says why in kube-scheduler's own words, produced from the pod's spec and the nodes as they are.

What it checks, in kube-scheduler's order (pkg/scheduler/apis/config/v1/default_plugins.go), each
node counted under its first failing plugin (pkg/scheduler/framework/runtime/framework.go
RunFilterPlugins stops there):
- PreFilter, VolumeBinding: a PersistentVolumeClaim the pod names that does not exist rejects the
  pod on every node with the lister's NotFound, `persistentvolumeclaim "x" not found`;
- NodeUnschedulable: a cordoned node, "node(s) were unschedulable";
- TaintToleration: a NoSchedule/NoExecute taint the pod does not tolerate, "node(s) had untolerated
  taint(s)" (the wording of current releases; earlier ones named the taint);
- NodeAffinity: a nodeSelector label the node lacks, "node(s) didn't match Pod's node affinity/selector";
- NodeResourcesFit: fewer free GPUs than the pod requests, "Insufficient <resource>" (fit.go), marked
  unresolvable when the node has fewer in all.
The message is FitError.Error()'s (pkg/scheduler/framework/types.go: "0/N nodes are available: "
then the sorted "count reason" histogram joined with ", ", then "."), followed by DefaultPreemption's
PostFilter ("preemption: " + a FitError over the nodes, pkg/scheduler/framework/preemption/
preemption.go): "No preemption victims found for incoming pod" where preempting was tried (no
emulated pod has a lower priority than a rank), "Preemption is not helpful for scheduling" where the
node's failure is unresolvable. For a rejected PreFilter it prints what clusters print for a missing
claim (public `kubectl describe` output): every node "No preemption victims found".

Other tenants: `hold` gives a node's GPUs to other work; with `backfill` on, GPUs a rank frees are
taken by other queued work at once (a full cluster); `release_tenants` ends that work.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

RESOURCE = "nvidia.com/gpu"
NOT_HELPFUL = "Preemption is not helpful for scheduling"
NO_VICTIMS = "No preemption victims found for incoming pod"


@dataclass
class EmulatedNode:
    name: str
    gpus: int = 8
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)  # {"key", "value", "effect"}
    cordoned: bool = False


@dataclass(frozen=True)
class Placed:
    node: str | None = None
    message: str | None = None


def _requested(pod: dict[str, Any]) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        wanted = (resources.get("requests") or {}).get(RESOURCE) or (resources.get("limits") or {}).get(
            RESOURCE
        )
        total += int(wanted or 0)
    return total


def _tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    """k8s.io/api/core/v1 Toleration.ToleratesTaint: key (empty matches all with Exists), value for
    Equal, and effect (empty matches all)."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint["key"]):
            return True
        if t.get("key") == taint["key"] and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _histogram(reasons: list[str]) -> str:
    return ", ".join(sorted(f"{count} {reason}" for reason, count in Counter(reasons).items()))


class Scheduler:
    def __init__(self, nodes: list[EmulatedNode], claims: set[str] | None = None) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.claims = set(claims or ())  # PersistentVolumeClaim names that exist
        self.held: dict[str, int] = {}  # GPUs of each node other tenants use
        self.bound: dict[tuple[str, str], tuple[str, int]] = {}  # rank pod -> (node, GPUs)
        self.backfill = False
        self._changed = asyncio.Event()

    # -- what tests do ---------------------------------------------------------------------------

    def hold(self, node: str, gpus: int | None = None) -> None:
        """Other tenants take `gpus` (all) of the node's GPUs."""
        self.held[node] = self.held.get(node, 0) + (self.nodes[node].gpus if gpus is None else gpus)

    def release_tenants(self) -> None:
        """The other tenants' work finishes: capacity appears."""
        self.backfill = False
        self.held.clear()
        self._notify()

    def add_node(self, node: EmulatedNode) -> None:
        self.nodes[node.name] = node
        self._notify()

    # -- what the kubelet uses ---------------------------------------------------------------------

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next change of capacity (take it before looking, then wait on it)."""
        return self._changed

    def free(self, node: str) -> int:
        used = self.held.get(node, 0) + sum(g for n, g in self.bound.values() if n == node)
        return self.nodes[node].gpus - used

    def place(self, key: tuple[str, str], pod: dict[str, Any]) -> Placed:
        """Bind the pod to the first node that fits it, or say why none does."""
        spec = pod.get("spec") or {}
        count = len(self.nodes)
        missing = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes") or []
            if v.get("persistentVolumeClaim")
            and v["persistentVolumeClaim"].get("claimName") not in self.claims
        ]
        if missing:
            said = f'persistentvolumeclaim "{missing[0]}" not found'
            return Placed(
                message=f"0/{count} nodes are available: {said}. {self._preemption([NO_VICTIMS] * count)}"
            )
        wanted = _requested(pod)
        reasons: list[str] = []
        helpful: list[str] = []
        for node in self.nodes.values():
            reason, resolvable = self._filter(node, spec, wanted)
            if reason is None:
                self.bound[key] = (node.name, wanted)
                return Placed(node=node.name)
            reasons.append(reason)
            helpful.append(NO_VICTIMS if resolvable else NOT_HELPFUL)
        if not reasons:
            return Placed(message="no nodes available to schedule pods")  # schedule_one.go
        return Placed(
            message=f"0/{count} nodes are available: {_histogram(reasons)}. {self._preemption(helpful)}"
        )

    def unbind(self, key: tuple[str, str]) -> None:
        node, gpus = self.bound.pop(key, (None, 0))
        if node is None:
            return
        if self.backfill:
            self.held[node] = self.held.get(node, 0) + gpus  # queued work takes what the rank freed
        else:
            self._notify()

    # -- kube-scheduler's filters ----------------------------------------------------------------

    def _filter(self, node: EmulatedNode, spec: dict[str, Any], wanted: int) -> tuple[str | None, bool]:
        tolerations = spec.get("tolerations") or []
        if node.cordoned and not _tolerates(
            tolerations, {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
        ):
            return "node(s) were unschedulable", False
        if any(
            t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(tolerations, t)
            for t in node.taints
        ):
            return "node(s) had untolerated taint(s)", False
        selector = spec.get("nodeSelector") or {}
        if any(node.labels.get(k) != v for k, v in selector.items()):
            return "node(s) didn't match Pod's node affinity/selector", False
        if wanted > self.free(node.name):
            return f"Insufficient {RESOURCE}", wanted <= node.gpus
        return None, True

    def _preemption(self, per_node: list[str]) -> str:
        return f"preemption: 0/{len(per_node)} nodes are available: {_histogram(per_node)}."

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
