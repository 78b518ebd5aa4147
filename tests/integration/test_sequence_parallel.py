"""Ulysses sequence parallelism (`parallelism.sequence`, sequence_parallel.py) on two CPU ranks: the
same loss and gradients as plain data parallelism over the same global batch, and the real trainer
training, killed, resumed on the same samples at every step, and exported as a plain Hugging Face
model.

Without packing: with sequence parallelism packed documents are kept apart only by flash_attention_2
(both layers refuse packing under sdpa), which this CPU machine has not; sdpa in fp32 here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator import contract
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.faults import ENV_FAIL_AT_STEP
from finetune_trainer.process_group import free_port
from finetune_trainer.sample_trace import ENV_SAMPLE_TRACE
from finetune_trainer.storage import open_store

from tests.integration.test_token_weighted_loss import _why
from tests.support.sequence_equality import CLIPPING
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

ROOT = Path(__file__).resolve().parents[2]
# fp32 on CPU: the sequence-parallel step sums the same terms in another order (the logits of half a
# sequence, attention over heads gathered by all-to-all). Measured: weight changes equal to 1e-8
# against changes of up to 4e-2, losses to 2e-7; the existing cut tests' tolerance holds with room.
RTOL, ATOL = 1e-4, 1e-6


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=RTOL, atol=ATOL) for n in a)


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sequence") / "steps.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "tests.support.sequence_equality", str(out),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _why(done.stderr)
    results: dict[str, dict[str, Any]] = torch.load(out)
    return results


@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
@pytest.mark.parametrize("clipped", ["", "-clipped"], ids=["unclipped", "clipped"])
def test_sequence_parallel_2_steps_like_data_parallelism_over_the_same_global_batch(
    steps: dict[str, dict[str, Any]], stage: int, clipped: str
) -> None:
    data, sequence = steps[f"z{stage}{clipped}-dp"], steps[f"z{stage}{clipped}-sp"]
    moved = float(torch.cat([d.flatten() for d in data["delta"].values()]).norm())
    # the step moved the weights (SGD, lr 1: by the gradient), and the clipped one by the clipping norm
    assert moved == pytest.approx(CLIPPING, rel=1e-3) if clipped else moved > 10 * CLIPPING
    assert _close(data["delta"], sequence["delta"])
    assert sequence["loss"] == pytest.approx(data["loss"], rel=RTOL)
    assert sequence["eval_loss"] == pytest.approx(data["eval_loss"], rel=RTOL)


STEPS = 12
FAILED_AFTER = 6
CHANGES = {
    "spec.parallelism.sequence": 2,
    "spec.dataset.maxSeqLength": 48,
    "spec.training.maxSteps": STEPS,
    "spec.training.logEverySteps": 1,
    "spec.training.attentionImplementation": "sdpa",
    "spec.checkpoint.everySteps": 4,
    "spec.checkpoint.keepLast": 5,
}


@dataclass
class Runs:
    reference: Finished
    reference_trace: list[dict[str, Any]]
    data_parallel: Finished
    failed: Finished
    resumed: Finished
    trace: list[dict[str, Any]]
    store: CheckpointStore
    root: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Sequence parallel 2 uninterrupted (the reference, exported); the same job failing on cue after
    step 6 (rank 1 lost, 5 s after it got there, so the step-4 checkpoint commits), then
    relaunched; and the same global batch under plain data parallelism."""
    root = tmp_path_factory.mktemp("sequence-runs")
    ws = Workspace.create(root / "inputs", records=256)
    reference = start(
        trainer_config(ws, f"file://{root}/reference-store", CHANGES), root / "reference",
        env={ENV_SAMPLE_TRACE: str(root / "reference-trace")},
    ).finish()  # fmt: skip
    assert reference.code == 0, reference.output[-3000:]
    plain = {**CHANGES, "spec.parallelism.sequence": 1}
    data_parallel = start(trainer_config(ws, f"file://{root}/dp-store", plain), root / "dp").finish()
    assert data_parallel.code == 0, data_parallel.output[-3000:]

    uri, trace = f"file://{root}/store", {ENV_SAMPLE_TRACE: str(root / "trace")}
    # Transient (75), which is also what the other rank exits with when its peer's connection closes:
    # whichever rank the launcher hears of first, the run exits 75.
    fail = {**trace, ENV_FAIL_AT_STEP: f"{FAILED_AFTER}:75:1:5", contract.ENV_ATTEMPT: "1"}
    failed = start(trainer_config(ws, uri, CHANGES), root / "failed", env=fail).finish()
    resumed = start(trainer_config(ws, uri, CHANGES), root / "resumed",
                    env={**trace, contract.ENV_ATTEMPT: "2"}).finish()  # fmt: skip
    store = CheckpointStore(open_store(f"{uri}/team-a/tiny"))
    return Runs(reference, sample_trace(root / "reference-trace"), data_parallel, failed, resumed,
                sample_trace(root / "trace"), store, root)  # fmt: skip


