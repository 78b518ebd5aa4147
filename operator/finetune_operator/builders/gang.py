"""What spec.gang adds to an attempt: the rank pods' scheduler, labels and annotations, and the
attempt's PodGroup for the schedulers that need one.

Sources (the keys themselves live in finetune_operator.contract):
- Kueue plain pods in a group: every pod carries the queue-name label, the group-name label and the
  total-count annotation; Kueue's webhook then adds its scheduling gate and ungates the whole group
  once one Workload for all of them is admitted (kubernetes-sigs/kueue pkg/controller/jobs/pod/
  pod_webhook.go, pod_controller.go). `retriable-in-group: "false"` finishes that Workload (and frees
  its quota) as soon as a rank ends: the operator never replaces a rank inside an attempt, it starts
  a new group, so the old Workload must not wait for a replacement. `role-hash` names the pods'
  PodSet: without it Kueue hashes each pod's shape (pod_controller.go getRoleHash), which in some
  versions includes the labels, so every rank (its own node-rank label) would be a PodSet of one and
  a topology request would place each rank on its own instead of the gang in one domain.
- Kueue topology-aware scheduling (keps/2724-topology-aware-scheduling): the podset-required- or
  preferred-topology annotation with placement.topologyKey, and the node-rank label as each pod's
  index in the group (pod_webhook.go Default copies it into kueue.x-k8s.io/pod-group-pod-index).
- Volcano: scheduling.volcano.sh/v1beta1 PodGroup (config/crd/volcano/bases/
  scheduling.volcano.sh_podgroups.yaml: minMember, minResources, queue, priorityClassName), pods bound
  by the scheduling.k8s.io/group-name annotation.
- Coscheduling: scheduling.x-k8s.io/v1alpha1 PodGroup (kubernetes-sigs/scheduler-plugins
  apis/scheduling/v1alpha1/types.go: minMember, minResources, scheduleTimeoutSeconds), pods bound by
  the scheduling.x-k8s.io/pod-group label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from finetune_operator import contract
from finetune_operator.api import FineTuneJob
from finetune_operator.builders import naming
from finetune_operator.builders.objects import Manifest, child_metadata


@dataclass(frozen=True)
class PodGroupApi:
    group: str
    version: str
    plural: str = "podgroups"
    kind: str = "PodGroup"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


POD_GROUP_APIS = {
    "Volcano": PodGroupApi("scheduling.volcano.sh", "v1beta1"),
    "Coscheduling": PodGroupApi("scheduling.x-k8s.io", "v1alpha1"),
}


@dataclass(frozen=True)
class GangPodMetadata:
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    scheduler_name: str | None = None


def pod_group_api(job: FineTuneJob) -> PodGroupApi | None:
    gang = job.spec.gang
    return POD_GROUP_APIS.get(gang.scheduler) if gang is not None else None


def gang_pod_metadata(job: FineTuneJob, attempt: int) -> GangPodMetadata:
    gang = job.spec.gang
    if gang is None:
        return GangPodMetadata()
    group = naming.group_name(job.metadata.name, attempt)
    scheduler = gang.pod_scheduler_name()
    if gang.scheduler == "Volcano":
        return GangPodMetadata(
            annotations={contract.VOLCANO_GROUP_ANNOTATION: group}, scheduler_name=scheduler
        )
    if gang.scheduler == "Coscheduling":
        return GangPodMetadata(labels={contract.COSCHEDULING_GROUP_LABEL: group}, scheduler_name=scheduler)
    assert gang.queue_name is not None  # the API requires it for Kueue
    annotations = {
        contract.KUEUE_TOTAL_COUNT_ANNOTATION: str(job.spec.resources.nodes),
        contract.KUEUE_RETRIABLE_ANNOTATION: "false",
        contract.KUEUE_ROLE_HASH_ANNOTATION: contract.KUEUE_ROLE,
    }
    placement = job.spec.placement
    if placement.topology_key is not None:
        key = (
            contract.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION
            if placement.topology_policy == "Required"
            else contract.KUEUE_PREFERRED_TOPOLOGY_ANNOTATION
        )
        annotations[key] = placement.topology_key
        annotations[contract.KUEUE_POD_INDEX_LABEL_ANNOTATION] = contract.LABEL_RANK  # ranks placed in order
    labels = {contract.KUEUE_QUEUE_LABEL: gang.queue_name, contract.KUEUE_GROUP_LABEL: group}
    return GangPodMetadata(labels=labels, annotations=annotations, scheduler_name=scheduler)


_QUANTITY = re.compile(r"^([0-9]*\.?[0-9]*)(.*)$")


def times(quantity: str, count: int) -> str:
    """A quantity `count` times over, in the same unit ("64Gi" x 2 = "128Gi", "500m" x 3 = "1500m")."""
    match = _QUANTITY.match(quantity)
    assert match is not None and match.group(1)
    number = Decimal(match.group(1)) * count
    text = format(number.normalize(), "f") if number != number.to_integral() else str(int(number))
    return text + match.group(2)


def build_pod_group(job: FineTuneJob, attempt: int, pod_requests: dict[str, str]) -> Manifest | None:
    """The attempt's PodGroup (Volcano, Coscheduling); None when the gang needs none. The group asks
    for the whole gang: minMember every rank, minResources every rank's requests."""
    gang, api = job.spec.gang, pod_group_api(job)
    if gang is None or api is None:
        return None
    nodes = job.spec.resources.nodes
    name = job.metadata.name
    spec: dict[str, Any] = {"minMember": nodes}
    if pod_requests:
        spec["minResources"] = {k: times(str(v), nodes) for k, v in sorted(pod_requests.items())}
    if gang.scheduler == "Volcano":
        if gang.queue_name:
            spec["queue"] = gang.queue_name
        if job.spec.resources.priority_class_name:
            spec["priorityClassName"] = job.spec.resources.priority_class_name
    elif gang.schedule_timeout_seconds is not None:
        spec["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
    return {
        "apiVersion": api.api_version,
        "kind": api.kind,
        "metadata": child_metadata(
            job, naming.group_name(name, attempt), naming.attempt_labels(name, attempt)
        ),
        "spec": spec,
    }
