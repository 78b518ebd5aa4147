"""Every row of the failure-class table: what one rank pod's state means for the gang."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.policy.backoff import backoff_seconds, jitter_fraction
from finetune_operator.policy.failures import Outcome, Verdict, classify, gang_verdict
from finetune_operator.policy.observed import observe_pod

from tests.support.pods import (
    NO_GPU_FREE,
    NO_NODE_MATCHES,
    after,
    container,
    disrupted,
    pod,
    running_state,
    terminated_state,
    unschedulable,
    waiting_state,
)

STARTUP = 600
R, INFRA, FAIL = Outcome.RESTART, Outcome.INFRA_RESTART, Outcome.FAIL


def _verdict(raw: dict[str, Any], seconds: float = 30) -> Verdict:
    return classify(observe_pod(raw), now=after(seconds), startup_timeout_seconds=STARTUP)


@pytest.mark.parametrize(
    ("raw", "outcome", "reason"),
    [
        (pod(phase="Succeeded", exit_code=0, terminated_reason="Completed"), Outcome.SUCCEEDED, "Completed"),
        (pod(phase="Failed", exit_code=2, message="invalid trainer config"), FAIL, "InvalidConfig"),
        (
            pod(phase="Failed", exit_code=3, message="dataset s3://d/x.jsonl: not found"),
            FAIL,
            "InputNotFound",
        ),
        (
            pod(
                phase="Failed", exit_code=4, message="out of memory at step 12 (micro batch 8 x 4096 tokens)"
            ),
            FAIL,
            "OutOfMemory",
        ),
        (
            pod(phase="Failed", exit_code=77, message="storage refused: list on s3://b: AccessDenied"),
            FAIL,
            "StorageRefused",
        ),
        (pod(phase="Failed", exit_code=75, message="storage unavailable"), R, "Transient"),
        (pod(phase="Failed", exit_code=1, message="ValueError at step 12: boom"), R, "RankFailed"),
        (pod(phase="Failed", exit_code=137), R, "RankFailed"),
        (pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), R, "OOMKilled"),
        (pod(phase="Failed", exit_code=143, message="terminated: emergency checkpoint"), INFRA, "Terminated"),
        (pod(phase="Failed", reason="Evicted"), INFRA, "Evicted"),
        (pod(phase="Failed", reason="NodeLost"), INFRA, "NodeLost"),
        (pod(phase="Unknown"), INFRA, "NodeLost"),
        (pod(phase="Failed", reason="OutOfnvidia.com/gpu"), INFRA, "OutOfnvidia.com/gpu"),
        (disrupted("PreemptionByScheduler", phase="Failed", exit_code=143), INFRA, "Preempted"),
        (disrupted("DeletionByTaintManager", phase="Running"), INFRA, "NodeLost"),
        (disrupted("EvictionByEvictionAPI", phase="Failed", exit_code=1), INFRA, "Evicted"),
        (disrupted("TerminationByKubelet", phase="Failed", exit_code=137), INFRA, "Evicted"),
        (pod(deleting=True), INFRA, "PodDeleted"),
        (pod(phase="Running"), Outcome.RUNNING, "Running"),
        (pod(phase="Pending"), Outcome.PENDING, "Pending"),
    ],
)
def test_a_rank_pod_is_classified(raw: dict[str, Any], outcome: Outcome, reason: str) -> None:
    verdict = _verdict(raw)
    assert (verdict.outcome, verdict.reason) == (outcome, reason)


@pytest.mark.parametrize(
    "waiting",
    [
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    ],
)
def test_cluster_configuration_errors_wait_for_the_startup_deadline_then_fail(waiting: str) -> None:
    raw = pod(phase="Pending", waiting=(waiting, 'secret "s3-creds" not found'))
    assert _verdict(raw, STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, waiting) and "s3-creds" in late.message


def test_a_rank_no_node_can_take_fails_only_past_the_startup_deadline() -> None:
    assert _verdict(unschedulable(NO_NODE_MATCHES), STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(unschedulable(NO_NODE_MATCHES), STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, "Unschedulable")
    assert "cannot be scheduled as the cluster is" in late.message
    assert "didn't match Pod's node affinity/selector" in late.message


def test_a_message_not_kube_schedulers_fails_past_the_startup_deadline_as_before() -> None:
    """Volcano's own message (its gang plugin): not read as capacity."""
    raw = unschedulable("pod group is not ready, 2 Pending, 2 minAvailable")
    assert _verdict(raw, STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, "Unschedulable") and "pod group is not ready" in late.message


