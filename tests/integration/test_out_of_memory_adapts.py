"""Out of memory adapts, end to end in the local mode with the real trainer: a run that runs out of
memory at micro batch 8 (the trainer's test-only fault hook FTJOB_TEST_OOM_ABOVE_MICRO_BATCH, set
through the job's own env) is restarted by the operator at micro batch 4 x twice the accumulation,
succeeds, and trains exactly what an uninterrupted micro-batch-4 run with the same global batch
trains: the same examples on each rank at each step, the same losses. At micro batch 1 there is
nothing left to reduce: the job fails with OutOfMemory.

And a second opinion on the premise, without the operator: micro batch 8 x accumulation 1 and
micro batch 4 x accumulation 2 over the same global batch train the same steps (token_loss.py makes
the loss the global batch's token-weighted mean however it is cut).

One node rank of two CPU processes (world 2), global batch 16, 4 steps, fp32.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from finetune_trainer.faults import ENV_OOM_ABOVE_MICRO_BATCH
from finetune_trainer.sample_trace import ENV_SAMPLE_TRACE
from safetensors.torch import load_file

from tests.support.processes import ftjob_run
from tests.support.trainer_run import (
    Finished,
    Workspace,
    last_trained,
    losses,
    sample_trace,
    start,
    tiny_job_manifest,
    trainer_config,
)

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300.0
# The "final loss" compared is the final model's (final/, as exported) mean loss over a fixed probe
# batch, in full fp32 precision; the per-step training losses the trainer reports are rounded to 5
# decimals, and are compared too.
# The adapted attempt is the reference's configuration exactly (same micro batch, accumulation,
# world, seed and data; attempt 1 failed before its first step, so nothing is resumed): on CPU in
# fp32 that is deterministic, so the final weights are bit for bit the reference's.
# Micro 8 x 1 against 4 x 2 sums the same terms in another order (a micro batch padded to another
# longest sequence, two backward passes accumulated instead of one): fp32 rounding, ~1e-7 relative
# per operation. Measured: the final loss 1.1e-7 apart. The weights differ more (5e-5 by norm, the
# largest tensor): AdamW divides each element's update by its own gradient's magnitude, so an
# element whose gradient is mostly cancellation (rounding ~ its size) moves by a visibly different
# fraction of lr; the loss shows that this is noise, not a different training.
RECUT_REL = 1e-5
RECUT_WEIGHTS_REL = 1e-3
PROBE_SEED, PROBE_SHAPE = 11, (8, 32)
SHAPE = {
    "spec.resources.nodes": 1,
    "spec.resources.processesPerNode": 2,
    "spec.training.maxSteps": 4,
    "spec.training.globalBatchSize": 16,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 4,
    "spec.dataset.validationFraction": 0.0,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 1,
}


@dataclass
class Trained:
    """What a run trained: the examples of each (step, rank), the reported losses, the final model."""

    trace: dict[tuple[int, int], list[str]]
    losses: list[float]
    weights: dict[str, torch.Tensor]
    final_loss: float


def _trained(root: Path, output: str) -> Trained:
    final = next(root.glob("store/*/tiny/final"))
    return Trained(
        trace=last_trained(sample_trace(root / "trace")),
        losses=losses(output),
        weights=load_file(final / "model.safetensors"),
        final_loss=_probe_loss(final),
    )


def _probe_loss(final: Path) -> float:
    """The final model's mean next-token loss over a fixed batch of token ids, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(
        3, model.config.vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED)
    )
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _weights_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of a weight tensor, by norm: ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in a)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(tmp_path_factory.mktemp("oom-inputs"), records=96)


def _train(ws: Workspace, root: Path, micro: int) -> Trained:
    """The trainer alone, uninterrupted, at micro batch `micro` (accumulation 16 / (micro x 2))."""
    config = trainer_config(ws, f"file://{root}/store", {**SHAPE, "spec.training.microBatchSize": micro})
    finished: Finished = start(config, root / "run", env={ENV_SAMPLE_TRACE: str(root / "trace")}).finish()
    assert finished.code == 0, finished.output[-3000:]
    return _trained(root, finished.output)


