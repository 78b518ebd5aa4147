"""The real operator learns of in-place restarts from rank 0's progress alone (trainer pods hold no
cluster credentials): the test kubelet's rank 0 reports one as the trainer's does
(tests/support/kubelet.py `restarted_in_place_at`), the pods stay as they are, and the operator
counts it as a restart. A lost node in the same attempt still restarts the gang at pod level."""

from __future__ import annotations

import pytest
from finetune_operator import contract

from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.nodes import NODE_MONITOR_GRACE_PERIOD, TOLERATION_SECONDS
from tests.support.operator import running

NS = "team-a"
FAST = {
    "spec.resources.nodes": 2,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 2,
}
GRACE = 120  # runPolicy.terminationGracePeriodSeconds' default
RESTARTED = Rank(exit_code=0, after=1.5, restarted_in_place_at=12)


def job(**changes: object) -> dict:
    return manifest({**FAST, **changes}, name="demo", namespace=NS)


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def pod(k8s: object, name: str) -> dict | None:
    return next((p for p in k8s.pods("demo") if p["metadata"]["name"] == name), None)  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_a_reported_in_place_restart_is_counted_without_touching_the_pods() -> None:
    async with running(script(a1n0=RESTARTED), job()) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["attempt"], status["restarts"], status["inPlaceRestarts"]) == (1, 1, 1)
        assert sorted(k8s.kubelet.started) == ["demo-a1-n0", "demo-a1-n1"], "no new pods"
        calls = k8s.cluster.calls
        assert not [c for c in calls if c.from_operator and c.verb == "delete" and c.resource == "pods"]


@pytest.mark.asyncio
async def test_the_in_place_restart_is_in_events_conditions_and_goodput() -> None:
    async with running(script(a1n0=RESTARTED), job()) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        restarting = condition(status, "Restarting")
        assert restarting["reason"] == "RestartedInPlace" and "collective failed" in restarting["message"]
        reasons = await k8s.eventually(lambda: "Succeeded" in (r := k8s.events("demo")) and r)
        assert reasons.count("RankFailed") == 1 and reasons.count("RestartedInPlace") == 1
        assert "node 1: collective failed at step 12" in k8s.event_messages("demo", "RankFailed")[0]
        assert status["goodput"]["applicationRestartSeconds"] > 0


@pytest.mark.asyncio
async def test_an_exhausted_budget_leaves_no_in_place_restarts_to_the_next_attempt() -> None:
    behaviour = script(a1n0=RESTARTED, a1n1=Rank(exit_code=1, after=2.5, message="RuntimeError: boom"))
    async with running(behaviour, job(**{"spec.runPolicy.maxRestarts": 2})) as k8s:
        first = await k8s.eventually(lambda: pod(k8s, "demo-a1-n0"), what="attempt 1's rank 0")
        assert env_of(first)[contract.ENV_IN_PLACE_RESTARTS] == "2"
        second = await k8s.eventually(lambda: pod(k8s, "demo-a2-n0"), what="attempt 2's rank 0")
        assert env_of(second)[contract.ENV_IN_PLACE_RESTARTS] == "0", "the pod-level restart spent the rest"
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["attempt"], status["restarts"], status["inPlaceRestarts"]) == (2, 2, 1)


@pytest.mark.asyncio
async def test_a_lost_node_after_an_in_place_restart_still_restarts_the_gang_at_pod_level() -> None:
    behaviour = script(
        a1n0=Rank(exit_code=None, restarted_in_place_at=12), a1n1=Rank(node_lost=True, after=1.5)
    )
    async with running(behaviour, job()) as k8s:
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("inPlaceRestarts") == 1, what="counted")
        await k8s.eventually(lambda: k8s.kubelet.nodes.lost, what="n1's node silent")
        k8s.clock.jump(NODE_MONITOR_GRACE_PERIOD + 1)
        k8s.clock.jump(TOLERATION_SECONDS)
        status = await k8s.phase(NS, "demo", "Restarting")
        assert (status["restarts"], status["inPlaceRestarts"], status["infraRestarts"]) == (1, 1, 1)
        k8s.clock.jump(GRACE + 61)
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert status["attempt"] == 2 and status["attemptInPlaceRestarts"] == 0