def _per_step(output: str) -> dict[int, float]:
    return {r.progress.step: r.progress.loss for r in reports(output) if r.progress.loss is not None}


def test_sequence_parallel_run_trains_and_evaluates(runs: Runs) -> None:
    curve = _per_step(runs.reference.output)
    assert len(curve) == STEPS
    assert curve[STEPS] < 0.85 * curve[1], curve
    report = runs.reference.progress
    assert report is not None and report.progress.eval_loss is not None
    assert "world 2" in runs.reference.output
    assert "sequence parallel 2 (Ulysses over sdpa)" in runs.reference.output


def test_reported_loss_is_that_of_data_parallelism_over_the_same_batches(runs: Runs) -> None:
    """Not counted once per rank of a group: the token-weighted loss of the whole sequences."""
    sequence, data = _per_step(runs.reference.output), _per_step(runs.data_parallel.output)
    differences = {step: abs(sequence[step] - data[step]) for step in data}
    print({step: (data[step], sequence[step]) for step in data})  # the figures, with -rP
    assert max(differences.values()) <= 1e-4, differences
    sequence_eval = runs.reference.progress.progress.eval_loss  # type: ignore[union-attr]
    data_eval = runs.data_parallel.progress.progress.eval_loss  # type: ignore[union-attr]
    assert sequence_eval == pytest.approx(data_eval, abs=1e-4)


def test_both_ranks_of_the_group_train_the_same_examples(runs: Runs) -> None:
    trained = last_trained(runs.reference_trace)
    assert {rank for _, rank in trained} == {0, 1}
    for step in range(1, STEPS + 1):
        assert trained[(step, 0)] == trained[(step, 1)]
        assert len(trained[(step, 0)]) == 16  # the whole global batch: one data-parallel rank


def test_killed_run_resumes_from_its_checkpoint_on_the_same_samples_at_every_step(runs: Runs) -> None:
    assert runs.failed.code == contract.ExitCode.TRANSIENT, runs.failed.output[-3000:]
    assert f"test fault: rank 1 failed after step {FAILED_AFTER}" in runs.failed.output
    assert runs.resumed.code == 0, runs.resumed.output[-3000:]
    assert "resuming at step 4 of 12" in runs.resumed.output
    assert last_trained(runs.trace) == last_trained(runs.reference_trace)
    reference, resumed = _per_step(runs.reference.output), _per_step(runs.resumed.output)
    after = range(5, STEPS + 1)
    assert max(abs(resumed[step] - reference[step]) for step in after) <= 1e-4, (reference, resumed)


def test_export_is_a_plain_hugging_face_model_of_the_trained_weights(runs: Runs) -> None:
    """Sequence parallelism shards no weight: the export is the usual one, and reproduces the logits
    of the last checkpoint's weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    job = open_store(f"file://{runs.root}/reference-store/team-a/tiny")
    final = runs.root / "final"
    for obj in job.list("final/"):
        job.get_file(obj.key, final / obj.key.removeprefix("final/"))
    exported = AutoModelForCausalLM.from_pretrained(final)
    store = CheckpointStore(job)
    step = store.committed_steps()[-1]
    assert step == STEPS
    store.download(store.manifest(step), runs.root / "ckpt" / f"step-{step:08d}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(runs.root / "ckpt"), tag=f"step-{step:08d}")
    reference = AutoModelForCausalLM.from_config(exported.config)
    reference.load_state_dict(state)
    ids = torch.randint(0, exported.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