def test_a_rank_waiting_for_capacity_waits_past_the_startup_deadline() -> None:
    """kube-scheduler: "Insufficient nvidia.com/gpu" (noderesources/fit.go) on every node."""
    waiting = _verdict(unschedulable(NO_GPU_FREE), STARTUP * 10)
    assert (waiting.outcome, waiting.reason) == (Outcome.PENDING, "WaitingForCapacity")
    assert "waits for capacity: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in waiting.message


def test_a_rank_waiting_for_capacity_fails_past_the_scheduling_timeout_when_one_is_set() -> None:
    raw = observe_pod(unschedulable(NO_GPU_FREE))
    waiting = classify(raw, now=after(1799), startup_timeout_seconds=STARTUP, scheduling_timeout_seconds=1800)
    late = classify(raw, now=after(1801), startup_timeout_seconds=STARTUP, scheduling_timeout_seconds=1800)
    assert waiting.outcome is Outcome.PENDING
    assert (late.outcome, late.reason) == (FAIL, "SchedulingTimeout")
    assert "schedulingTimeoutSeconds 1800" in late.message and "Insufficient nvidia.com/gpu" in late.message


def test_a_rank_whose_preemption_is_under_way_waits_for_it() -> None:
    """kube-scheduler nominates a node (status.nominatedNodeName) while the victims terminate."""
    raw = unschedulable(NO_NODE_MATCHES, nominated="gpu-node-3")
    verdict = _verdict(raw, STARTUP * 10)
    assert (verdict.outcome, verdict.reason) == (Outcome.PENDING, "WaitingForCapacity")
    assert "preempting on gpu-node-3" in verdict.message


def test_the_startup_clock_of_a_rank_that_waited_for_capacity_starts_when_it_got_its_node() -> None:
    """PodScheduled=True's lastTransitionTime is the binding (the API server's pods/binding)."""
    bound = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T14:00:00Z"}
    raw = pod(phase="Pending", conditions=[bound], scheduled=True)  # created 12:00, ContainerCreating
    assert _verdict(raw, 7200 + STARTUP - 1).outcome is Outcome.PENDING
    assert _verdict(raw, 7200 + STARTUP + 1).reason == "StartupTimeout"


def test_the_termination_message_reaches_the_verdict() -> None:
    verdict = _verdict(pod(phase="Failed", exit_code=1, message="out of memory at step 1200"))
    assert verdict.message == "rank 0 (demo-a1-n0) exited 1: out of memory at step 1200"


