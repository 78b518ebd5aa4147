"""The operator converges whatever happens to it: killed at any moment and started again, or
talking to an API server that conflicts, fails, stalls and drops its watch streams."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from tests.support.cluster import CONFIGMAPS, Call
from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import OperatorEnv, operator_env, with_settings

NS = "team-a"
WRITES = {"create", "patch", "delete"}


def job() -> dict:
    changes = {
        "spec.resources.nodes": 2,
        "spec.runPolicy.backoffBaseSeconds": 1,
        "spec.runPolicy.backoffCapSeconds": 2,
    }
    return manifest(changes, name="demo", namespace=NS)


def operator_write(call: Call) -> bool:
    return call.from_operator and call.verb in WRITES and call.resource != "events"


async def assert_one_clean_restart(k8s: OperatorEnv, context: str) -> None:
    status = await k8s.phase(NS, "demo", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (2, 1, 0), context
    names = sorted(p["metadata"]["name"] for p in k8s.pods("demo"))
    assert names == ["demo-a2-n0", "demo-a2-n1"], f"{context}: pods left {names}"
    assert sorted(k8s.kubelet.started) == ["demo-a1-n0", "demo-a1-n1", "demo-a2-n0", "demo-a2-n1"], context
    assert k8s.cluster.get(CONFIGMAPS, NS, "demo-a1-config") is None, f"{context}: attempt 1's config left"


@pytest.mark.asyncio
@pytest.mark.parametrize("run", range(3))
async def test_an_operator_killed_and_restarted_at_random_points_of_a_restart_leaves_no_duplicate_or_orphan(
    run: int,
) -> None:
    # FTJOB_TEST_SEED replays a failure's seed (printed in its message)
    seed = int(os.environ.get("FTJOB_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    # The writes of one job's life here: ~6 to start attempt 1, ~2 for Running, ~8 for the restart.
    kill_at = sorted(rng.sample(range(1, 18), 2))
    context = f"seed {seed}: operator killed at its writes {kill_at}"
    behaviour = script(a1n1=Rank(exit_code=1, after=0.5, message="RuntimeError at step 3: boom"))
    async with operator_env(behaviour) as k8s:
        writes = 0
        kills: list[asyncio.Task[None]] = []
        one_at_a_time = asyncio.Lock()  # a write of the dying operator may reach the next kill point

        async def kill_and_restart() -> None:
            async with one_at_a_time:
                assert k8s.operator is not None
                await k8s.operator.kill()
                await k8s.start_operator()

        def count(call: Call) -> None:
            nonlocal writes
            if operator_write(call):
                writes += 1
                if writes in kill_at:
                    kills.append(asyncio.create_task(kill_and_restart()))

        k8s.cluster.on_call = count
        await k8s.start_operator()
        await k8s.apply(job())
        await k8s.eventually(
            lambda: len(kills) == 2 and all(t.done() for t in kills), timeout=60, what=context
        )
        for task in kills:
            task.result()
        await assert_one_clean_restart(k8s, context)


@pytest.mark.asyncio
async def test_conflicts_server_errors_timeouts_and_dropped_watches_do_not_stop_convergence() -> None:
    behaviour = script(a1n1=Rank(exit_code=1, after=0.5))
    async with operator_env(behaviour) as k8s:
        cluster = k8s.cluster
        cluster.inject(lambda c: c.resource == "finetunejobs/status", status=409, times=2)
        cluster.inject(lambda c: c.verb == "create" and c.resource == "pods", status=500, times=3)
        cluster.inject(lambda c: c.verb == "get" and c.resource == "finetunejobs", status=503, times=2)
        # past the client's 1 s timeout, for the first call and the client's own three retries
        cluster.inject(
            lambda c: c.verb == "list" and c.resource == "pods" and c.from_operator, delay=1.5, times=4
        )
        cluster.inject(lambda c: c.verb == "delete" and c.resource == "pods", status=500, times=1)
        operator = await k8s.start_operator(with_settings(request_timeout_seconds=1.0))
        await k8s.apply(job())
        await k8s.eventually(lambda: k8s.status(NS, "demo").get("phase") == "Running", timeout=30)
        cluster.drop_watches()
        await assert_one_clean_restart(k8s, "with faults injected")
        assert all(f.hits == f.times for f in cluster.faults), [(f.hits, f.times) for f in cluster.faults]
        errors = {
            (s.labels["operation"], s.labels["code"])
            for metric in operator.runtime.metrics.api_errors.collect()
            for s in metric.samples
            if s.name.endswith("_total") and s.value > 0
        }
        assert {
            ("patch finetunejobs/status", "409"),
            ("create pods", "500"),
            ("list pods", "timeout"),
        } <= errors
