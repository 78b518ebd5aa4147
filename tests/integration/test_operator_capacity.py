"""The real operator against a full cluster: rank pods Pending because kube-scheduler finds no GPU
free wait, on every attempt, however long past startupTimeoutSeconds, showing what they wait for,
and run once capacity appears; pods no node can ever take (a node selector no node matches) fail
after startupTimeoutSeconds; runPolicy.schedulingTimeoutSeconds bounds a capacity wait when set.
The emulated kube-scheduler (tests/support/scheduler.py) writes its messages from the pods' spec."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.cluster import PODS
from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import OperatorEnv, operator_env
from tests.support.scheduler import EmulatedNode, Scheduler

NS = "team-a"
STARTUP = 600
FULL = (
    "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available: "
    "2 No preemption victims found for incoming pod."
)


def job(**changes: Any) -> dict[str, Any]:
    return manifest(
        {
            "spec.resources.nodes": 2,
            "spec.resources.gpusPerNode": 8,
            "spec.runPolicy.startupTimeoutSeconds": STARTUP,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
            **changes,
        },
        name="demo",
        namespace=NS,
    )


def cluster(**labels: str) -> Scheduler:
    """Two 8-GPU nodes."""
    return Scheduler([EmulatedNode(f"node-{i}", gpus=8, labels=dict(labels)) for i in range(2)])


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


async def _a_pass_after(k8s: OperatorEnv, jump: float) -> None:
    """Jump the clock and wait until the pass its timer starts has finished: a pod change then wakes
    the job again, and passes of one job never overlap, so a second pass beginning means the timer's
    pass has ended (as in test_operator_gangs.py)."""
    await k8s.timed_only(NS, "demo")
    k8s.clock.jump(jump)
    await _next_pass(k8s)
    name = k8s.pods("demo")[0]["metadata"]["name"]
    await k8s.cluster.write(PODS, NS, name, {"metadata": {"annotations": {"test.example/poke": "1"}}})
    await _next_pass(k8s)


async def _next_pass(k8s: OperatorEnv) -> None:
    seen = len(k8s.cluster.calls)
    await k8s.eventually(
        lambda: any(
            c.resource == "pods" and c.verb == "list" and c.from_operator for c in k8s.cluster.calls[seen:]
        ),
        what="an operator pass",
    )


async def _waiting(k8s: OperatorEnv, attempt: int) -> dict[str, Any]:
    return await k8s.eventually(  # type: ignore[no-any-return]
        lambda: (
            (s := k8s.status(NS, "demo")).get("attempt") == attempt
            and condition(s, "WaitingForCapacity").get("status") == "True"
            and s
        ),
        what=f"attempt {attempt} waiting for capacity",
    )


@pytest.mark.asyncio
async def test_a_restarted_attempt_waits_for_capacity_past_the_startup_timeout_then_runs() -> None:
    """Attempt 1 fails (counted); while its pods go, other queued work takes their GPUs."""
    async with operator_env(script(Rank(exit_code=None), a1=Rank(exit_code=1, message="boom"))) as k8s:
        k8s.kubelet.scheduler = scheduler = cluster()
        scheduler.backfill = True
        await k8s.start_operator()
        await k8s.apply(job())
        status = await _waiting(k8s, attempt=2)
        assert status["phase"] == "Starting" and status["restarts"] == 1
        waiting = condition(status, "WaitingForCapacity")
        assert FULL in waiting["message"] and waiting["lastTransitionTime"]
        await _a_pass_after(k8s, STARTUP * 3)
        status = k8s.status(NS, "demo")
        assert status["phase"] == "Starting" and not condition(status, "Failed"), status
        assert condition(status, "WaitingForCapacity")["lastTransitionTime"] == waiting["lastTransitionTime"]
        scheduler.release_tenants()
        running = await k8s.phase(NS, "demo", "Running")
        assert condition(running, "WaitingForCapacity")["status"] == "False"
        assert running["goodput"]["applicationRestartSeconds"] >= STARTUP * 3  # the restart's cost
        await k8s.eventually(lambda: "WaitingForCapacity" in k8s.events("demo"), what="the wait's event")


@pytest.mark.asyncio
async def test_the_first_attempt_waits_for_capacity_as_queueing_time() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.kubelet.scheduler = scheduler = cluster()
        scheduler.hold("node-0")
        scheduler.hold("node-1")
        await k8s.start_operator()
        await k8s.apply(job())
        status = await _waiting(k8s, attempt=1)
        assert status["phase"] == "Starting" and FULL in condition(status, "WaitingForCapacity")["message"]
        await _a_pass_after(k8s, STARTUP + 1)
        assert k8s.status(NS, "demo")["phase"] == "Starting"
        scheduler.release_tenants()
        running = await k8s.phase(NS, "demo", "Running")
        assert running["goodput"]["queuedSeconds"] >= STARTUP


@pytest.mark.asyncio
async def test_a_node_selector_no_node_matches_fails_after_the_startup_timeout() -> None:
    selector = {"spec.resources.nodeSelector": {"gpu.example.com/model": "h200"}}
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.kubelet.scheduler = cluster(**{"gpu.example.com/model": "a100"})
        await k8s.start_operator()
        await k8s.apply(job(**selector))
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("ranks", {}).get("pending") == 2)
        assert k8s.status(NS, "demo")["phase"] == "Starting"
        assert not condition(k8s.status(NS, "demo"), "WaitingForCapacity")
        await k8s.timed_only(NS, "demo")
        k8s.clock.jump(STARTUP + 1)
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert failed["reason"] == "Unschedulable"
        assert "2 node(s) didn't match Pod's node affinity/selector" in failed["message"]
        assert "cannot be scheduled as the cluster is" in failed["message"]


@pytest.mark.asyncio
async def test_a_capacity_wait_fails_at_the_scheduling_timeout_when_one_is_set() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.kubelet.scheduler = scheduler = cluster()
        scheduler.hold("node-0")
        scheduler.hold("node-1")
        await k8s.start_operator()
        await k8s.apply(job(**{"spec.runPolicy.schedulingTimeoutSeconds": 1800}))
        await _waiting(k8s, attempt=1)
        await k8s.timed_only(NS, "demo")
        k8s.clock.jump(1801)
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert failed["reason"] == "SchedulingTimeout"
        assert (
            "schedulingTimeoutSeconds 1800" in failed["message"]
            and "Insufficient nvidia.com/gpu" in failed["message"]
        )
        assert condition(status, "WaitingForCapacity")["status"] == "False"


@pytest.mark.asyncio
async def test_a_rank_scripted_pending_on_a_missing_claim_fails_after_the_startup_timeout() -> None:
    """The volume binding PreFilter's message for a claim that does not exist, as clusters print it."""
    missing = (
        '0/2 nodes are available: persistentvolumeclaim "train-data" not found. preemption: 0/2 nodes are '
        "available: 2 No preemption victims found for incoming pod."
    )
    async with operator_env(script(Rank(exit_code=None), a1n1=Rank(unschedulable=missing))) as k8s:
        await k8s.start_operator()
        await k8s.apply(job())
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("ranks", {}).get("pending") == 1)
        await k8s.timed_only(NS, "demo")
        k8s.clock.jump(STARTUP + 1)
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert (
            failed["reason"] == "Unschedulable"
            and 'persistentvolumeclaim "train-data" not found' in failed["message"]
        )
