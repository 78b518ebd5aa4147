"""Tensor parallelism (parallelism.tensor, DeepSpeed AutoTP) trains what data parallelism trains: on
2 CPU ranks, degree 2 gives the loss and the gradient of plain data parallelism over the same global
batch, packed or not, tied head or not, sft and dpo; a tensor-parallel run killed once resumes on the
same samples at the same losses, and exports a plain Hugging Face model equal to the trained one.

Tolerances: fp32 on CPU; the two layouts sum the same products in another order (row-parallel
matmuls add two halves, all-reduced), so they agree to float32 rounding: losses to 1e-6 relative,
the weights' change after one SGD step (lr 1: the gradient itself, about 0.07 at most) to 1e-6
absolute, logits to 1e-5. A resumed run repeats the uninterrupted one's arithmetic exactly, so its
losses and exported weights agree to 1e-6.
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
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.process_group import free_port
from finetune_trainer.storage import open_store

from tests.integration.test_token_weighted_loss import _why
from tests.support.trainer_run import (
    Finished,
    Workspace,
    last_trained,
    reports,
    run,
    sample_trace,
    trainer_config,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CASES = ["plain-untied", "packed-untied", "plain-tied", "dpo-untied", "dpo-tied"]


def _layout(tp: int, out: Path) -> dict[str, dict[str, Any]]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "tests.support.tp_equality", str(tp), str(out),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _why(done.stderr)
    results: dict[str, dict[str, Any]] = torch.load(out)
    return results


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[str, Any]]]:
    """One step of each case under data parallelism (2 x 1) and tensor parallelism (1 x 2)."""
    root = tmp_path_factory.mktemp("tp-equality")
    return {tp: _layout(tp, root / f"degree-{tp}" / "results.pt") for tp in (1, 2)}


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_2_gives_the_loss_and_gradient_of_data_parallelism(
    steps: dict[int, dict[str, dict[str, Any]]], case: str
) -> None:
    data, tensor = steps[1][case], steps[2][case]
    assert tensor["loss"] == pytest.approx(data["loss"], rel=1e-6)
    assert sorted(tensor["delta"]) == sorted(data["delta"])  # every weight, whole
    assert max(float(d.abs().max()) for d in data["delta"].values()) > 1e-2  # the step moved them
    for name, change in data["delta"].items():
        assert torch.allclose(tensor["delta"][name], change, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("case", CASES)
def test_the_export_of_a_tensor_parallel_model_is_a_plain_model_with_its_outputs(
    steps: dict[int, dict[str, dict[str, Any]]], case: str
) -> None:
    data, tensor = steps[1][case], steps[2][case]
    exported = tensor["export_logits"]
    assert torch.allclose(exported, data["logits"], rtol=0, atol=1e-5)  # the data-parallel model's
    if tensor["logits"].shape == exported.shape:  # a tied head split by vocabulary keeps a slice per rank
        assert torch.allclose(exported, tensor["logits"], rtol=0, atol=1e-5)  # the sharded model's own
    else:
        assert case == "plain-tied" and tensor["logits"].shape[-1] * 2 == exported.shape[-1]


# The real trainer: 2 ranks, degree 2 (one data-parallel rank of 2), fp32, ZeRO-1.
CHANGES = {
    "spec.parallelism.tensor": 2,
    "spec.deepspeed.zeroStage": 1,
    "spec.training.maxSteps": 8,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 3,
}
KILLED_AFTER = 5  # steps done when rank 0 fails (exit 75); step 3's checkpoint is the newest committed


@dataclass
class Runs:
    reference: Finished
    reference_trace: list[dict[str, Any]]
    reference_export: Path
    killed: Finished
    resumed: Finished
    trace: list[dict[str, Any]]
    export: Path
    store: CheckpointStore


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("tp-runs")
    ws = Workspace.create(root / "inputs")
    reference = run(trainer_config(ws, f"file://{root}/reference", CHANGES), root / "reference-work",
                    env={"FTJOB_SAMPLE_TRACE": str(root / "reference-trace")})  # fmt: skip
    assert reference.code == 0, reference.output[-3000:]
    config = trainer_config(ws, f"file://{root}/store", CHANGES)
    trace = {"FTJOB_SAMPLE_TRACE": str(root / "trace")}
    # Rank 0 stops 2 s after step 5 (the other rank waits in its next collective meanwhile, so step 3's
    # checkpoint commits behind it), then fails with 75; the relaunch runs without the fault.
    killed = run(config, root / "work", env={**trace, "FTJOB_TEST_FAIL_AT_STEP": f"{KILLED_AFTER}:75:0:2"})
    resumed = run(config, root / "work", env=trace)
    return Runs(
        reference=reference, reference_trace=sample_trace(root / "reference-trace"),
        reference_export=root / "reference" / "team-a" / "tiny" / "final",
        killed=killed, resumed=resumed, trace=sample_trace(root / "trace"),
        export=root / "store" / "team-a" / "tiny" / "final",
        store=CheckpointStore(open_store(f"file://{root}/store/team-a/tiny")),
    )  # fmt: skip


def test_a_killed_tensor_parallel_run_resumes_from_its_checkpoint_and_finishes(runs: Runs) -> None:
    assert runs.killed.code == 75, runs.killed.output[-3000:]
    assert runs.resumed.code == 0, runs.resumed.output[-3000:]
    assert "resuming at step 3 of 8" in runs.resumed.output


def test_its_checkpoints_hold_each_tensor_parallel_ranks_shard(runs: Runs) -> None:
    files = sorted(f.path for f in runs.store.manifest(8).files)
    assert files == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_01_optim_states.pt",
    ]


def test_the_ranks_of_the_group_train_the_same_samples_as_the_uninterrupted_run(runs: Runs) -> None:
    trained, reference = last_trained(runs.trace), last_trained(runs.reference_trace)
    assert trained == reference
    assert sorted({step for step, _ in trained}) == list(range(1, 9))
    for step in range(1, 9):
        assert trained[(step, 0)] == trained[(step, 1)]  # one data-parallel rank: both ranks train it
        assert len(trained[(step, 0)]) == 16  # the whole global batch


def _loss_by_step(output: str) -> dict[int, float]:
    return {r.progress.step: r.progress.loss for r in reports(output) if r.progress.loss is not None}


def test_the_resumed_run_repeats_the_uninterrupted_runs_losses(runs: Runs) -> None:
    """Logged every step; the resumed run logs steps 4 to 8, from the restored weights and optimizer
    state. The loss is reported once per group, not once per rank."""
    reference, resumed = _loss_by_step(runs.reference.output), _loss_by_step(runs.resumed.output)
    assert sorted(reference) == list(range(1, 9)) and sorted(resumed) == list(range(4, 9))
    assert resumed == pytest.approx({step: reference[step] for step in resumed}, rel=1e-6)
    assert 2.0 < reference[1] < 6.0  # about ln(vocabulary) at the start: counted once, not twice


def test_its_export_loads_without_deepspeed_as_the_uninterrupted_runs_model(runs: Runs) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs.export).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs.reference_export).eval()
    assert not [m for m in model.modules() if "deepspeed" in type(m).__module__]
    state, expected = model.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(expected)
    for name, weight in expected.items():
        assert torch.allclose(state[name], weight, rtol=0, atol=1e-6), name
    prompt = torch.tensor([[2, 10, 11, 12]])
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=4, do_sample=False))
