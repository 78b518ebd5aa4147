"""`ftjob list` and `ftjob logs` against a cluster, through the user's kubeconfig (the emulated API
server here, with the operator and the test kubelet running a job)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from finetune_operator.cli import main

from tests.support.factories import kubeconfig, manifest
from tests.support.kubelet import Rank, script
from tests.support.operator import running

NS = "team-a"
FAST = {"spec.resources.nodes": 2, "spec.runPolicy.backoffBaseSeconds": 1}


@pytest.mark.asyncio
async def test_list_and_logs_read_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running(script(Rank(exit_code=None)), manifest(FAST, name="demo", namespace=NS)) as k8s:
        await k8s.phase(NS, "demo", "Running")
        await k8s.eventually(
            lambda: "FTJOB_PROGRESS" in k8s.cluster.pod_logs.get((NS, "demo-a1-n0"), ""),
            what="rank 0 reports progress",
        )
        where = ["--kubeconfig", str(kubeconfig(tmp_path, k8s.url))]

        assert await asyncio.to_thread(main, ["list", "-n", NS, *where]) == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header.split()[:3] == ["NAME", "PHASE", "NODES"]
        assert row.split()[:3] == ["demo", "Running", "2"]

        assert await asyncio.to_thread(main, ["list", "-A", *where]) == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header.split()[:2] == ["NAMESPACE", "NAME"] and row.split()[:2] == [NS, "demo"]

        assert await asyncio.to_thread(main, ["logs", "demo", "-n", NS, *where]) == 0
        assert "some trainer output" in capsys.readouterr().out

        k8s.cluster.pod_logs[(NS, "demo-a1-n1")] = "rank one here\n"
        assert await asyncio.to_thread(main, ["logs", "demo", "-n", NS, "--rank", "1", *where]) == 0
        assert capsys.readouterr().out == "rank one here\n"

        assert await asyncio.to_thread(main, ["logs", "demo", "-n", NS, "--attempt", "7", *where]) == 1
        assert "no pod demo-a7-n0 in namespace team-a" in capsys.readouterr().err

        assert await asyncio.to_thread(main, ["logs", "other", "-n", NS, *where]) == 1
        assert "no FineTuneJob 'other'" in capsys.readouterr().err
