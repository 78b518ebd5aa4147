"""`ftjob run` end to end with the real trainer: two node ranks as local process groups on CPU. A rank's
process group killed from outside (as a lost node kills it) restarts the gang, which resumes from the
last committed checkpoint and succeeds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import ftjob_run
from tests.support.trainer_run import Workspace, tiny_job_manifest

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 480.0


def _until(check: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"ftjob run exited {proc.returncode} before: {what}")
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def _log(workdir: Path, pod: str) -> str:
    path = workdir / "logs" / f"{pod}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _committed(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"checkpoint step (\d+) committed", log)]


def _prepare(tmp_path: Path, changes: dict[str, Any]) -> Path:
    ws = Workspace.create(tmp_path / "ws", records=512)
    job = tiny_job_manifest(ws, f"file://{tmp_path / 'store'}", changes)
    job["metadata"]["namespace"] = "default"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _start(tmp_path: Path, changes: dict[str, Any]) -> tuple[subprocess.Popen[str], Path, Path]:
    manifest, workdir, out = _prepare(tmp_path, changes), tmp_path / "run", tmp_path / "ftjob-run.out"
    return ftjob_run(manifest, workdir, out), workdir, out


def _steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r'FTJOB_PROGRESS \{"progress":\{"step":(\d+)', log)]


BASE = {
    "spec.resources.nodes": 2,
    "spec.resources.processesPerNode": 1,
    "spec.training.maxSteps": 160,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 5,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 1,
}


def test_a_killed_rank_process_group_restarts_the_gang_from_the_last_checkpoint(tmp_path: Path) -> None:
    proc, workdir, out = _start(tmp_path, BASE)
    try:
        _until(
            lambda: _committed(_log(workdir, "tiny-a1-n0")), RUN_TIMEOUT, "a first committed checkpoint", proc
        )
        rank1 = json.loads((workdir / "pods" / "tiny-a1-n1.json").read_text())
        os.killpg(rank1["local"]["pid"], signal.SIGKILL)
        assert proc.wait(RUN_TIMEOUT) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    status = json.loads((workdir / "job.json").read_text())["status"]
    assert status["phase"] == "Succeeded"
    assert (status["restarts"], status["attempt"]) == (1, 2), status
    assert status["progress"]["step"] == 160
    first, second = _log(workdir, "tiny-a1-n0"), _log(workdir, "tiny-a2-n0")
    resumed = int(re.search(r"resuming at step (\d+)", second)[1])  # type: ignore[index]
    assert resumed == max(_committed(first)), "attempt 2 must resume from attempt 1's newest commit"
    events = [json.loads(line)["reason"] for line in (workdir / "events.jsonl").read_text().splitlines()]
    assert "RankFailed" in events and "Succeeded" in events
    assert (tmp_path / "store" / "default" / "tiny" / "final" / "MANIFEST.json").exists()
    assert (workdir / "loss.png").stat().st_size > 0
    summary = out.read_text()
    assert "NAME" in summary and "Succeeded" in summary and "loss curve:" in summary


def test_ctrl_c_stops_every_rank_with_an_emergency_checkpoint_and_the_same_command_resumes(
    tmp_path: Path,
) -> None:
    proc, workdir, out = _start(tmp_path, BASE)
    try:
        _until(
            lambda: [s for s in _steps(_log(workdir, "tiny-a1-n0")) if s >= 7], RUN_TIMEOUT, "step 7", proc
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(RUN_TIMEOUT) == 130, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((workdir / "job.json").read_text())["status"]["phase"] == "Suspended"
    assert not list((workdir / "pods").glob("*.json")), "every rank stopped"
    emergency = max(_committed(_log(workdir, "tiny-a1-n0")))
    assert emergency >= 7, "the emergency checkpoint is where training stood, not the last periodic one"

    again = ftjob_run(tmp_path / "job.yaml", workdir, tmp_path / "ftjob-run-2.out")
    try:
        assert again.wait(RUN_TIMEOUT) == 0, (tmp_path / "ftjob-run-2.out").read_text()[-4000:]
    finally:
        if again.poll() is None:
            again.kill()
    status = json.loads((workdir / "job.json").read_text())["status"]
    assert status["phase"] == "Succeeded" and status["restarts"] == 0, status
    resumed = int(re.search(r"resuming at step (\d+)", _log(workdir, "tiny-a2-n0"))[1])  # type: ignore[index]
    assert resumed == emergency
