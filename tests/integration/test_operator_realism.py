"""The real operator against what real clusters do to rank pods: a node lost as the node lifecycle,
taint eviction and pod GC controllers show it (tests/support/nodes.py), init containers and sidecars
(tests/support/kubelet.py)."""

from __future__ import annotations

import pytest
from finetune_operator.api.status import Progress
from finetune_operator.progress import ProgressReport, format_line

from tests.support.cluster import CONFIGMAPS
from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.nodes import NODE_MONITOR_GRACE_PERIOD, TOLERATION_SECONDS
from tests.support.operator import running

NS = "team-a"
FAST = {
    "spec.resources.nodes": 2,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 2,
    "spec.runPolicy.maxRestarts": 0,
}
GRACE = 120  # runPolicy.terminationGracePeriodSeconds' default


def job(**changes: object) -> dict:
    return manifest({**FAST, **changes}, name="demo", namespace=NS)


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


@pytest.mark.asyncio
async def test_a_lost_node_whose_surviving_rank_fails_first_is_one_uncounted_restart() -> None:
    behaviour = script(
        a1n1=Rank(node_lost=True, after=0.2),
        a1n0=Rank(
            exit_code=134, after=0.5, message="NCCL error: remote process exited or there was a network error"
        ),
    )
    async with running(behaviour, job()) as k8s:
        await k8s.eventually(
            lambda: k8s.status(NS, "demo").get("ranks", {}).get("failed") == 1, what="n0 failed"
        )
        assert k8s.status(NS, "demo")["phase"] == "Running"  # settling: n1 still looks running
        k8s.clock.jump(NODE_MONITOR_GRACE_PERIOD + 1)  # the node lifecycle marks n1 NotReady
        status = await k8s.phase(NS, "demo", "Restarting")
        assert (status["restarts"], status["infraRestarts"]) == (0, 1)
        assert condition(status, "Restarting")["reason"] == "NodeLost"
        await k8s.eventually(
            lambda: [p["metadata"].get("deletionTimestamp") is not None for p in k8s.pods("demo")] == [True],
            what="n1 alone, left Terminating",
        )
        k8s.clock.jump(GRACE + 61)  # n1 stays Terminating (no kubelet): force-deleted
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (2, 0, 1)


@pytest.mark.asyncio
async def test_a_lost_node_alone_restarts_the_gang_at_taint_eviction_and_force_deletes_its_pod() -> None:
    async with running(script(a1n1=Rank(node_lost=True), a1n0=Rank(exit_code=None)), job()) as k8s:
        await k8s.phase(NS, "demo", "Running")
        await k8s.eventually(lambda: k8s.kubelet.nodes.lost, what="n1's node silent")
        k8s.clock.jump(NODE_MONITOR_GRACE_PERIOD + 1)
        await k8s.eventually(
            lambda: any(
                c["type"] == "Ready" and c["status"] == "False"
                for p in k8s.pods("demo")
                for c in p["status"].get("conditions", [])
            ),
            what="n1 NotReady",
        )
        assert k8s.status(NS, "demo")["phase"] == "Running"  # NotReady alone is not a verdict
        k8s.clock.jump(TOLERATION_SECONDS)
        status = await k8s.phase(NS, "demo", "Restarting")
        assert (status["restarts"], status["infraRestarts"]) == (0, 1)
        k8s.clock.jump(GRACE + 61)
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["infraRestarts"], status["restarts"]) == (1, 0)
        # the taint manager's delete started it; the operator's only call is the forced one
        deletes = [
            c for c in k8s.cluster.calls if c.from_operator and c.verb == "delete" and c.name == "demo-a1-n1"
        ]
        assert len(deletes) == 1


@pytest.mark.asyncio
async def test_an_init_container_failure_is_a_counted_restart() -> None:
    behaviour = script(a1n1=Rank(init_failure=(1, "iptables-restore: permission denied")))
    async with running(behaviour, job(**{"spec.runPolicy.maxRestarts": 1})) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["restarts"], status["infraRestarts"]) == (1, 0)
        messages = k8s.event_messages("demo", "RankFailed")
        assert "init container mesh-init exited 1: iptables-restore: permission denied" in messages[0]


