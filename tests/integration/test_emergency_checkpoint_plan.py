"""A SIGTERM whose grace period cannot hold the emergency checkpoint: the real trainer, two CPU ranks,
every checkpoint held SAVE_PAUSE seconds in its upload (snapshot.py's test hook), and a shutdown
timeout SHUTDOWN_TIMEOUT that the measured save (x1.25 + 2 s, policy/grace.py) does not fit but that
leaves the ranks time to decide and exit before the launcher's SIGKILL. The ranks skip the save,
say why, exit 143, and a relaunch resumes from the last committed checkpoint and finishes.

That a save that fits is still taken (the trainer's default 60 s timeout) is
test_trainer_recovery.py's preempted case: SIGTERM -> emergency checkpoint committed -> exit 143.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

import pytest
from finetune_operator import contract
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.snapshot import ENV_TEST_PAUSE
from finetune_trainer.storage import open_store

from tests.support.trainer_run import Finished, Workspace, reports, start, trainer_config

pytestmark = pytest.mark.slow

SAVE_PAUSE = 8
# Under 8 x 1.25 + 2 = 12: the save does not fit; over 8: a rank blocked on the previous save's tail
# still decides and exits before the launcher's SIGKILL.
SHUTDOWN_TIMEOUT = 11
CHANGES = {
    "spec.training.maxSteps": 24,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 4,
    "spec.checkpoint.keepLast": 3,
}
SAVED = re.compile(r"checkpoint step (\d+): saved in ([\d.]+)s from start to commit")


@dataclass
class Preempted:
    stopped: Finished
    committed: list[int]  # in the store when the stopped run had exited
    resumed: Finished


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> Preempted:
    root = tmp_path_factory.mktemp("grace")
    ws = Workspace.create(root / "inputs", records=400)
    config = trainer_config(ws, f"file://{root}/store", CHANGES)
    slow = {ENV_TEST_PAUSE: f"upload:{SAVE_PAUSE}", contract.ENV_SHUTDOWN_TIMEOUT: str(SHUTDOWN_TIMEOUT)}
    run = start(config, root / "stopped", env=slow)
    run.wait_for(lambda out: SAVED.search(out) is not None)  # a save was measured
    run.signal(signal.SIGTERM)
    stopped = run.finish(timeout=120)
    store = CheckpointStore(open_store(f"file://{root}/store/team-a/tiny"))
    committed = store.committed_steps()
    resumed = start(config, root / "resumed", env={contract.ENV_ATTEMPT: "2"}).finish()
    return Preempted(stopped=stopped, committed=committed, resumed=resumed)


def _stopped_at(finished: Finished) -> int:
    match = re.match(r"terminated at step (\d+): ", finished.termination)
    assert match, finished.termination
    return int(match.group(1))


def test_the_rank_exits_143_with_the_reason_saying_the_save_was_skipped(preempted: Preempted) -> None:
    assert preempted.stopped.code == contract.ExitCode.TERMINATED, preempted.stopped.output[-3000:]
    assert "emergency checkpoint skipped" in preempted.stopped.termination


def test_the_log_names_the_last_saves_duration_the_time_left_and_the_last_commit(
    preempted: Preempted,
) -> None:
    line = re.search(
        r"emergency checkpoint skipped: the last save took (\d+)s(?: \(and \d+s for the save still in "
        r"flight\))?, (\d+)s left before the grace period ends .*; "
        r"the last committed checkpoint is step (\d+)",
        preempted.stopped.output,
    )
    assert line, preempted.stopped.output[-3000:]
    took, left, step = (int(g) for g in line.groups())
    assert took >= SAVE_PAUSE and left <= SHUTDOWN_TIMEOUT
    assert step in preempted.committed


def test_the_emergency_save_is_not_started(preempted: Preempted) -> None:
    stopped = _stopped_at(preempted.stopped)
    assert "until committed" not in preempted.stopped.output  # a blocking save's own log line
    assert stopped not in preempted.committed


def test_rank_zero_reported_the_measured_save_in_its_progress(preempted: Preempted) -> None:
    durations = [
        r.latest_checkpoint.duration_seconds
        for r in reports(preempted.stopped.output)
        if r.latest_checkpoint is not None
    ]
    assert durations and all(d is not None and d >= SAVE_PAUSE for d in durations)


def test_the_relaunch_resumes_from_the_last_committed_checkpoint_and_finishes(preempted: Preempted) -> None:
    assert preempted.resumed.code == 0, preempted.resumed.output[-3000:]
    assert f"resuming at step {max(preempted.committed)} of" in preempted.resumed.output


def test_the_skip_leaves_the_committed_checkpoints_intact(preempted: Preempted) -> None:
    # The relaunch checked the newest one against its manifest; a torn one is skipped with a warning.
    assert "skipping checkpoint step" not in preempted.resumed.output
    assert "skipping torn checkpoint" not in preempted.resumed.output
