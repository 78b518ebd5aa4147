"""A real `ftjob run` owns its ranks: SIGKILLed, every process of its two training ranks (the launchers
and torchrun's workers, which run in sessions of their own) ends within a bounded wait; and while it
lives, a second `ftjob run` of the same workdir is refused instead of starting a second gang."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from finetune_operator.cli_errors import EXIT_BUSY
from finetune_operator.rank_supervisor import descendants

from tests.support.processes import alive, ftjob_run, until
from tests.support.trainer_run import Workspace, tiny_job_manifest

pytestmark = pytest.mark.slow
START_TIMEOUT = 300.0  # the ranks import torch and load the model on two shared cores
# The ranks' SIGTERM grace (runPolicy's, less the launcher's margin) plus the supervisor's margin and
# its polls: past this, a process left is a rank that outlived its run.
GONE_TIMEOUT = 60.0


def _training(workdir: Path) -> bool:
    logs = [workdir / "logs" / f"tiny-a1-n{rank}.log" for rank in (0, 1)]
    return all(log.exists() for log in logs) and bool(
        re.search(r'FTJOB_PROGRESS \{"progress":\{"step":\d+', logs[0].read_text(errors="replace"))
    )


@pytest.fixture
def training_run(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """`ftjob run` of two node ranks, long enough to be killed while it trains."""
    ws = Workspace.create(tmp_path / "ws", records=512)
    changes = {
        "spec.resources.nodes": 2,
        "spec.resources.processesPerNode": 1,
        "spec.training.maxSteps": 100000,
        "spec.training.logEverySteps": 1,
        "spec.runPolicy.terminationGracePeriodSeconds": 15,
    }
    job = tiny_job_manifest(ws, f"file://{tmp_path / 'store'}", changes)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "run"
    proc = ftjob_run(manifest, workdir, tmp_path / "first.out")
    try:
        until(lambda: _training(workdir) or proc.poll() is not None, START_TIMEOUT, "both ranks training")
        assert proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
        yield proc, manifest
    finally:
        tree = descendants(proc.pid)
        proc.kill()
        proc.wait(30)
        for pid in tree:  # the test failed: do not leave its ranks to the rest of the suite
            if alive(pid):
                os.kill(pid, 9)


def test_sigkill_of_ftjob_run_ends_every_process_of_its_ranks(
    training_run: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, _ = training_run
    tree = descendants(proc.pid)
    assert len(tree) >= 6, f"2 x (supervisor, launcher, worker) expected below ftjob run, got {tree}"
    proc.kill()
    proc.wait(30)
    until(lambda: not any(alive(pid) for pid in tree), GONE_TIMEOUT, f"every rank process of {tree} gone")


def test_a_second_ftjob_run_of_a_running_job_is_refused(
    training_run: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    proc, manifest = training_run
    ranks = descendants(proc.pid)
    second = ftjob_run(manifest, tmp_path / "run", tmp_path / "second.out")
    assert second.wait(60) == EXIT_BUSY
    assert "is in use by another `ftjob run`" in (tmp_path / "second.out").read_text()
    assert proc.poll() is None and all(alive(pid) for pid in ranks), "the first run goes on untouched"