@pytest.mark.asyncio
async def test_a_sidecar_exiting_143_after_the_trainer_exited_0_leaves_the_job_succeeded() -> None:
    async with running(script(Rank(exit_code=0, sidecar_exit=143)), job()) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded")
        assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (1, 0, 0)
        assert {p["status"]["phase"] for p in k8s.pods("demo")} <= {"Failed"}  # as the kubelet computes it


@pytest.mark.asyncio
async def test_an_eviction_loop_stops_at_the_infrastructure_restart_budget() -> None:
    """A job that fills its node's disk: evicted for node pressure on every attempt."""
    filling = Rank(evicted=True, after=0.2, message="The node was low on resource: ephemeral-storage. ")
    async with running(script(filling), job(**{"spec.runPolicy.maxInfrastructureRestarts": 2})) as k8s:
        status = await k8s.phase(NS, "demo", "Failed", timeout=30)
        failed = condition(status, "Failed")
        assert failed["reason"] == "InfrastructureRestartLimitExceeded"
        assert "The node was low on resource: ephemeral-storage" in failed["message"]
        assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (3, 0, 2)


@pytest.mark.asyncio
async def test_an_eviction_for_the_pods_own_storage_limit_counts_toward_max_restarts() -> None:
    over = Rank(
        evicted=True,
        after=0.2,
        message='Container trainer exceeded its local ephemeral storage limit "10Gi". ',
    )
    async with running(script(over), job()) as k8s:
        status = await k8s.phase(NS, "demo", "Failed", timeout=30)
        failed = condition(status, "Failed")
        assert failed["reason"] == "BackoffLimitExceeded" and "EvictedOverLimit" in failed["message"]
        assert (status["restarts"], status["infraRestarts"]) == (0, 0)


@pytest.mark.asyncio
async def test_re_applying_a_deleted_jobs_name_adopts_none_of_the_old_incarnations_children() -> None:
    """A real garbage collector works in the background and a deleted pod terminates gracefully:
    the old pods and ConfigMap are still there when the same manifest is applied again."""
    async with running(script(Rank(exit_code=None, stop_after=1.5)), job()) as k8s:
        k8s.cluster.gc_delay = 0.5
        await k8s.phase(NS, "demo", "Running")
        old_uid = k8s.job(NS, "demo")["metadata"]["uid"]
        await k8s.delete(NS, "demo")
        await k8s.apply(job())
        new_uid = await k8s.eventually(lambda: (k8s.job(NS, "demo") or {}).get("metadata", {}).get("uid"))
        assert new_uid != old_uid
        status = await k8s.eventually(
            lambda: (
                (s := k8s.status(NS, "demo")).get("phase") == "Running"
                and all(p["metadata"]["ownerReferences"][0]["uid"] == new_uid for p in k8s.pods("demo"))
                and s
            ),
            what="the new incarnation running its own pods",
        )
        assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (1, 0, 0)
        config = k8s.cluster.get(CONFIGMAPS, NS, "demo-a1-config")
        assert config is not None and config["metadata"]["ownerReferences"][0]["uid"] == new_uid


@pytest.mark.asyncio
async def test_goodput_reaches_the_status_with_restart_time_by_class() -> None:
    async with running(script(a1n0=Rank(evicted=True, after=0.3)), job()) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        goodput = status["goodput"]
        assert goodput["infrastructureRestartSeconds"] > 0 and goodput["productiveSeconds"] > 0
        assert goodput["applicationRestartSeconds"] == 0 and 0 < goodput["percent"] < 100


@pytest.mark.asyncio
async def test_a_report_followed_by_more_than_200_lines_of_other_output_still_reaches_the_status() -> None:
    async with running(script(Rank(exit_code=None, report_every=3600)), job()) as k8s:
        await k8s.phase(NS, "demo", "Running")
        report = ProgressReport(progress=Progress(step=99, total_steps=1000, updated_at=k8s.clock.now()))
        noise = "".join(f"UserWarning: something chatty {i}\n" for i in range(300))
        k8s.cluster.append_log((NS, "demo-a1-n0"), format_line(report) + "\n" + noise)
        status = await k8s.eventually(
            lambda: (s := k8s.status(NS, "demo")).get("progress", {}).get("step") == 99 and s,
            what="step 99 in status",
        )
        assert status["phase"] == "Running"
