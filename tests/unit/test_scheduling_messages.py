"""kube-scheduler's Unschedulable messages, as it writes them, and what each means for a rank pod:
wait for capacity, or never schedulable as the cluster is (policy/scheduling.py).

The formats come from kube-scheduler's source: pkg/scheduler/framework/types.go FitError.Error()
("0/N nodes are available: " + the PreFilter message, or the sorted "count reason" histogram joined
with ", ", then "." and the PostFilter message), defaultpreemption's PostFilter ("preemption: " + the
evaluator's FitError, pkg/scheduler/framework/preemption/preemption.go), and the plugins' reasons:
noderesources/fit.go ("Insufficient %v", "Too many pods"), nodeaffinity ErrReasonPod,
tainttoleration (by release: "had taint {k: v}, that the pod didn't tolerate", "had untolerated
taint {k: v}", "had untolerated taint(s)"), nodeunschedulable, volumebinding (PreFilter: the PVC
lister's NotFound, "pod has unbound immediate PersistentVolumeClaims"). Messages with a preemption
suffix are the ones clusters print (kubectl describe pod), copied as they are.
"""

from __future__ import annotations

import pytest
from finetune_operator.policy.scheduling import Placement, parse, placement

CAPACITY, NEVER, UNKNOWN = Placement.CAPACITY, Placement.NEVER, Placement.UNKNOWN

MESSAGES = [
    # one reason, every node
    ("0/4 nodes are available: 4 Insufficient nvidia.com/gpu.", CAPACITY),
    (
        "0/3 nodes are available: 3 Insufficient cpu. preemption: 0/3 nodes are available: "
        "3 No preemption victims found for incoming pod..",
        CAPACITY,
    ),
    (
        "0/2 nodes are available: 2 Too many pods. preemption: 0/2 nodes are available: "
        "2 No preemption victims found for incoming pod.",
        CAPACITY,
    ),
    (
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. preemption: "
        "0/3 nodes are available: 3 Preemption is not helpful for scheduling.",
        NEVER,
    ),
    (
        "0/2 nodes are available: 2 node(s) had untolerated taint {CriticalAddonsOnly: true}. preemption: "
        "0/2 nodes are available: 2 Preemption is not helpful for scheduling.",
        NEVER,
    ),
    ("0/1 nodes are available: 1 node(s) had taint {dedicated: gpu}, that the pod didn't tolerate.", NEVER),
    ("0/4 nodes are available: 4 node(s) were unschedulable.", NEVER),
    ("0/2 nodes are available: 2 node(s) had taints that the pod didn't tolerate.", NEVER),
    # aggregated: one node short of GPUs is enough to wait
    (
        "0/5 nodes are available: 2 Insufficient nvidia.com/gpu, 3 node(s) didn't match Pod's node "
        "affinity/selector. preemption: 0/5 nodes are available: 2 No preemption victims found for "
        "incoming pod, 3 Preemption is not helpful for scheduling.",
        CAPACITY,
    ),
    (
        "0/3 nodes are available: 1 Insufficient example.com/gpu, 1 node(s) didn't match Pod's node "
        "affinity/selector, 1 node(s) had untolerated taint(s). preemption: 0/3 nodes are available: "
        "1 No preemption victims found for incoming pod, 2 Preemption is not helpful for scheduling.",
        CAPACITY,
    ),
    (
        "0/2 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
        "1 node(s) had untolerated taint {node: node01}. preemption: 0/2 nodes are available: "
        "2 Preemption is not helpful for scheduling.",
        NEVER,
    ),
    # a DRA PostFilter message before preemption's
    (
        "0/1 nodes are available: 1 node(s) had untolerated taint(s). no new claims to deallocate, "
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.",
        NEVER,
    ),
    # a request larger than any node's allocatable: fit.go marks it Unresolvable, so preemption is
    # "not helpful" on every node, though the reason reads Insufficient
    (
        "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available: "
        "2 Preemption is not helpful for scheduling.",
        NEVER,
    ),
    # PreFilter rejections: the message instead of a histogram
    (
        '0/3 nodes are available: persistentvolumeclaim "rc-definitely-missing-pvc" not found. preemption: '
        "0/3 nodes are available: 3 No preemption victims found for incoming pod..",
        NEVER,
    ),
    ("0/4 nodes are available: pod has unbound immediate PersistentVolumeClaims.", NEVER),
    # no nodes at all (schedule_one.go ErrNoNodesAvailable): an autoscaler at zero
    ("no nodes available to schedule pods", CAPACITY),
    # asynchronous preemption running for the pod (defaultpreemption PreEnqueue)
    ("waiting for the preemption for this pod to be finished", CAPACITY),
    # not kube-scheduler's, or reasons this module does not know: as before (startup deadline)
    ("pod group is not ready, 2 Pending, 2 minAvailable", UNKNOWN),
    (
        "0/3 nodes are available: 1 node(s) had untolerated taint(s), 2 node(s) didn't match pod "
        "anti-affinity rules. preemption: 0/3 nodes are available: 1 Preemption is not helpful for "
        "scheduling, 2 No preemption victims found for incoming pod.",
        UNKNOWN,
    ),
    ("unschedulable", UNKNOWN),
]


@pytest.mark.parametrize(("message", "expected"), MESSAGES, ids=[m[:60] for m, _ in MESSAGES])
def test_a_scheduler_message_means_capacity_or_never_or_unknown(message: str, expected: Placement) -> None:
    assert placement(message) is expected


def test_a_nominated_node_is_preemption_under_way_whatever_the_message() -> None:
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    assert placement(message, nominated=True) is CAPACITY


def test_the_histogram_keeps_resource_names_and_taint_keys_with_their_dots() -> None:
    parsed = parse(
        "0/5 nodes are available: 2 Insufficient nvidia.com/gpu, 3 node(s) had untolerated taint "
        "{nvidia.com/gpu: present}. preemption: 0/5 nodes are available: 5 Preemption is not helpful "
        "for scheduling."
    )
    assert parsed is not None and parsed.nodes == 5
    assert parsed.reasons == (
        (2, "Insufficient nvidia.com/gpu"),
        (3, "node(s) had untolerated taint {nvidia.com/gpu: present}"),
    )
    assert parsed.preemption == ((5, "Preemption is not helpful for scheduling"),)


def test_a_prefilter_message_counts_for_every_node() -> None:
    parsed = parse('0/3 nodes are available: persistentvolumeclaim "data" not found.')
    assert parsed is not None and parsed.prefiltered
    assert parsed.reasons == ((3, 'persistentvolumeclaim "data" not found'),)
