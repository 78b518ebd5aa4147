"""A job suspended at world size 2 resumes at world size 1 from its checkpoint, converted once to
DeepSpeed's universal checkpoint, and trains the same examples at every step with the loss of an
uninterrupted world-size-2 run.

Four launches of the real trainer on CPU (fp32, ZeRO-2, global batch 16 = micro 4 x 2 ranks x 2
accumulation, or micro 4 x 1 rank x 4 accumulation):
  reference: world 2, uninterrupted, 12 steps;
  suspended: world 2, SIGTERM while a checkpoint is held in its snapshot -> emergency checkpoint;
  failed:    world 1 over a half-written conversion left in the store (files, no manifest):
             converts again, loads it, then fails on cue before its first step;
  resumed:   world 1 again: reuses the committed conversion, resumes and finishes.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Any

import pytest
from finetune_operator import contract
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.faults import ENV_FAIL_AT_STEP
from finetune_trainer.snapshot import ENV_TEST_PAUSE
from finetune_trainer.storage import open_store
from finetune_trainer.universal import UniversalManifest, universal_dir

from tests.support.trainer_run import (
    Finished,
    Workspace,
    last_trained,
    reports,
    sample_trace,
    start,
    trainer_config,
)

pytestmark = pytest.mark.slow

STEPS = 12
CHANGES = {
    "spec.training.maxSteps": STEPS,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 4,
    "spec.checkpoint.keepLast": 5,  # the converted checkpoint stays in the store for the tests to read
}
WORLD_1 = {**CHANGES, "spec.resources.processesPerNode": 1}
# fp32 on CPU: the same global batch, summed in another order (two ranks' all-reduce of two micro
# batches each, against one rank accumulating four), may differ in the last bits of each gradient.
# Measured: equal to the 5 decimals the loss is reported with; 1e-4 leaves room for those bits
# over a few Adam steps, far below the loss's own step-to-step change (~0.1).
LOSS_TOLERANCE = 1e-4
PARTIAL = "zero/lm_head.weight/fp32.pt"  # what a conversion killed during its upload left behind


@dataclass
class Runs:
    reference: Finished
    reference_trace: list[dict[str, Any]]
    suspended_at: int
    failed: Finished
    resumed: Finished
    trace: list[dict[str, Any]]
    store: CheckpointStore


def _per_step(output: str) -> dict[int, float]:
    return {r.progress.step: r.progress.loss for r in reports(output) if r.progress.loss is not None}


def _examples_per_step(trace: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Each step's examples over all ranks (as the run that trained it last saw them), sorted: the
    global batch, whatever its split over ranks."""
    out: dict[int, list[str]] = {}
    for (step, _), ids in last_trained(trace).items():
        out.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in out.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("reshape")
    ws = Workspace.create(root / "inputs", records=300)
    reference = start(
        trainer_config(ws, f"file://{root}/reference-store", CHANGES), root / "reference",
        env={"FTJOB_SAMPLE_TRACE": str(root / "reference-trace")},
    ).finish()  # fmt: skip
    assert reference.code == 0, reference.output[-3000:]

    uri, trace = f"file://{root}/store", {"FTJOB_SAMPLE_TRACE": str(root / "trace")}
    store = CheckpointStore(open_store(f"{uri}/team-a/tiny"))
    run = start(trainer_config(ws, uri, CHANGES), root / "suspended",
                env={**trace, ENV_TEST_PAUSE: "snapshot:3", contract.ENV_ATTEMPT: "1"})  # fmt: skip
    run.wait_for(lambda out: re.search(r"checkpoint step \d+: paused", out) is not None)
    run.signal(signal.SIGTERM)  # what the kubelet sends when the job is suspended
    suspended = run.finish()
    assert suspended.code == contract.ExitCode.TERMINATED, suspended.output[-3000:]
    suspended_at = store.committed_steps()[-1]
    assert suspended_at < STEPS - 1

    store.store.put_bytes(f"{universal_dir(suspended_at)}/{PARTIAL}", b"half a tensor")
    # Fails right after loading (before its first step), as a rank lost then would.
    fail = {**trace, ENV_FAIL_AT_STEP: f"{suspended_at}:1", contract.ENV_ATTEMPT: "1"}
    failed_run = start(trainer_config(ws, uri, WORLD_1), root / "failed", nproc=1, env=fail).finish()
    assert failed_run.code == 1, failed_run.output[-3000:]
    resumed = start(trainer_config(ws, uri, WORLD_1), root / "resumed", nproc=1,
                    env={**trace, contract.ENV_ATTEMPT: "2"}).finish()  # fmt: skip
    assert resumed.code == 0, resumed.output[-3000:]
    return Runs(reference, sample_trace(root / "reference-trace"), suspended_at, failed_run, resumed,
                sample_trace(root / "trace"), store)  # fmt: skip


def test_resumed_run_continues_from_the_suspended_checkpoint_at_world_size_1(runs: Runs) -> None:
    for run in (runs.failed, runs.resumed):
        assert f"resuming at step {runs.suspended_at} of {STEPS}" in run.output
        assert "world 1" in run.output
    assert max(_per_step(runs.resumed.output)) == STEPS


def test_every_step_trains_the_examples_of_the_uninterrupted_run(runs: Runs) -> None:
    expected = _examples_per_step(runs.reference_trace)
    assert _examples_per_step(runs.trace) == expected
    assert len(expected) == STEPS and all(len(ids) == 16 for ids in expected.values())


def test_loss_after_the_resume_matches_the_uninterrupted_run(runs: Runs) -> None:
    reference, resumed = _per_step(runs.reference.output), _per_step(runs.resumed.output)
    after = range(runs.suspended_at + 1, STEPS + 1)
    differences = {step: abs(resumed[step] - reference[step]) for step in after}
    print({step: (reference[step], resumed[step]) for step in after})  # the figures, with -rP
    assert max(differences.values()) <= LOSS_TOLERANCE, (differences, reference, resumed)


def test_checkpoint_is_converted_once_and_reused_by_the_next_attempt(runs: Runs) -> None:
    assert "converted to a universal checkpoint (world size 2 -> 1)" in runs.failed.output
    assert "converted to a universal checkpoint" not in runs.resumed.output
    assert f"step {runs.suspended_at}: reusing its committed universal checkpoint" in runs.resumed.output
    listed = runs.store.store.list("checkpoints/")
    manifests = [o.key for o in listed if o.key.endswith("universal/MANIFEST.json")]
    assert manifests == [f"{universal_dir(runs.suspended_at)}/MANIFEST.json"]


def test_conversion_left_without_a_manifest_is_converted_again_not_loaded(runs: Runs) -> None:
    manifest = UniversalManifest.model_validate_json(
        runs.store.store.get_bytes(f"{universal_dir(runs.suspended_at)}/MANIFEST.json")
    )
    entry = next(f for f in manifest.files if f.path == PARTIAL)
    assert entry.size > len(b"half a tensor")  # the real tensor replaced what the torn one left
    assert manifest.source_world_size == 2


def test_checkpoints_saved_at_world_size_1_load_without_conversion(runs: Runs) -> None:
    newer = [s for s in runs.store.committed_steps() if s > runs.suspended_at]
    assert newer and all(runs.store.manifest(s).world_size == 1 for s in newer)