# Pod shapes as real clusters write them, each with where it comes from.
NODE_PRESSURE = "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 9Gi. "
OWN_STORAGE = "Pod ephemeral local storage usage exceeds the total limit of containers 20Gi. "
SHUTDOWN = "Pod was terminated in response to imminent node shutdown."
MESH_INIT = [{"name": "istio-init"}]
NATIVE_SIDECAR = [{"name": "istio-proxy", "restartPolicy": "Always"}]
REAL_SHAPES = [
    pytest.param(
        # pkg/kubelet/eviction/helpers.go podEphemeralStorageMessageFmt: the pod's own limit, the
        # job's doing; it repeats every attempt, so it counts.
        pod(
            phase="Failed",
            reason="Evicted",
            exit_code=137,
            pod_message=OWN_STORAGE,
            conditions=[
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": OWN_STORAGE,
                }
            ],
        ),
        R,
        "EvictedOverLimit",
        id="eviction-over-the-pods-own-storage-limit-counts",
    ),
    pytest.param(
        # pkg/kubelet/eviction/helpers.go containerEphemeralStorageMessageFmt
        pod(
            phase="Failed",
            reason="Evicted",
            pod_message='Container trainer exceeded its local ephemeral storage limit "100Gi". ',
        ),
        R,
        "EvictedOverLimit",
        id="eviction-over-a-containers-storage-limit-counts",
    ),
    pytest.param(
        # pkg/kubelet/eviction/helpers.go emptyDirMessageFmt (a /dev/shm sizeLimit)
        pod(
            phase="Failed",
            reason="Evicted",
            pod_message='Usage of EmptyDir volume "dshm" exceeds the limit "64Gi". ',
        ),
        R,
        "EvictedOverLimit",
        id="eviction-over-an-emptydir-size-limit-counts",
    ),
    pytest.param(
        # pkg/kubelet/eviction/helpers.go nodeLowMessageFmt + eviction_manager.go's DisruptionTarget
        disrupted(
            "TerminationByKubelet",
            NODE_PRESSURE,
            phase="Failed",
            reason="Evicted",
            pod_message=NODE_PRESSURE,
            exit_code=137,
        ),
        INFRA,
        "Evicted",
        id="node-pressure-eviction-is-not-counted",
    ),
    pytest.param(
        # pkg/kubelet/nodeshutdown/nodeshutdown_manager_linux.go: Failed, reason Terminated, the
        # shutdown message, DisruptionTarget TerminationByKubelet; the trainer got SIGTERM.
        disrupted(
            "TerminationByKubelet",
            SHUTDOWN,
            phase="Failed",
            reason="Terminated",
            pod_message=SHUTDOWN,
            exit_code=143,
        ),
        INFRA,
        "NodeShutdown",
        id="graceful-node-shutdown-is-not-counted",
    ),
    pytest.param(
        # The same manager keeps a pod that had already succeeded in phase Succeeded ("unless it was
        # already in a successful terminal phase") but still stamps reason and condition on it.
        disrupted(
            "TerminationByKubelet",
            SHUTDOWN,
            phase="Succeeded",
            reason="Terminated",
            pod_message=SHUTDOWN,
            exit_code=0,
        ),
        Outcome.SUCCEEDED,
        "Completed",
        id="rank-finished-before-its-node-shut-down-is-finished",
    ),
    pytest.param(
        # kubernetes/kubernetes#140716: a drained pod reported OOMKilled with exit 143. The kernel's
        # OOM killer sends SIGKILL (137), so this was the drain's SIGTERM.
        pod(phase="Failed", exit_code=143, terminated_reason="OOMKilled"),
        INFRA,
        "Terminated",
        id="oomkilled-label-on-a-sigterm-exit-is-not-an-oom",
    ),
    pytest.param(
        # kubernetes/kubernetes#131530: OOMKilled with exit code 0 and phase Succeeded.
        pod(phase="Succeeded", exit_code=0, terminated_reason="OOMKilled"),
        Outcome.SUCCEEDED,
        "Completed",
        id="oomkilled-label-on-exit-0-is-a-finished-rank",
    ),
    pytest.param(
        # A pod being deleted (by someone else) whose trainer outlived its grace period: SIGKILL 137,
        # and the runtime's cumulative OOM counter may still label it OOMKilled (#140716).
        pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled", deleting=True),
        INFRA,
        "PodDeleted",
        id="oomkilled-while-being-deleted-is-the-deletion",
    ),
    pytest.param(
        # A classic sidecar (a second regular container) killed with 143 after the trainer finished:
        # the kubelet computes phase Failed (pkg/kubelet/kubelet_pods.go getPhase, restartPolicy Never).
        pod(
            phase="Failed",
            exit_code=0,
            sidecars=[container("istio-proxy", terminated_state(143, "Error", at=65))],
        ),
        Outcome.SUCCEEDED,
        "Completed",
        id="classic-sidecar-143-after-trainer-exit-0-is-finished",
    ),
    pytest.param(
        # A native sidecar (KEP-753: an init container with restartPolicy Always) is stopped after the
        # trainer; its exit does not enter the phase, but its status still shows it.
        pod(
            phase="Succeeded",
            exit_code=0,
            init_specs=NATIVE_SIDECAR,
            init_statuses=[container("istio-proxy", terminated_state(143, "Error", at=65))],
        ),
        Outcome.SUCCEEDED,
        "Completed",
        id="native-sidecar-143-after-trainer-exit-0-is-finished",
    ),
    pytest.param(
        # A failed init container with restartPolicy Never: phase Failed, the trainer never ran and
        # waits in PodInitializing (pkg/kubelet/kubelet_pods.go).
        pod(
            phase="Failed",
            waiting=("PodInitializing", ""),
            init_specs=MESH_INIT,
            init_statuses=[
                container("istio-init", terminated_state(1, "Error", "iptables: permission denied"))
            ],
        ),
        R,
        "InitContainerFailed",
        id="failed-init-container-counts",
    ),
    pytest.param(
        # Node lifecycle: phase stays Running, MarkPodsNotReady flips Ready to False
        # (pkg/controller/util/node/controller_utils.go); the trainer looks running.
        pod(phase="Running", ready=False),
        Outcome.RUNNING,
        "Running",
        id="a-not-ready-pod-on-a-lost-node-still-looks-running",
    ),
    pytest.param(
        # Taint eviction after tolerationSeconds: DisruptionTarget then a graceful delete
        # (pkg/controller/tainteviction/taint_eviction.go); the kubelet is gone, so it stays Running.
        disrupted(
            "DeletionByTaintManager",
            "Taint manager: deleting due to NoExecute taint",
            phase="Running",
            ready=False,
            deleting=True,
        ),
        INFRA,
        "NodeLost",
        id="taint-eviction-of-a-lost-nodes-pod",
    ),
    pytest.param(
        # Pod GC of a pod bound to a deleted node: phase Failed, DisruptionTarget DeletionByPodGC
        # "PodGC: node no longer exists" (pkg/controller/podgc/gc_controller.go).
        disrupted("DeletionByPodGC", "PodGC: node no longer exists", phase="Failed", ready=False),
        INFRA,
        "NodeLost",
        id="pod-gc-of-a-deleted-nodes-pod",
    ),
    pytest.param(
        # Node admission refusal (pkg/kubelet/lifecycle/predicate.go): Failed, reason OutOf<resource>.
        pod(
            phase="Failed",
            reason="OutOfnvidia.com/gpu",
            waiting=("ContainerCreating", ""),
            pod_message="Pod was rejected: Node didn't have enough resource: nvidia.com/gpu",
        ),
        INFRA,
        "OutOfnvidia.com/gpu",
        id="node-admission-rejection-is-not-counted",
    ),
    pytest.param(
        # A native sidecar running while the trainer still waits: phase Running, the trainer is not.
        pod(
            phase="Running",
            waiting=("ContainerCreating", ""),
            init_specs=NATIVE_SIDECAR,
            init_statuses=[container("istio-proxy", running_state())],
        ),
        Outcome.PENDING,
        "StartupTimeout",
        id="a-running-sidecar-is-not-a-running-rank",
    ),
]


