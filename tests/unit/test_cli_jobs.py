"""`ftjob list` and `ftjob logs` on local runs, and every command quiet when its reader goes away."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import podlogs
from finetune_operator.api import FineTuneJobStatus, parse_manifest
from finetune_operator.backends.local import LocalBackend
from finetune_operator.cli import main
from finetune_operator.policy.actions import CreateAttempt

from tests.support.factories import manifest
from tests.support.kubelet import Rank, script
from tests.support.local import scripted_spawner

FTJOB = Path(sys.executable).parent / "ftjob"


def _local_job(
    workdir: Path, name: str = "demo", phase: str = "Running", attempt: int = 1, nodes: int = 2
) -> LocalBackend:
    """A local run's workdir holding a job with this status, through the backend that owns it."""
    backend = LocalBackend(workdir, spawn=scripted_spawner(script(Rank(exit_code=None))))
    job = backend.submit(manifest({"spec.resources.nodes": nodes}, name=name), datetime.now(UTC))
    status = FineTuneJobStatus.model_validate({"phase": phase, "attempt": attempt, "restarts": attempt - 1})
    assert asyncio.run(backend.write_status(job, status))
    return backend


class TestList:
    def test_lists_every_local_run_with_the_printer_columns(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _local_job(tmp_path / "runs" / "a", name="alpha", phase="Succeeded")
        _local_job(tmp_path / "runs" / "b", name="beta", phase="Restarting", attempt=3)
        (tmp_path / "runs" / "not-a-run").mkdir()
        assert main(["list", "--root", str(tmp_path / "runs")]) == 0
        header, *rows = capsys.readouterr().out.splitlines()
        columns = [
            "NAME", "PHASE", "NODES", "STEP", "PROGRESS", "LOSS",
            "RESTARTS", "INFRA-RESTARTS", "CHECKPOINT", "AGE",
        ]  # fmt: skip
        assert header.split() == columns
        assert [r.split()[:3] for r in rows] == [["alpha", "Succeeded", "2"], ["beta", "Restarting", "2"]]

    def test_wide_adds_the_columns_kubectl_shows_with_o_wide(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        _local_job(tmp_path / "runs" / "a", attempt=3)
        assert main(["list", "--root", str(tmp_path / "runs"), "-o", "wide"]) == 0
        header = capsys.readouterr().out.splitlines()[0].split()
        assert {"ATTEMPT", "INFRA-RESTARTS", "ETA", "TOKENS/S", "REASON"} <= set(header)

    def test_no_runs_says_where_it_looked(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["list", "--root", str(tmp_path / "nothing")]) == 0
        captured = capsys.readouterr()
        assert captured.out == "" and "No FineTuneJobs in" in captured.err and "-n NAMESPACE" in captured.err


class TestLogs:
    def test_prints_rank_zero_of_the_current_attempt(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        backend = _local_job(tmp_path, attempt=2)
        backend.log_path("demo-a1-n0").parent.mkdir(parents=True, exist_ok=True)
        backend.log_path("demo-a1-n0").write_text("attempt one\n")
        backend.log_path("demo-a2-n0").write_text("attempt two, rank zero\n")
        backend.log_path("demo-a2-n1").write_text("attempt two, rank one\n")
        assert main(["logs", "demo", "--workdir", str(tmp_path)]) == 0
        assert capsys.readouterr().out == "attempt two, rank zero\n"
        assert main(["logs", "demo", "--workdir", str(tmp_path), "--rank", "1"]) == 0
        assert capsys.readouterr().out == "attempt two, rank one\n"
        assert main(["logs", "demo", "--workdir", str(tmp_path), "--attempt", "1"]) == 0
        assert capsys.readouterr().out == "attempt one\n"

    @pytest.mark.parametrize(
        "args,why",
        [
            (["--rank", "2"], "node ranks 0..1, not 2"),
            (["--attempt", "5"], "no log for pod demo-a5-n0"),
        ],
    )
    def test_a_missing_rank_or_attempt_is_an_error_that_says_why(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], why: str
    ) -> None:
        _local_job(tmp_path)
        assert main(["logs", "demo", "--workdir", str(tmp_path), *args]) == 1
        assert why in capsys.readouterr().err

    def test_a_job_that_never_started_has_no_logs_yet(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        LocalBackend(tmp_path).submit(manifest(), datetime.now(UTC))  # applied, no status yet
        assert main(["logs", "demo", "--workdir", str(tmp_path)]) == 1
        assert "has not started a gang yet" in capsys.readouterr().err

    def test_a_workdir_without_a_job_says_so(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["logs", "demo", "--workdir", str(tmp_path / "empty")]) == 1
        assert "no job in" in capsys.readouterr().err

    def test_follow_prints_what_the_rank_writes_until_its_process_ends(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(podlogs, "POLL_SECONDS", 0.05)
        backend = _local_job(tmp_path, nodes=1)
        backend.spawn = scripted_spawner(script(Rank(exit_code=0, after=1.5)))
        job = LocalBackend(tmp_path).read_job()
        assert job is not None
        asyncio.run(backend.apply(parse_manifest(job), CreateAttempt(attempt=1, ranks=(0,))))
        process = backend.children["demo-a1-n0"]
        result: list[int] = []
        follower = threading.Thread(
            target=lambda: result.append(main(["logs", "demo", "--workdir", str(tmp_path), "-f"]))
        )
        follower.start()
        try:
            with backend.log_path("demo-a1-n0").open("a") as log:  # written while it is followed
                log.write("step 1 loss 2.0\n")
            assert process.wait(timeout=30) == 0  # reaped, as the running `ftjob run` would
            follower.join(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert not follower.is_alive() and result == [0]
        out = capsys.readouterr().out
        assert "rank started" in out and "step 1 loss 2.0" in out


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _closed_pipe_run(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ftjob writing into a pipe whose reader has gone (`| head` after its lines), so every write
    meets EPIPE whatever the pipe's buffer holds."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([str(FTJOB), *args], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)


def _big_log(tmp_path: Path) -> Path:
    backend = _local_job(tmp_path / "run")
    backend.log_path("demo-a1-n0").parent.mkdir(parents=True, exist_ok=True)
    backend.log_path("demo-a1-n0").write_text("a trainer line\n" * 100_000)  # well past a pipe's buffer
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["render", "crd", "docs", "logs", "logs -f", "list"])
def test_every_command_is_quiet_when_its_reader_goes_away(tmp_path: Path, command: str) -> None:
    big_job = _write(tmp_path / "job.yaml", manifest({"spec.resources.nodes": 64}))
    args = {
        "render": ["render", str(big_job)],  # 64 pods: far more than a pipe holds
        "crd": ["crd"],
        "docs": ["docs"],
        "logs": ["logs", "demo", "--workdir", str(_big_log(tmp_path))],
        "logs -f": ["logs", "demo", "--workdir", str(_big_log(tmp_path)), "-f"],
        "list": ["list", "--root", str(tmp_path / "runs")],
    }[command]
    if command == "list":
        for i in range(3):
            _local_job(tmp_path / "runs" / f"job-{i:03d}", name=f"job-{i:03d}")
    result = _closed_pipe_run(args)
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == 0
