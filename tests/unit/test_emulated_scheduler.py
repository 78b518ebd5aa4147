"""The emulated kube-scheduler (tests/support/scheduler.py) writes, from a pod's spec and the nodes,
the messages kube-scheduler writes (pkg/scheduler/framework/types.go FitError.Error and the filter
plugins' reasons), and the operator reads each as kube-scheduler's source means it
(policy/scheduling.py): the stand-in must not be kinder than the real scheduler."""

from __future__ import annotations

from typing import Any

from finetune_operator.policy.scheduling import Placement, placement

from tests.support.scheduler import EmulatedNode, Scheduler

KEY = ("team-a", "demo-a1-n0")


def _pod(gpus: int = 8, **spec: Any) -> dict[str, Any]:
    container = {"name": "trainer", "resources": {"requests": {"nvidia.com/gpu": str(gpus)}}}
    return {"metadata": {"name": KEY[1], "namespace": KEY[0]}, "spec": {"containers": [container], **spec}}


def _cluster(*nodes: EmulatedNode) -> Scheduler:
    return Scheduler(list(nodes) or [EmulatedNode("node-0"), EmulatedNode("node-1")])


def test_a_pod_that_fits_is_bound_and_its_gpus_are_taken() -> None:
    scheduler = _cluster()
    assert scheduler.place(KEY, _pod()).node == "node-0"
    assert scheduler.free("node-0") == 0


def test_no_gpu_free_is_insufficient_and_a_capacity_wait() -> None:
    scheduler = _cluster()
    scheduler.hold("node-0")
    scheduler.hold("node-1")
    message = scheduler.place(KEY, _pod()).message
    assert message == (
        "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available: "
        "2 No preemption victims found for incoming pod."
    )
    assert placement(message) is Placement.CAPACITY


def test_a_request_larger_than_any_node_can_never_schedule() -> None:
    message = _cluster().place(KEY, _pod(gpus=16)).message or ""
    assert "2 Insufficient nvidia.com/gpu" in message and "2 Preemption is not helpful" in message
    assert placement(message) is Placement.NEVER


def test_a_node_selector_no_node_has_is_the_node_affinity_message() -> None:
    message = _cluster().place(KEY, _pod(nodeSelector={"gpu.example.com/model": "h200"})).message or ""
    assert message.startswith("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.")
    assert placement(message) is Placement.NEVER


def test_an_untolerated_taint_is_the_taint_message_and_a_toleration_lifts_it() -> None:
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    scheduler = _cluster(EmulatedNode("node-0", taints=[taint]))
    message = scheduler.place(KEY, _pod()).message or ""
    assert "1 node(s) had untolerated taint(s)" in message and placement(message) is Placement.NEVER
    tolerated = _pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    assert scheduler.place(KEY, tolerated).node == "node-0"


def test_a_missing_claim_is_the_volume_binding_prefilter_message() -> None:
    volumes = [{"name": "data", "persistentVolumeClaim": {"claimName": "train-data"}}]
    message = _cluster().place(KEY, _pod(volumes=volumes)).message or ""
    assert message.startswith('0/2 nodes are available: persistentvolumeclaim "train-data" not found.')
    assert placement(message) is Placement.NEVER


def test_mixed_nodes_are_one_histogram_sorted_as_kube_scheduler_sorts_it() -> None:
    scheduler = _cluster(
        EmulatedNode("node-0"),
        EmulatedNode("node-1", labels={"pool": "cpu"}),
        EmulatedNode("node-2", cordoned=True),
    )
    scheduler.hold("node-0")
    message = scheduler.place(KEY, _pod(nodeSelector={"pool": "gpu"})).message or ""
    # node-0 lacks the label too: NodeAffinity runs before NodeResourcesFit
    assert message.startswith(
        "0/3 nodes are available: 1 node(s) were unschedulable, "
        "2 node(s) didn't match Pod's node affinity/selector."
    )
    assert placement(message) is Placement.NEVER


def test_freed_gpus_go_to_other_work_while_backfill_is_on() -> None:
    scheduler = _cluster()
    scheduler.place(KEY, _pod())
    scheduler.backfill = True
    scheduler.unbind(KEY)
    assert scheduler.free("node-0") == 0
    scheduler.release_tenants()
    assert scheduler.free("node-0") == 8
