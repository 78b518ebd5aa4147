"""Killed, preempted and corrupted: a run that is interrupted every way a cluster interrupts it
trains on exactly the samples an uninterrupted run trains on, and ends at the same loss.

One scenario, six launches of two CPU ranks each:
  reference: uninterrupted, one epoch;
  snapshot:  SIGKILL to rank 1 while a checkpoint is being snapshotted to host memory;
  write:     relaunched, resumes; SIGKILL to rank 0 while that checkpoint is written to local disk
             behind training;
  killed:    SIGKILL to rank 0 (the node's uploader) while a checkpoint is half uploaded over a slow link;
  preempted: relaunched, resumes, then SIGTERM to the launcher as the kubelet sends it, while a checkpoint
             is being snapshotted -> emergency checkpoint, exit 143;
  finished:  the newest checkpoint corrupted first; relaunched, skips it, resumes and finishes.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from finetune_operator import contract
from finetune_trainer.checkpoint_store import CheckpointStore, step_dir
from finetune_trainer.snapshot import ENV_TEST_PAUSE
from finetune_trainer.storage import open_store

from tests.support.s3 import S3Endpoint
from tests.support.slow_link import slow_link
from tests.support.trainer_run import (
    Finished,
    Workspace,
    last_trained,
    losses,
    reports,
    sample_trace,
    start,
    trainer_config,
    worker_pid,
)

pytestmark = pytest.mark.slow

EVERY = 3
CHANGES = {
    "spec.training.maxSteps": None,  # one epoch
    "spec.training.epochs": 1,
    "spec.checkpoint.everySteps": EVERY,
    "spec.training.logEverySteps": 1,
}


@dataclass
class StageKill:
    """A launch killed while a checkpoint was in `stage`, and what the store held right after."""

    stage: str
    finished: Finished
    step: int
    committed_at_kill: list[int]


@dataclass
class Scenario:
    reference: Finished
    reference_trace: list[dict[str, Any]]
    stage_kills: list[StageKill]
    killed: Finished
    killed_during_upload_of: int
    committed_at_kill: list[int]
    preempted: Finished
    committed_at_preemption: list[int]
    corrupted: int
    finished: Finished
    trace: list[dict[str, Any]]
    store: CheckpointStore


def _uncommitted_with_files(store: CheckpointStore) -> int | None:
    committed = set(store.committed_steps())
    for obj in store.store.list("checkpoints/"):
        step = int(obj.key.split("/")[1][5:])
        if step not in committed and obj.key.split("/")[2] != "nodes":
            return step
    return None


def _corrupt_one_file(store: CheckpointStore, step: int, scratch: Path) -> None:
    """Same size, different bytes: only the checksum can tell."""
    entry = store.manifest(step).files[0]
    key = f"{step_dir(step)}/{entry.path}"
    local = scratch / "corrupt.bin"
    store.store.get_file(key, local)
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    local.write_bytes(bytes(data))
    store.store.put_file(local, key)


@dataclass
class Reference:
    workspace: Workspace
    finished: Finished
    trace: list[dict[str, Any]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """One uninterrupted epoch: what every interrupted run is compared with."""
    root = tmp_path_factory.mktemp("reference")
    ws = Workspace.create(root / "inputs", records=400)
    finished = start(
        trainer_config(ws, f"file://{root}/store", CHANGES),
        root / "run",
        env={"FTJOB_SAMPLE_TRACE": str(root / "trace")},
    ).finish()
    assert finished.code == 0, finished.output[-3000:]
    return Reference(workspace=ws, finished=finished, trace=sample_trace(root / "trace"))


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory, s3_module_env: S3Endpoint, reference: Reference
) -> Scenario:
    s3 = s3_module_env
    root = tmp_path_factory.mktemp("recovery")
    ws = reference.workspace

    bucket = s3.new_bucket()
    store = CheckpointStore(open_store(f"s3://{bucket}/runs/team-a/tiny"), poll_seconds=0.02)
    trace_env = {**s3.env(), "FTJOB_SAMPLE_TRACE": str(root / "trace")}
    direct = trainer_config(ws, f"s3://{bucket}/runs", {**CHANGES, "spec.checkpoint.endpointUrl": s3.url})
    stage_kills = [
        _kill_during(direct, root, store, trace_env, "snapshot", rank=1, attempt=1),
        _kill_during(direct, root, store, trace_env, "write", rank=0, attempt=2),
    ]
    upstream = urlparse(s3.url)
    with slow_link(upstream.hostname or "", upstream.port or 0, upload_delay=0.02) as slow_url:
        config = trainer_config(
            ws, f"s3://{bucket}/runs", {**CHANGES, "spec.checkpoint.endpointUrl": slow_url}
        )
        run = start(config, root / "killed", env={**trace_env, contract.ENV_ATTEMPT: "3"})
        newest_before = max(store.committed_steps(), default=0)
        run.wait_for(lambda _: max(store.committed_steps(), default=0) > newest_before)
        in_flight: list[int] = []

        def uploading(_: str) -> bool:
            step = _uncommitted_with_files(store)
            if step is not None:
                in_flight.append(step)
            return step is not None

        run.wait_for(uploading, 120)
        os.kill(worker_pid(run, 0), signal.SIGKILL)
        killed = run.finish()
        committed_at_kill = store.committed_steps()

    # Preempted while its first checkpoint after resuming is held in its snapshot: the steps after it
    # are still to come, so the signal lands mid-training however fast the steps run.
    resumed_at = max(committed_at_kill)
    pause = re.compile(r"checkpoint step (\d+): paused [\d.]+s in snapshot")
    held = {**trace_env, ENV_TEST_PAUSE: "snapshot:3", contract.ENV_ATTEMPT: "4"}
    run = start(direct, root / "preempted", env=held)
    run.wait_for(lambda out: any(int(s) > resumed_at for s in pause.findall(out)))
    run.signal(signal.SIGTERM)
    preempted = run.finish()
    committed_at_preemption = store.committed_steps()
    config = direct

    corrupted = committed_at_preemption[-1]
    _corrupt_one_file(store, corrupted, root)
    finished = start(config, root / "finished", env={**trace_env, contract.ENV_ATTEMPT: "5"}).finish()
    return Scenario(
        reference=reference.finished,
        reference_trace=reference.trace,
        stage_kills=stage_kills,
        killed=killed,
        killed_during_upload_of=in_flight[0],
        committed_at_kill=committed_at_kill,
        preempted=preempted,
        committed_at_preemption=committed_at_preemption,
        corrupted=corrupted,
        finished=finished,
        trace=sample_trace(root / "trace"),
        store=store,
    )


def _kill_during(config: Any, root: Path, store: CheckpointStore, env: dict[str, str], stage: str, *,
                 rank: int, attempt: int) -> StageKill:  # fmt: skip
    """Launch with every checkpoint held 3 s in `stage`; SIGKILL `rank` while the first checkpoint
    after the newest commit (one committed before this launch, or its own first) is in it."""
    committed_before = max(store.committed_steps(), default=0)
    pause = re.compile(rf"checkpoint step (\d+): paused [\d.]+s in {stage}")
    held_env = {**env, ENV_TEST_PAUSE: f"{stage}:3", contract.ENV_ATTEMPT: str(attempt)}
    run = start(config, root / stage, env=held_env)
    held: list[int] = []

    def in_stage(out: str) -> bool:
        newest = max(store.committed_steps(), default=0)
        held[:] = [s for s in map(int, pause.findall(out)) if s > max(newest, committed_before)]
        return bool(held) and newest > 0

    run.wait_for(in_stage, 180)
    os.kill(worker_pid(run, rank), signal.SIGKILL)
    finished = run.finish()
    return StageKill(stage, finished, held[0], store.committed_steps())


@pytest.mark.parametrize("stage", ["snapshot", "write"])
def test_sigkill_in_a_checkpoint_stage_leaves_that_step_uncommitted(scenario: Scenario, stage: str) -> None:
    kill = next(k for k in scenario.stage_kills if k.stage == stage)
    assert kill.finished.code == 128 + signal.SIGKILL, kill.finished.output[-3000:]
    assert kill.step not in kill.committed_at_kill and kill.committed_at_kill


def test_after_a_kill_in_the_write_the_relaunch_resumed_from_the_commit_before(scenario: Scenario) -> None:
    after_snapshot_kill = max(scenario.stage_kills[0].committed_at_kill)
    assert f"resuming at step {after_snapshot_kill} of" in scenario.stage_kills[1].finished.output


def test_sigkill_during_an_upload_leaves_that_step_uncommitted(scenario: Scenario) -> None:
    assert scenario.killed.code == 128 + signal.SIGKILL
    assert scenario.killed_during_upload_of not in scenario.committed_at_kill
    assert "SIGKILL" in scenario.killed.termination


def test_the_relaunch_resumes_from_the_newest_committed_checkpoint(scenario: Scenario) -> None:
    assert f"resuming at step {max(scenario.stage_kills[-1].committed_at_kill)} of" in scenario.killed.output
    assert f"resuming at step {max(scenario.committed_at_kill)} of" in scenario.preempted.output


def test_sigterm_leaves_an_emergency_checkpoint_and_exits_143(scenario: Scenario) -> None:
    assert scenario.preempted.code == contract.ExitCode.TERMINATED
    assert scenario.preempted.termination.startswith("terminated: emergency checkpoint at step")
    step = int(scenario.preempted.termination.split("step ")[1].split()[0])
    assert step == scenario.committed_at_preemption[-1]


def test_the_emergency_save_was_planned_against_the_shutdown_timeout_and_started(scenario: Scenario) -> None:
    # The launcher's 60 s (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) holds it; a save that cannot fit is
    # test_emergency_checkpoint_plan.py's.
    assert re.search(r"emergency checkpoint of step \d+: .*\d+s left", scenario.preempted.output)


def test_a_corrupted_checkpoint_is_skipped_with_a_warning(scenario: Scenario) -> None:
    assert f"skipping checkpoint step {scenario.corrupted}" in scenario.finished.output
    assert f"resuming at step {scenario.committed_at_preemption[-2]} of" in scenario.finished.output
    assert scenario.finished.code == 0, scenario.finished.output[-3000:]


def test_keep_last_holds_across_restarts(scenario: Scenario) -> None:
    assert len(scenario.store.committed_steps()) <= 2
    assert len(scenario.committed_at_preemption) <= 2


def test_every_step_trained_on_the_same_samples_as_the_uninterrupted_run(scenario: Scenario) -> None:
    reference, interrupted = last_trained(scenario.reference_trace), last_trained(scenario.trace)
    assert interrupted == reference
    epoch = Counter(i for ids in interrupted.values() for i in ids)
    assert max(epoch.values()) == 1  # one epoch: no sample twice


def test_the_final_loss_matches_the_uninterrupted_run(scenario: Scenario) -> None:
    assert losses(scenario.finished.output)[-1] == pytest.approx(
        losses(scenario.reference.output)[-1], rel=0.02
    )


def test_a_relaunch_does_not_tokenize_again(scenario: Scenario) -> None:
    assert "not tokenizing again" in scenario.preempted.output
    assert "not tokenizing again" not in scenario.stage_kills[0].finished.output


@dataclass
class RandomKill:
    seed: int
    committed_at_kill: list[int]
    killed: Finished
    relaunched: Finished
    trace: list[dict[str, Any]]


@pytest.fixture(scope="module")
def random_kill(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> RandomKill:
    """SIGKILL to rank 1 at a random moment of training (the seed is in every failure message): in the
    first half of the run, so rank 1 is surely still training whatever the machine's speed."""
    seed = int(os.environ.get("FTJOB_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    total = reports(reference.finished.output)[-1].progress.total_steps
    assert total is not None and total > 2 * EVERY
    after_step = rng.randrange(1, total // 2)
    delay = rng.uniform(0.0, 0.3)  # somewhere inside the steps that follow
    root = tmp_path_factory.mktemp("random-kill")
    config = trainer_config(reference.workspace, f"file://{root}/store", CHANGES)
    env = {"FTJOB_SAMPLE_TRACE": str(root / "trace")}
    store = CheckpointStore(open_store(f"file://{root}/store/team-a/tiny"))
    run = start(config, root / "killed", env={**env, contract.ENV_ATTEMPT: "1"})
    run.wait_for(lambda out: any((r.progress.step or 0) >= after_step for r in reports(out)))
    time.sleep(delay)  # the random moment itself, not a wait for a condition
    os.kill(worker_pid(run, 1, timeout=10), signal.SIGKILL)
    killed = run.finish()
    assert killed.code != 0, f"seed {seed}: the run ended before the kill at step {after_step}"
    committed = store.committed_steps()
    relaunched = start(config, root / "relaunched", env={**env, contract.ENV_ATTEMPT: "2"}).finish()
    return RandomKill(seed, committed, killed, relaunched, sample_trace(root / "trace"))


def test_after_a_random_sigkill_the_relaunch_resumes_from_the_newest_commit(random_kill: RandomKill) -> None:
    newest = max(random_kill.committed_at_kill, default=0)
    expected = f"resuming at step {newest} of" if newest else "starting at step 0 of"
    assert random_kill.relaunched.code == 0, f"seed {random_kill.seed}"
    assert expected in random_kill.relaunched.output, f"seed {random_kill.seed}"


def test_after_a_random_sigkill_every_step_trained_on_the_reference_samples(
    random_kill: RandomKill, reference: Reference
) -> None:
    assert last_trained(random_kill.trace) == last_trained(reference.trace), f"seed {random_kill.seed}"