@pytest.mark.parametrize(("raw", "outcome", "reason"), REAL_SHAPES)
def test_pod_states_as_real_clusters_write_them(raw: dict[str, Any], outcome: Outcome, reason: str) -> None:
    verdict = _verdict(raw)
    assert (verdict.outcome, verdict.reason) == (outcome, reason), verdict.message


def test_the_kubelets_eviction_message_reaches_the_verdict() -> None:
    raw = disrupted(
        "TerminationByKubelet", NODE_PRESSURE, phase="Failed", reason="Evicted", pod_message=NODE_PRESSURE
    )
    assert "The node was low on resource: ephemeral-storage" in _verdict(raw).message


def test_a_failed_init_containers_name_exit_and_message_reach_the_verdict() -> None:
    raw = pod(
        phase="Failed",
        waiting=("PodInitializing", ""),
        init_specs=MESH_INIT,
        init_statuses=[container("istio-init", terminated_state(1, "Error", "iptables: permission denied"))],
    )
    assert _verdict(raw).message == (
        "rank 0 (demo-a1-n0): init container istio-init exited 1: iptables: permission denied"
    )


# Waiting reasons the kubelet does not get past by itself (pkg/kubelet/images/types.go,
# pkg/kubelet/container/sync_result.go). ErrImageNeverPull is what imagePullPolicy Never gives on a
# node without the image.
NON_RECOVERING = [
    "ErrImageNeverPull",
    "ImageInspectError",
    "RegistryUnavailable",
    "CreatePodSandboxError",
    "RunContainerError",
]


