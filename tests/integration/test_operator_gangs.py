"""The real operator with gang schedulers (spec.gang) against the emulator and the schedulers'
stand-ins (tests/support/gangs.py): a gang its scheduler holds is Queued however long it waits, runs
once admitted, and every attempt gets its own PodGroup, the old one deleted."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator import contract

from tests.support.cluster import COSCHEDULING_PODGROUPS, PODS, VOLCANO_PODGROUPS
from tests.support.factories import manifest
from tests.support.gangs import KueueStandIn, PodGroupStandIn
from tests.support.kubelet import Rank, script
from tests.support.operator import OperatorEnv, operator_env

NS = "team-a"
STARTUP = 600


def job(gang: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return manifest(
        {
            "spec.resources.nodes": 2,
            "spec.runPolicy.startupTimeoutSeconds": STARTUP,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
            "spec.gang": gang,
            **changes,
        },
        name="gang",
        namespace=NS,
    )


async def _next_pass(k8s: OperatorEnv) -> None:
    """Until the operator begins a pass of the job (a pass begins with its pod list)."""
    seen = len(k8s.cluster.calls)
    await k8s.eventually(
        lambda: any(
            c.resource == "pods" and c.verb == "list" and c.from_operator for c in k8s.cluster.calls[seen:]
        ),
        what="an operator pass",
    )


async def _a_pass_after(k8s: OperatorEnv, jump: float) -> None:
    """Jump the clock past a deadline and wait until the pass its timer starts has finished: a pod
    change then wakes the job again, and passes of one job never overlap (workqueue.py), so the
    next pass beginning means the timer's pass has ended."""
    k8s.clock.jump(jump)
    await _next_pass(k8s)
    name = k8s.pods("gang")[0]["metadata"]["name"]
    await k8s.cluster.write(PODS, NS, name, {"metadata": {"annotations": {"test.example/poke": "1"}}})
    await _next_pass(k8s)


@pytest.mark.asyncio
async def test_a_kueue_gang_is_queued_until_admitted_then_runs_without_a_startup_failure() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        kueue = KueueStandIn(k8s.cluster, k8s.kubelet)
        await k8s.start_operator()
        await k8s.apply(job({"scheduler": "Kueue", "queueName": "gpu"}))
        await k8s.eventually(lambda: len(kueue.group(NS, "gang-a1")) == 2, what="both ranks created")
        queued = await k8s.phase(NS, "gang", "Queued")
        assert any(c["type"] == "Queued" and c["status"] == "True" for c in queued["conditions"])
        await _a_pass_after(k8s, STARTUP + 1)
        status = k8s.status(NS, "gang")
        assert status["phase"] == "Queued", status
        assert not any(c["type"] == "Failed" for c in status["conditions"])
        assert all(p["spec"]["schedulingGates"] for p in k8s.pods("gang"))
        await kueue.admit(NS, "gang-a1")
        running = await k8s.phase(NS, "gang", "Running")
        assert running["goodput"]["queuedSeconds"] >= STARTUP  # the wait shows in status
        # events go out after the status write that records their transition
        await k8s.eventually(lambda: {"Queued", "Admitted"} <= set(k8s.events("gang")), what="events")


@pytest.mark.asyncio
async def test_a_volcano_pod_group_pending_past_the_startup_timeout_stays_queued() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        volcano = PodGroupStandIn(k8s.cluster, k8s.kubelet)
        await k8s.start_operator()
        await k8s.apply(job({"scheduler": "Volcano"}))
        group = await k8s.eventually(
            lambda: k8s.cluster.get(VOLCANO_PODGROUPS, NS, "gang-a1"), what="PodGroup"
        )
        assert group["spec"]["minMember"] == 2
        await k8s.eventually(lambda: len(k8s.pods("gang")) == 2, what="both ranks created")
        await k8s.phase(NS, "gang", "Queued")
        await _a_pass_after(k8s, STARTUP + 1)
        status = k8s.status(NS, "gang")
        assert status["phase"] == "Queued" and not any(c["type"] == "Failed" for c in status["conditions"])
        await volcano.release(NS, "gang-a1")
        await k8s.phase(NS, "gang", "Running")


@pytest.mark.asyncio
async def test_a_coscheduling_gang_waits_queued_for_its_pod_group_then_runs() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        coscheduling = PodGroupStandIn(k8s.cluster, k8s.kubelet, "Coscheduling")
        await k8s.start_operator()
        await k8s.apply(job({"scheduler": "Coscheduling", "scheduleTimeoutSeconds": 120}))
        group = await k8s.eventually(
            lambda: k8s.cluster.get(COSCHEDULING_PODGROUPS, NS, "gang-a1"), what="PodGroup"
        )
        assert (group["spec"]["minMember"], group["spec"]["scheduleTimeoutSeconds"]) == (2, 120)
        await k8s.phase(NS, "gang", "Queued")
        await _a_pass_after(k8s, STARTUP + 1)
        assert k8s.status(NS, "gang")["phase"] == "Queued"
        await coscheduling.release(NS, "gang-a1")
        await k8s.phase(NS, "gang", "Running")


@pytest.mark.asyncio
async def test_a_restart_creates_the_next_attempts_pod_group_and_deletes_the_old_one() -> None:
    behaviour = script(
        a1n1=Rank(exit_code=1, after=0.5, message="RuntimeError at step 3"),
        a1n0=Rank(exit_code=75, after=0.8),
        default=Rank(exit_code=None),
    )
    async with operator_env(behaviour) as k8s:
        PodGroupStandIn(k8s.cluster, k8s.kubelet, admit_at_once=True)
        await k8s.start_operator()
        await k8s.apply(job({"scheduler": "Volcano"}))
        await k8s.eventually(
            lambda: (
                k8s.status(NS, "gang").get("attempt") == 2
                and k8s.status(NS, "gang").get("phase") == "Running"
            ),
            what="attempt 2 running",
        )
        groups = await k8s.eventually(
            lambda: (
                (names := [g["metadata"]["name"] for g in k8s.cluster.list(VOLCANO_PODGROUPS)]) == ["gang-a2"]
                and names
            ),
            what="only attempt 2's PodGroup",
        )
        assert groups == ["gang-a2"]
        live = [p for p in k8s.cluster.list(PODS) if not p["metadata"].get("deletionTimestamp")]
        assert {p["metadata"]["annotations"][contract.VOLCANO_GROUP_ANNOTATION] for p in live} == {"gang-a2"}


@pytest.mark.asyncio
async def test_pod_groups_the_operator_may_not_create_are_shown_as_a_refusal_and_no_rank_starts() -> None:
    """An installation without gangScheduling.volcano.enabled: the API server answers 403 on
    podgroups. The refusal is the job's status, and no rank pod is created without its group."""
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.cluster.inject(lambda c: c.resource == "podgroups", status=403, times=1000)
        await k8s.start_operator()
        await k8s.apply(job({"scheduler": "Volcano"}))
        refused = await k8s.eventually(
            lambda: next(
                (c for c in k8s.status(NS, "gang").get("conditions") or [] if c["type"] == "CreateRefused"),
                None,
            ),
            what="the CreateRefused condition",
        )
        assert refused["status"] == "True" and k8s.status(NS, "gang")["createRefusal"]["code"] == 403
        assert k8s.pods("gang") == []
