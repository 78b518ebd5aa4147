"""The local mode is an honest rehearsal of the cluster: for the same scripted rank behaviour, the
decide step hands the LocalBackend and the KubernetesBackend the same sequence of actions."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.policy import actions as act

from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.local import RecordingLocalRun, record_actions
from tests.support.operator import operator_env

NS = "default"
SCENARIOS = {
    "rank failure, restart, success": script(
        # the survivor of a crashed peer fails too (its collective times out), as on a cluster; one
        # left running would hold the verdict for the node-loss settle window
        a1n0=Rank(exit_code=75, after=1.5),
        a1n1=Rank(exit_code=1, after=1.0, message="RuntimeError at step 3"),
        default=Rank(exit_code=0, after=1.0),
    ),
    "invalid config": script(a1n0=Rank(exit_code=None), a1n1=Rank(exit_code=2, after=0.5, message="bad")),
    "first try": script(Rank(exit_code=0, after=0.5)),
}
FINAL = {"rank failure, restart, success": "Succeeded", "invalid config": "Failed", "first try": "Succeeded"}


def _job() -> dict[str, Any]:
    return manifest(
        {
            "spec.resources.nodes": 2,
            "spec.runPolicy.backoffBaseSeconds": 1,
            "spec.runPolicy.backoffCapSeconds": 1,
        },
        name="parity",
        namespace=NS,
    )


def _collapsed(actions: list[act.Action]) -> list[act.Action]:
    """Repeats of one action by consecutive passes (a retry before the world caught up) are one."""
    return [a for a, _ in groupby(actions)]


async def _on_the_cluster(behaviour: Any) -> tuple[list[act.Action], dict[str, Any]]:
    async with operator_env(behaviour) as k8s:
        operator = await k8s.start_operator()
        recorded = record_actions(operator.runtime.backend)
        await k8s.apply(_job())
        status = await k8s.eventually(
            lambda: (
                (s := k8s.status(NS, "parity")).get("phase") in ("Succeeded", "Failed")
                and not [p for p in k8s.pods("parity") if p["status"].get("phase") == "Running"]
                and s
            ),
            timeout=30,
            what="finished",
        )
        return recorded, status


@pytest.mark.asyncio
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_both_backends_receive_the_same_actions(scenario: str, tmp_path: Path) -> None:
    behaviour = SCENARIOS[scenario]
    cluster_actions, cluster_status = await _on_the_cluster(behaviour)

    local = RecordingLocalRun(tmp_path, behaviour)
    local.backend.submit(_job(), local.reconciler.clock.now())
    body = await local.until((NS, "parity"), FINAL[scenario])

    assert cluster_status["phase"] == body["status"]["phase"] == FINAL[scenario]
    assert _collapsed(local.actions) == _collapsed(cluster_actions)
    assert local.actions[:2] == [act.CreateService(), act.CreateAttempt(attempt=1, ranks=(0, 1))]
    restarted = act.CreateAttempt(attempt=2, ranks=(0, 1)) in local.actions
    assert restarted == (scenario == "rank failure, restart, success")
    assert body["status"]["restarts"] == cluster_status.get("restarts", 0)
