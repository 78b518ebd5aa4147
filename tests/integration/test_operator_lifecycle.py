"""The real kopf operator against the emulated cluster: a job's life from apply to Succeeded or
Failed, with the test kubelet playing the rank pods."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from finetune_operator import contract
from finetune_operator.cli import main

from tests.support.cluster import CONFIGMAPS, NETWORK_POLICIES, SERVICES
from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import operator_env, running, with_settings

NS = "team-a"
FAST = {
    "spec.resources.nodes": 2,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 2,
}


def job(name: str = "demo", **changes: object) -> dict:
    return manifest(
        {**FAST, **{k.replace("__", "."): v for k, v in changes.items()}}, name=name, namespace=NS
    )


def env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.asyncio
async def test_apply_creates_the_service_config_and_one_pod_per_rank_with_the_contract_env() -> None:
    async with running(script(Rank(exit_code=None)), job()) as k8s:
        pods = await k8s.eventually(lambda: len(k8s.pods("demo")) == 2 and k8s.pods("demo"), what="2 pods")
        by_name = {p["metadata"]["name"]: p for p in pods}
        assert set(by_name) == {"demo-a1-n0", "demo-a1-n1"}
        env = env_of(by_name["demo-a1-n1"])
        assert env[contract.ENV_NODE_RANK] == "1"
        assert env[contract.ENV_NNODES] == "2"
        assert env[contract.ENV_MASTER_ADDR] == f"demo-a1-n0.demo-ranks.{NS}.svc"
        assert env[contract.ENV_ATTEMPT] == "1"
        assert k8s.cluster.get(SERVICES, NS, "demo-ranks") is not None
        assert k8s.cluster.get(CONFIGMAPS, NS, "demo-a1-config") is not None
        status = await k8s.phase(NS, "demo", "Running")
        assert status["attempt"] == 1 and status["ranks"]["running"] == 2


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


@pytest.mark.asyncio
async def test_a_rank_exiting_1_twice_then_success_ends_succeeded_with_two_restarts() -> None:
    behaviour = script(
        a1n1=Rank(exit_code=1, message="RuntimeError at step 7: boom"),
        a2n0=Rank(exit_code=1, message="RuntimeError at step 9: boom"),
    )
    async with running(behaviour, job()) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (3, 2, 0)
        assert status["ranks"] == {"total": 2, "pending": 0, "running": 0, "succeeded": 2, "failed": 0}
        restarting = condition(status, "Restarting")
        assert restarting["status"] == "False" and restarting["reason"] == "Restarted"
        assert sorted(k8s.kubelet.started) == [f"demo-a{a}-n{r}" for a in (1, 2, 3) for r in (0, 1)]
        reasons = await k8s.eventually(lambda: "Succeeded" in (r := k8s.events("demo")) and r)
        assert reasons.count("RankFailed") == 2 and reasons.count("Restarting") == 2
        assert reasons[0] == "Created" and reasons[-1] == "Succeeded"


@pytest.mark.asyncio
async def test_the_failed_ranks_termination_message_is_the_restart_reason() -> None:
    behaviour = script(a1n1=Rank(exit_code=1, message="CUDA out of memory at step 1200"))
    async with running(behaviour, job()) as k8s:
        await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        restarting = condition(k8s.status(NS, "demo"), "Restarting")
        assert "CUDA out of memory at step 1200" in k8s.event_messages("demo", "RankFailed")[0]
        assert restarting["reason"] == "Restarted"


@pytest.mark.asyncio
async def test_an_eviction_restarts_the_gang_without_counting_toward_max_restarts() -> None:
    async with running(script(a1n0=Rank(evicted=True)), job(**{"spec.runPolicy.maxRestarts": 0})) as k8s:
        status = await k8s.phase(NS, "demo", "Succeeded", timeout=30)
        assert (status["restarts"], status["infraRestarts"], status["attempt"]) == (0, 1, 2)


@pytest.mark.asyncio
async def test_exit_2_fails_the_job_as_invalid_config_without_a_restart() -> None:
    message = "invalid configuration: world.nnodes 2 but 3 ranks"
    async with running(
        script(a1n1=Rank(exit_code=2, message=message), default=Rank(exit_code=None)), job()
    ) as k8s:
        status = await k8s.phase(NS, "demo", "Failed")
        failed = condition(status, "Failed")
        assert failed["reason"] == "InvalidConfig" and message in failed["message"]
        assert (status["attempt"], status["restarts"]) == (1, 0)
        # cleanPodPolicy Running (the default): the rank still running is deleted, the failed one kept
        await k8s.eventually(lambda: [p["metadata"]["name"] for p in k8s.pods("demo")] == ["demo-a1-n1"])


@pytest.mark.asyncio
async def test_image_pull_backoff_past_the_startup_timeout_fails_the_job_with_that_reason() -> None:
    behaviour = script(a1n1=Rank(waiting="ImagePullBackOff"), default=Rank(exit_code=None))
    async with running(behaviour, job(**{"spec.runPolicy.startupTimeoutSeconds": 600})) as k8s:
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("ranks", {}).get("pending") == 1)
        assert k8s.status(NS, "demo")["phase"] == "Starting"
        k8s.clock.jump(601)
        status = await k8s.phase(NS, "demo", "Failed")
        assert condition(status, "Failed")["reason"] == "ImagePullBackOff"
        assert status["restarts"] == 0


@pytest.mark.asyncio
async def test_max_restarts_exceeded_fails_the_job_as_backoff_limit_exceeded() -> None:
    async with running(
        script(Rank(exit_code=1, message="ValueError at step 3: nan loss")),
        job(**{"spec.runPolicy.maxRestarts": 1}),
    ) as k8s:
        status = await k8s.phase(NS, "demo", "Failed", timeout=30)
        failed = condition(status, "Failed")
        assert failed["reason"] == "BackoffLimitExceeded" and "nan loss" in failed["message"]
        assert (status["attempt"], status["restarts"]) == (2, 1)


@pytest.mark.asyncio
async def test_suspend_deletes_the_pods_and_unsuspend_starts_a_new_attempt() -> None:
    async with running(script(Rank(exit_code=None)), job()) as k8s:
        await k8s.phase(NS, "demo", "Running")
        await k8s.patch(NS, "demo", {"spec": {"runPolicy": {"suspend": True}}})
        status = await k8s.phase(NS, "demo", "Suspended")
        assert condition(status, "Suspended")["status"] == "True" and status["attempt"] == 1
        await k8s.eventually(lambda: not k8s.pods("demo"), what="pods gone")
        await k8s.patch(NS, "demo", {"spec": {"runPolicy": {"suspend": False}}})
        status = await k8s.phase(NS, "demo", "Running")
        assert status["attempt"] == 2 and status["restarts"] == 0
        assert {p["metadata"]["name"] for p in k8s.pods("demo")} == {"demo-a2-n0", "demo-a2-n1"}
        await k8s.eventually(lambda: {"Suspended", "Resumed"} <= set(k8s.events("demo")))


@pytest.mark.asyncio
async def test_ttl_after_finished_deletes_the_job_and_every_child() -> None:
    async with running(
        script(),
        job(**{"spec.runPolicy.ttlSecondsAfterFinished": 300, "spec.runPolicy.cleanPodPolicy": "None"}),
    ) as k8s:
        await k8s.phase(NS, "demo", "Succeeded")
        assert len(k8s.pods("demo")) == 2
        k8s.clock.jump(301)
        await k8s.eventually(lambda: k8s.job(NS, "demo") is None, what="job deleted")
        await k8s.eventually(lambda: not k8s.pods("demo"), what="pods collected")
        assert k8s.cluster.get(SERVICES, NS, "demo-ranks") is None
        assert k8s.cluster.get(CONFIGMAPS, NS, "demo-a1-config") is None


@pytest.mark.asyncio
async def test_a_job_without_progress_for_progress_timeout_is_restarted_as_stalled() -> None:
    behaviour = script(a1=Rank(exit_code=None, progress=False), default=Rank(exit_code=None))
    # Silent from the start: the trainer's phase deadline comes on top (the set-up phases report no step).
    spec = {"spec.runPolicy.progressTimeoutSeconds": 600, "spec.runPolicy.phaseTimeoutSeconds": 600}
    async with running(behaviour, job(**spec)) as k8s:
        await k8s.phase(NS, "demo", "Running")
        k8s.clock.jump(1201)
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("attempt") == 2, what="attempt 2")
        status = await k8s.phase(NS, "demo", "Running")
        assert status["restarts"] == 1
        assert "no progress for 600s" in k8s.event_messages("demo", "RankFailed")[0]


@pytest.mark.asyncio
async def test_progress_and_the_latest_checkpoint_reach_the_status_while_running() -> None:
    async with running(script(Rank(exit_code=None)), job()) as k8s:
        status = await k8s.eventually(
            lambda: (s := k8s.status(NS, "demo")).get("latestCheckpoint") and s, what="a checkpoint in status"
        )
        assert status["progress"]["step"] >= 10 and status["progress"]["totalSteps"] == 1000
        assert status["latestCheckpoint"]["uri"].startswith("s3://ckpt/")


@pytest.mark.asyncio
async def test_an_active_deadline_set_on_a_running_job_takes_effect() -> None:
    async with running(script(Rank(exit_code=None)), job()) as k8s:
        await k8s.phase(NS, "demo", "Running")
        await k8s.patch(NS, "demo", {"spec": {"runPolicy": {"activeDeadlineSeconds": 3600}}})
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("observedGeneration") == 2)
        k8s.clock.jump(3601)
        status = await k8s.phase(NS, "demo", "Failed")
        assert condition(status, "Failed")["reason"] == "DeadlineExceeded"


@pytest.mark.asyncio
async def test_with_network_policies_on_the_jobs_policy_exists_before_its_service_and_pods() -> None:
    """The Service's absence is what brings the create back: a pass that fails after the policy and
    before the Service is finished by the next one, and no rank pod ever runs unprotected."""
    async with operator_env(script()) as k8s:
        k8s.cluster.inject(lambda c: c.verb == "create" and c.resource == "services", status=500)
        await k8s.start_operator(with_settings(network_policy=True))
        await k8s.apply(job())
        await k8s.phase(NS, "demo", "Succeeded")
        creates = [c.resource for c in k8s.cluster.calls if c.from_operator and c.verb == "create"]
        assert creates.index("networkpolicies") < creates.index("services") < creates.index("pods")
        assert creates.count("services") == 2  # the failed one, then the next pass's
        assert k8s.cluster.get(NETWORK_POLICIES, NS, "demo-ranks") is not None


@pytest.mark.asyncio
async def test_deleting_a_job_takes_its_children_and_needs_no_finalizer() -> None:
    async with running(script(Rank(exit_code=None)), job()) as k8s:
        await k8s.phase(NS, "demo", "Running")
        assert not k8s.job(NS, "demo")["metadata"].get("finalizers")
        await k8s.delete(NS, "demo")
        await k8s.eventually(lambda: not k8s.pods("demo"), what="pods collected")
        assert k8s.cluster.get(SERVICES, NS, "demo-ranks") is None


@pytest.mark.asyncio
async def test_ftjob_describe_reads_a_cluster_job_through_the_users_kubeconfig(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(script(), job()) as k8s:
        await k8s.phase(NS, "demo", "Succeeded")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulated", "cluster": {"server": k8s.url}}],
                    "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
                    "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}],
                    "current-context": "emulated",
                }
            )
        )
        args = ["-n", NS, "--kubeconfig", str(kubeconfig)]
        assert await asyncio.to_thread(main, ["describe", "demo", *args]) == 0
        text = capsys.readouterr().out
        assert "Phase:        Succeeded" in text and "demo-a1-n0" in text
        assert "Normal   Created" in text, text  # the job's events, read from the cluster
        assert await asyncio.to_thread(main, ["status", "demo", *args]) == 0
        assert "Succeeded" in capsys.readouterr().out