@pytest.fixture(scope="module")
def micro_4(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(workspace, tmp_path_factory.mktemp("micro-4"), 4)


def _ftjob_run(ws: Workspace, root: Path, micro: int, oom_above: int) -> dict[str, Any]:
    """`ftjob run` of the job at micro batch `micro` on a device that fits `oom_above`; its job.json."""
    env = [
        {"name": ENV_OOM_ABOVE_MICRO_BATCH, "value": str(oom_above)},
        {"name": ENV_SAMPLE_TRACE, "value": str(root / "trace")},
    ]
    changes = {**SHAPE, "spec.training.microBatchSize": micro, "spec.resources.env": env}
    manifest = root / "job.yaml"
    manifest.write_text(yaml.safe_dump(tiny_job_manifest(ws, f"file://{root / 'store'}", changes)))
    out = root / "ftjob-run.out"
    proc = ftjob_run(manifest, root / "run", out)
    try:
        proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"ftjob run did not finish in {RUN_TIMEOUT}s:\n{out.read_text()[-3000:]}"
        ) from None
    body: dict[str, Any] = json.loads((root / "run" / "job.json").read_text())
    return body


def _events(root: Path) -> list[dict[str, str]]:
    lines = (root / "run" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _log(root: Path, pod: str) -> str:
    return (root / "run" / "logs" / f"{pod}.log").read_text(errors="replace")


@dataclass
class Adapted:
    root: Path
    status: dict[str, Any]


@pytest.fixture(scope="module")
def adapted(workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Adapted:
    """The job at micro batch 8 on a device that fits 4: attempt 1 runs out of memory."""
    root = tmp_path_factory.mktemp("adapted")
    return Adapted(root, _ftjob_run(workspace, root, micro=8, oom_above=4)["status"])


def test_out_of_memory_at_micro_batch_8_ends_succeeded_at_micro_batch_4(adapted: Adapted) -> None:
    status = adapted.status
    assert status["phase"] == "Succeeded", status
    assert (status["attempt"], status["restarts"], status["infraRestarts"]) == (2, 0, 0)
    micro = status["microBatch"]
    assert (micro["size"], micro["gradientAccumulationSteps"], micro["reason"]) == (4, 2, "OutOfMemory")
    assert "out of memory" in _log(adapted.root, "tiny-a1-n0").lower()


def test_the_adapted_run_trains_what_an_uninterrupted_micro_batch_4_run_trains(
    adapted: Adapted, micro_4: Trained
) -> None:
    run = _trained(adapted.root, _log(adapted.root, "tiny-a2-n0"))
    assert run.trace == micro_4.trace  # the same examples on each rank at each step
    assert run.losses == micro_4.losses
    assert all(torch.equal(run.weights[n], micro_4.weights[n]) for n in micro_4.weights)
    assert run.final_loss == micro_4.final_loss
    print(f"\nfinal loss: adapted 8->4 {run.final_loss!r}, uninterrupted micro 4 {micro_4.final_loss!r}")


def test_the_reduction_shows_as_a_warning_and_the_next_attempts_batch(adapted: Adapted) -> None:
    events = _events(adapted.root)
    assert ("Warning", "RankFailed") in [(e["type"], e["reason"]) for e in events]
    normal = next(e for e in events if e["reason"] == "MicroBatchReduced")
    assert normal["type"] == "Normal"
    assert normal["message"].startswith(
        "attempt 2 with micro batch 4 x 2 accumulation (global batch 16 unchanged)"
    )


def test_out_of_memory_at_micro_batch_1_fails_with_out_of_memory(
    workspace: Workspace, tmp_path: Path
) -> None:
    body = _ftjob_run(workspace, tmp_path, micro=1, oom_above=0)
    status = body["status"]
    assert status["phase"] == "Failed" and status["attempt"] == 1, status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OutOfMemory" and "micro batch 1" in failed["message"], failed
    assert status["microBatch"]["size"] == 1


def test_micro_8_x_1_and_micro_4_x_2_over_the_same_global_batch_train_the_same_steps(
    workspace: Workspace, micro_4: Trained, tmp_path: Path
) -> None:
    """The premise, checked on the real trainer without the operator."""
    micro_8 = _train(workspace, tmp_path, 8)
    assert micro_8.trace == micro_4.trace
    assert micro_8.losses == pytest.approx(micro_4.losses, rel=RECUT_REL)
    assert _weights_difference(micro_8.weights, micro_4.weights) < RECUT_WEIGHTS_REL
    assert micro_8.final_loss == pytest.approx(micro_4.final_loss, rel=RECUT_REL)
    difference = abs(micro_8.final_loss - micro_4.final_loss) / micro_4.final_loss
    weights = _weights_difference(micro_8.weights, micro_4.weights)
    print(
        f"\nfinal loss micro 8x1 {micro_8.final_loss!r}, 4x2 {micro_4.final_loss!r}, rel {difference:.2e}; "
        f"weights max rel {weights:.2e}"
    )
