"""What a cluster's monitoring reads from the running operator: kopf's liveness endpoint with the
reconcile probe, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import operator_env, with_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_liveness_reports_the_reconcile_probe_and_metrics_count_jobs_and_restarts() -> None:
    liveness, metrics = free_port(), free_port()
    behaviour = script(a1n0=Rank(exit_code=1, after=0.3))
    async with operator_env(behaviour) as k8s:
        await k8s.start_operator(
            with_settings(metrics_port=metrics), liveness=f"http://127.0.0.1:{liveness}/healthz"
        )
        changes = {"spec.runPolicy.backoffBaseSeconds": 1, "spec.runPolicy.backoffCapSeconds": 1}
        await k8s.apply(manifest(changes, name="demo", namespace="team-a"))
        await k8s.phase("team-a", "demo", "Succeeded", timeout=30)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{liveness}/healthz") as response:
                assert response.status == 200
                assert "reconcile" in await response.json()
            exposition = ""

            async def scrape() -> str:
                nonlocal exposition
                async with session.get(f"http://127.0.0.1:{metrics}/metrics") as response:
                    exposition = await response.text()
                return exposition

            # the pass records the phase after its status write, which the test saw first
            for _ in range(100):
                if 'ftjob_jobs{phase="Succeeded"} 1.0' in await scrape():
                    break
                await asyncio.sleep(0.05)
        assert 'ftjob_jobs{phase="Succeeded"} 1.0' in exposition
        assert 'ftjob_gang_restarts_total{class="application"} 1.0' in exposition
        assert "ftjob_reconcile_duration_seconds_count" in exposition