@pytest.mark.parametrize("waiting", NON_RECOVERING)
def test_every_non_recovering_wait_fails_past_the_startup_deadline_with_its_reason(waiting: str) -> None:
    raw = pod(phase="Pending", waiting=(waiting, "kubelet says why"))
    assert _verdict(raw, STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, waiting) and "kubelet says why" in late.message


def test_an_init_containers_image_pull_error_blocks_the_rank_with_its_reason() -> None:
    raw = pod(
        phase="Pending",
        waiting=("PodInitializing", ""),
        init_specs=MESH_INIT,
        init_statuses=[container("istio-init", waiting_state("ImagePullBackOff", "back-off pulling"))],
    )
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, "ImagePullBackOff") and "istio-init" in late.message


@pytest.mark.parametrize("transient", ["ContainerCreating", "PodInitializing"])
def test_a_scheduled_pod_that_never_starts_waits_then_fails_as_a_startup_timeout(transient: str) -> None:
    """A volume that never mounts shows only ContainerCreating (the kubelet's default waiting reason)."""
    raw = pod(phase="Pending", waiting=(transient, ""))
    assert _verdict(raw, STARTUP - 1).outcome is Outcome.PENDING
    late = _verdict(raw, STARTUP + 1)
    assert (late.outcome, late.reason) == (FAIL, "StartupTimeout") and transient in late.message


def _v(outcome: Outcome, reason: str) -> Verdict:
    return Verdict(outcome, reason)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([_v(Outcome.SUCCEEDED, "Completed")] * 3, "Completed"),
        ([_v(Outcome.SUCCEEDED, "Completed"), _v(Outcome.RUNNING, "Running")], "Running"),
        ([_v(R, "Transient"), _v(R, "RankFailed")], "RankFailed"),  # the survivors of a crash
        ([_v(R, "Transient"), _v(INFRA, "NodeLost")], "NodeLost"),  # the survivors of a lost node
        ([_v(INFRA, "Evicted"), _v(FAIL, "InvalidConfig")], "InvalidConfig"),
        ([_v(R, "Transient"), _v(R, "Transient")], "Transient"),
        ([], "Pending"),
    ],
)
def test_the_gang_takes_its_most_telling_verdict(verdicts: list[Verdict], expected: str) -> None:
    assert gang_verdict(verdicts).reason == expected


@pytest.mark.parametrize(("restarts", "ceiling"), [(0, 10), (1, 20), (3, 80), (5, 300), (30, 300)])
def test_backoff_doubles_per_counted_restart_up_to_the_cap(restarts: int, ceiling: float) -> None:
    delay = backoff_seconds(restarts=restarts, base=10, cap=300, uid="u", attempt=restarts + 1)
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_jitter_is_the_same_for_the_same_attempt_and_spread_across_jobs() -> None:
    assert jitter_fraction("job-a", 3) == jitter_fraction("job-a", 3)
    spread = {round(jitter_fraction(f"job-{i}", 1), 3) for i in range(20)}
    assert len(spread) > 15
