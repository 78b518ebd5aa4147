"""Creates the API server refuses (admission, validation), against the emulator answering them as
the API server's own plugins do (tests/support/admission.py cites them)."""

from __future__ import annotations

import pytest

from tests.support.admission import InvalidAffinity, PodQuota
from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import operator_env

NS = "team-a"


def job(**changes: object) -> dict:
    base = {"spec.resources.nodes": 2, "spec.runPolicy.startupTimeoutSeconds": 600}
    return manifest({**base, **changes}, name="demo", namespace=NS)


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


@pytest.mark.asyncio
async def test_a_quota_refusal_is_a_condition_and_an_event_then_failed_after_the_startup_deadline() -> None:
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.cluster.admission.append(PodQuota(NS, pods=1))
        await k8s.start_operator()
        await k8s.apply(job())
        status = await k8s.eventually(
            lambda: (s := k8s.status(NS, "demo")).get("createRefusal") and s, what="the refusal recorded"
        )
        refused = await k8s.eventually(lambda: condition(k8s.status(NS, "demo"), "CreateRefused"))
        assert refused["status"] == "True" and refused["reason"] == "Forbidden"
        assert "exceeded quota: compute" in refused["message"]
        assert status["createRefusal"]["code"] == 403
        messages = await k8s.eventually(lambda: k8s.event_messages("demo", "CreateRefused"))
        assert "403 Forbidden" in messages[0] and "exceeded quota: compute" in messages[0]
        assert k8s.status(NS, "demo")["phase"] == "Starting"
        creates = sum(
            1 for c in k8s.cluster.calls if c.from_operator and c.verb == "create" and c.resource == "pods"
        )
        await k8s.timed_only(NS, "demo")
        k8s.clock.jump(601)
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert failed["reason"] == "CreateRefused" and "exceeded quota" in failed["message"]
        assert creates <= 4, "a refused create is not retried in a loop"


@pytest.mark.asyncio
async def test_a_quota_that_frees_up_lets_the_attempt_start() -> None:
    quota = PodQuota(NS, pods=1)
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.cluster.admission.append(quota)
        await k8s.start_operator()
        await k8s.apply(job())
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("createRefusal"), what="the refusal")
        quota.pods = 2
        k8s.clock.jump(31)  # the retry interval
        status = await k8s.phase(NS, "demo", "Running")
        assert "createRefusal" not in status and condition(status, "CreateRefused")["status"] == "False"


@pytest.mark.asyncio
async def test_an_invalid_affinity_refused_with_422_fails_the_job_at_once_naming_the_field() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "Inn", "values": ["a100"]}]}
                ]
            }
        }
    }
    async with operator_env(script(Rank(exit_code=None))) as k8s:
        k8s.cluster.admission.append(InvalidAffinity())
        await k8s.start_operator()
        await k8s.apply(job(**{"spec.resources.affinity": affinity}))
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert failed["reason"] == "CreateRefused" and "422 Invalid" in failed["message"]
        assert "matchExpressions[0].operator" in failed["message"]
        messages = await k8s.eventually(lambda: k8s.event_messages("demo", "CreateRefused"))
        assert "422 Invalid" in messages[0]
