"""spec.gang in the built objects: the rank pods' scheduler, labels and annotations for Kueue, Volcano
and Coscheduling, and the attempt's PodGroup. Keys and schemas as the schedulers publish them (sources
in finetune_operator.contract and tests/support/podgroups.py)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from finetune_operator import contract
from finetune_operator.builders import BuildContext, build_attempt, build_gang_group, build_rank_pod

from tests.support.factories import job
from tests.support.podgroups import validate_pod_group
from tests.support.versions import KUBERNETES_VERSIONS

CTX = BuildContext(default_image="registry.example/finetune-trainer:test")
KUEUE = {"spec.gang": {"scheduler": "Kueue", "queueName": "team-a-gpu"}, "spec.resources.nodes": 4}
VOLCANO = {
    "spec.gang": {"scheduler": "Volcano", "queueName": "research"},
    "spec.resources.nodes": 4,
    "spec.resources.gpusPerNode": 8,
    "spec.resources.cpu": "500m",
    "spec.resources.memory": "64Gi",
    "spec.resources.extendedResources": {"rdma/ib": 1},
}
COSCHEDULING = {
    "spec.gang": {"scheduler": "Coscheduling", "scheduleTimeoutSeconds": 300},
    "spec.resources.nodes": 2,
}


def _pod(changes: dict[str, Any], attempt: int = 1, rank: int = 0) -> dict[str, Any]:
    return build_rank_pod(job(changes), attempt, rank, CTX)


def _group(changes: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    group = build_gang_group(job(changes), attempt)
    assert group is not None
    return group


class TestKueue:
    def test_every_rank_pod_names_the_queue_and_the_attempts_group(self) -> None:
        for rank in range(4):
            labels = _pod(KUEUE, attempt=2, rank=rank)["metadata"]["labels"]
            assert labels[contract.KUEUE_QUEUE_LABEL] == "team-a-gpu"
            assert labels[contract.KUEUE_GROUP_LABEL] == "demo-a2"

    def test_every_rank_pod_tells_kueue_the_gangs_size(self) -> None:
        annotations = _pod(KUEUE, rank=3)["metadata"]["annotations"]
        assert annotations[contract.KUEUE_TOTAL_COUNT_ANNOTATION] == "4"

    def test_the_group_is_not_kept_waiting_for_replacement_ranks(self) -> None:
        """The operator replaces a failed gang with a new group; the old Workload must end (and free
        its quota) when a rank ends instead of waiting for a replacement pod."""
        assert _pod(KUEUE)["metadata"]["annotations"][contract.KUEUE_RETRIABLE_ANNOTATION] == "false"

    def test_every_rank_is_one_pod_set_whatever_its_rank_label(self) -> None:
        """Kueue names a pod's PodSet by its role-hash annotation when set (pod_controller.go
        getRoleHash), else by a hash of its shape, labels included in some versions."""
        roles = {
            _pod(KUEUE, rank=r)["metadata"]["annotations"][contract.KUEUE_ROLE_HASH_ANNOTATION]
            for r in range(4)
        }
        assert roles == {contract.KUEUE_ROLE}

    def test_each_attempt_is_its_own_group(self) -> None:
        first = _pod(KUEUE, attempt=1)["metadata"]["labels"][contract.KUEUE_GROUP_LABEL]
        second = _pod(KUEUE, attempt=2)["metadata"]["labels"][contract.KUEUE_GROUP_LABEL]
        assert first != second

    def test_kueue_needs_no_pod_group_object(self) -> None:
        assert build_gang_group(job(KUEUE), 1) is None

    def test_the_cluster_scheduler_is_kept_unless_one_is_named(self) -> None:
        assert "schedulerName" not in _pod(KUEUE)["spec"]
        named = {**KUEUE, "spec.resources.schedulerName": "gpu-binpack"}
        assert _pod(named)["spec"]["schedulerName"] == "gpu-binpack"

    @pytest.mark.parametrize(
        ("policy", "key"),
        [
            ("Required", contract.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION),
            ("Preferred", contract.KUEUE_PREFERRED_TOPOLOGY_ANNOTATION),
        ],
    )
    def test_a_topology_key_becomes_kueues_topology_request(self, policy: str, key: str) -> None:
        placement = {"topologyKey": "cloud.provider.com/topology-block", "topologyPolicy": policy}
        annotations = _pod({**KUEUE, "spec.placement": placement})["metadata"]["annotations"]
        assert annotations[key] == "cloud.provider.com/topology-block"
        others = {contract.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION, contract.KUEUE_PREFERRED_TOPOLOGY_ANNOTATION}
        assert not (others - {key}) & set(annotations)  # Kueue refuses more than one

    def test_a_topology_request_orders_the_ranks_by_their_node_rank(self) -> None:
        annotations = _pod({**KUEUE, "spec.placement": {"topologyKey": "rack"}})["metadata"]["annotations"]
        assert annotations[contract.KUEUE_POD_INDEX_LABEL_ANNOTATION] == contract.LABEL_RANK

    def test_no_topology_request_without_a_topology_key(self) -> None:
        annotations = _pod(KUEUE)["metadata"]["annotations"]
        assert contract.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION not in annotations
        assert contract.KUEUE_PREFERRED_TOPOLOGY_ANNOTATION not in annotations

    def test_the_users_annotations_stay_beside_kueues(self) -> None:
        extra = {"spec.resources.podMetadata": {"annotations": {"cost-center": "4711"}}}
        annotations = _pod({**KUEUE, **extra})["metadata"]["annotations"]
        assert annotations["cost-center"] == "4711" and contract.KUEUE_TOTAL_COUNT_ANNOTATION in annotations


class TestVolcano:
    def test_the_pods_are_bound_to_the_attempts_pod_group(self) -> None:
        pod = _pod(VOLCANO, attempt=3, rank=1)
        assert pod["metadata"]["annotations"][contract.VOLCANO_GROUP_ANNOTATION] == "demo-a3"
        assert _group(VOLCANO, attempt=3)["metadata"]["name"] == "demo-a3"

    def test_the_pods_go_to_the_volcano_scheduler(self) -> None:
        assert _pod(VOLCANO)["spec"]["schedulerName"] == "volcano"

    def test_a_named_scheduler_replaces_the_default(self) -> None:
        changes = {**VOLCANO, "spec.gang": {"scheduler": "Volcano", "schedulerName": "volcano-gpu"}}
        assert _pod(changes)["spec"]["schedulerName"] == "volcano-gpu"

    def test_the_group_asks_for_every_rank(self) -> None:
        assert _group(VOLCANO)["spec"]["minMember"] == 4

    def test_the_group_asks_for_every_ranks_resources(self) -> None:
        assert _group(VOLCANO)["spec"]["minResources"] == {
            "cpu": "2000m",
            "memory": "256Gi",
            "nvidia.com/gpu": "32",
            "rdma/ib": "4",
        }

    def test_the_group_goes_to_the_named_queue_with_the_pods_priority(self) -> None:
        spec = _group({**VOLCANO, "spec.resources.priorityClassName": "training"})["spec"]
        assert spec["queue"] == "research" and spec["priorityClassName"] == "training"

    def test_no_queue_named_leaves_volcanos_default(self) -> None:
        changes = {**VOLCANO, "spec.gang": {"scheduler": "Volcano"}}
        assert "queue" not in _group(changes)["spec"]

    def test_the_group_is_the_jobs_child_labelled_with_its_attempt(self) -> None:
        meta = _group(VOLCANO, attempt=2)["metadata"]
        assert meta["labels"][contract.LABEL_JOB] == "demo" and meta["labels"][contract.LABEL_ATTEMPT] == "2"
        assert meta["ownerReferences"][0]["kind"] == contract.KIND


class TestCoscheduling:
    def test_the_pods_carry_the_group_label(self) -> None:
        labels = _pod(COSCHEDULING, attempt=2)["metadata"]["labels"]
        assert labels[contract.COSCHEDULING_GROUP_LABEL] == "demo-a2"

    def test_the_pods_go_to_the_scheduler_plugins_scheduler(self) -> None:
        assert _pod(COSCHEDULING)["spec"]["schedulerName"] == "scheduler-plugins-scheduler"

    def test_the_group_carries_min_member_and_the_schedule_timeout(self) -> None:
        spec = _group(COSCHEDULING)["spec"]
        assert spec["minMember"] == 2 and spec["scheduleTimeoutSeconds"] == 300


def test_no_gang_no_gang_metadata() -> None:
    pod = _pod({})
    keys = set(pod["metadata"]["labels"]) | set(pod["metadata"].get("annotations", {}))
    assert not keys & (set(contract.OPERATOR_LABEL_KEYS[5:]) | set(contract.OPERATOR_ANNOTATION_KEYS))
    assert build_gang_group(job({}), 1) is None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("changes", [KUEUE, VOLCANO, COSCHEDULING], ids=["kueue", "volcano", "coscheduling"])
def test_every_object_passes_validation(version: str, changes: dict[str, Any]) -> None:
    """Built-in kinds through kubernetes-validate --strict; PodGroups (CRDs it does not know) through
    their own CRD schemas."""
    placement = {"spec.placement": {"topologyKey": "rack"}}
    for obj in build_attempt(job({**changes, **placement}), 1, CTX):
        if obj["kind"] == "PodGroup":
            validate_pod_group(obj)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_would_catch_a_misspelt_field() -> None:
    import jsonschema

    group = _group(VOLCANO)
    group["spec"]["minMembers"] = group["spec"].pop("minMember")
    with pytest.raises(jsonschema.ValidationError):
        validate_pod_group(group)
