"""Packing under the real trainer: two CPU ranks train packed windows of whole examples, and a run
preempted mid-way (SIGTERM, emergency checkpoint) and relaunched trains every step on exactly the
windows an uninterrupted run trains on (the bins are a pure function of the cached data)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract

from tests.support.trainer_run import (
    Workspace,
    last_trained,
    losses,
    reports,
    sample_trace,
    start,
    trainer_config,
)

pytestmark = pytest.mark.slow

CHANGES = {
    "spec.dataset.packing": True,
    "spec.dataset.maxSeqLength": 64,
    "spec.training.microBatchSize": 2,
    "spec.training.globalBatchSize": 4,
    "spec.training.maxSteps": 18,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 5,
}


def _run(ws: Workspace, root: Path, attempt: str, stop_after: int | None = None) -> Any:
    config = trainer_config(ws, f"file://{root}/store", CHANGES)
    env = {"FTJOB_SAMPLE_TRACE": str(root / "trace"), contract.ENV_ATTEMPT: attempt}
    run = start(config, root / f"run-{attempt}", env=env)
    if stop_after is not None:
        run.wait_for(lambda out: any((r.progress.step or 0) >= stop_after for r in reports(out)))
        run.proc.send_signal(signal.SIGTERM)
    return run.finish()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(tmp_path_factory.mktemp("inputs"), records=160)


def test_a_preempted_packed_run_resumes_on_exactly_the_same_windows(
    workspace: Workspace, tmp_path: Path
) -> None:
    reference = _run(workspace, tmp_path / "reference", "0")
    assert reference.code == 0, reference.output[-3000:]
    preempted = _run(workspace, tmp_path / "preempted", "1", stop_after=2)
    assert preempted.code == 143, preempted.output[-3000:]
    relaunched = _run(workspace, tmp_path / "preempted", "2")
    assert relaunched.code == 0 and "resuming at step" in relaunched.output, relaunched.output[-3000:]
    trained = last_trained(sample_trace(tmp_path / "preempted" / "trace"))
    assert trained == last_trained(sample_trace(tmp_path / "reference" / "trace"))
    assert any("+" in window for ids in trained.values() for window in ids)  # examples were packed
    report = json.loads(
        next(line for line in reference.output.splitlines() if "data: {" in line).split("data: ", 1)[1]
    )
    assert report["paddingShare"]["train"] < 0.2
    assert losses(relaunched.output)
