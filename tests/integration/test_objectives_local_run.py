"""DPO and distillation through `ftjob run` as a user meets them: two node ranks as local process
groups on CPU, one rank failing as transient (exit 75, the trainer's test-only fault hook) after a
checkpoint, restarted and resumed to Succeeded.

- DPO: LoRA on ZeRO-2, counting pairs whose chosen answer continues the sequence (learnable), so the
  held-out reward accuracy must rise above chance; the steps trained again after the restart train on
  the very pairs they trained on before it (the exact resume position).
- Distillation: full fine-tuning on ZeRO-3 from a deeper teacher of the same vocabulary; the
  divergence from the teacher falls and is reported beside the cross-entropy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.progress import parse_all
from finetune_trainer.faults import ENV_FAIL_AT_STEP
from finetune_trainer.sample_trace import ENV_SAMPLE_TRACE
from finetune_trainer.tiny import preference_records, write_jsonl, write_tiny_model

from tests.support.processes import ftjob_run
from tests.support.trainer_run import Workspace, sample_trace, tiny_job_manifest

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 480.0
FAILED_AFTER = 6
TWO_NODES = {
    "spec.resources.nodes": 2,
    "spec.resources.processesPerNode": 1,
    "spec.training.logEverySteps": 1,
    "spec.checkpoint.everySteps": 4,
    "spec.runPolicy.backoffBaseSeconds": 1,
    "spec.runPolicy.backoffCapSeconds": 1,
}


@dataclass
class Run:
    status: dict[str, Any]
    rank0_log: str
    trace: list[dict[str, Any]]

    def reports(self) -> list[Any]:
        return parse_all(self.rank0_log)


def _run(root: Path, ws: Workspace, changes: dict[str, Any]) -> Run:
    trace = root / "trace"
    env = {ENV_FAIL_AT_STEP: f"{FAILED_AFTER}:75:1", ENV_SAMPLE_TRACE: str(trace)}
    job = tiny_job_manifest(ws, f"file://{root / 'store'}", {
        **TWO_NODES, **changes,
        "spec.resources.env": [{"name": k, "value": v} for k, v in env.items()],
    })  # fmt: skip
    job["metadata"]["namespace"] = "default"
    manifest, workdir, out = root / "job.yaml", root / "run", root / "ftjob-run.out"
    manifest.write_text(yaml.safe_dump(job))
    proc = ftjob_run(manifest, workdir, out)
    try:
        assert proc.wait(RUN_TIMEOUT) == 0, out.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = workdir / "logs"
    return Run(
        status=json.loads((workdir / "job.json").read_text())["status"],
        rank0_log="".join(p.read_text(errors="replace") for p in sorted(logs.glob("tiny-a*-n0.log"))),
        trace=sample_trace(trace),
    )


def _restarted_once_and_succeeded(run: Run) -> None:
    status = run.status
    assert status["phase"] == "Succeeded" and status["restarts"] == 1, status
    assert "resuming at step 4" in run.rank0_log, run.rank0_log[-3000:]


@pytest.fixture(scope="module")
def dpo(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("dpo")
    ws = Workspace.create(root / "ws", records=16)
    pairs = write_jsonl(root / "ws" / "data" / "pairs.jsonl", preference_records(320, seed=1))
    return _run(root, ws, {
        "spec.dataset.sources": [{"uri": f"file://{pairs}", "shape": "preference"}],
        "spec.dataset.validationFraction": 0.15,
        "spec.training.objective": "dpo",
        "spec.training.dpo": {"beta": 0.1},
        "spec.training.method": "lora",
        "spec.training.lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "spec.training.learningRate": 0.02,
        "spec.training.maxSteps": 16,
        "spec.training.evalEverySteps": 8,
        "spec.deepspeed.zeroStage": 2,
    })  # fmt: skip


def _opinionated_teacher(dest: Path) -> Path:
    """A deeper tiny Llama of the same word-level vocabulary whose output layer is scaled up: a random
    model's next-token distribution is nearly uniform, like the student's, so there would be little
    divergence to learn away."""
    import torch
    from transformers import AutoModelForCausalLM

    write_tiny_model(dest, hidden=64, layers=4, seed=7)
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def distill(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("distill")
    ws = Workspace.create(root / "ws", records=192)
    teacher = _opinionated_teacher(root / "teacher")
    return _run(root, ws, {
        "spec.training.objective": "distill",
        "spec.training.distillation": {"teacher": f"file://{teacher}", "beta": 0.5, "temperature": 2.0,
                                       "alpha": 0.9},
        "spec.training.maxSteps": 12,
        "spec.deepspeed.zeroStage": 3,
    })  # fmt: skip


def test_a_dpo_run_killed_once_resumes_and_succeeds(dpo: Run) -> None:
    _restarted_once_and_succeeded(dpo)


def test_dpo_held_out_reward_accuracy_rises_above_chance(dpo: Run) -> None:
    accuracy = [r.progress.metrics.eval_rewards_accuracy for r in dpo.reports() if r.progress.metrics]
    accuracy = [a for a in accuracy if a is not None]
    assert accuracy and accuracy[-1] > 0.5, accuracy


def test_dpo_reports_rewards_and_margin_in_status(dpo: Run) -> None:
    metrics = dpo.status["progress"]["metrics"]
    assert {"rewardsChosen", "rewardsRejected", "rewardsMargin", "rewardsAccuracy"} <= set(metrics)
    assert metrics["rewardsMargin"] == pytest.approx(metrics["rewardsChosen"] - metrics["rewardsRejected"],
                                                     abs=1e-3)  # fmt: skip


def test_dpo_steps_trained_again_after_the_restart_train_on_the_same_pairs(dpo: Run) -> None:
    """Every (step, rank) trained twice, before the failure and after the resume, drew the same pairs."""
    seen: dict[tuple[int, int], list[list[str]]] = {}
    for row in dpo.trace:
        seen.setdefault((row["step"], row["rank"]), []).append(row["ids"])
    redone = {key: ids for key, ids in seen.items() if len(ids) > 1}
    assert redone, "the restart redid no step"
    assert all(all(i == ids[0] for i in ids) for ids in redone.values()), redone


def test_a_distillation_run_on_zero3_killed_once_resumes_and_succeeds(distill: Run) -> None:
    _restarted_once_and_succeeded(distill)


def test_distillation_reports_its_divergence_falling_beside_the_cross_entropy(distill: Run) -> None:
    parts = [r.progress.metrics for r in distill.reports() if r.progress.metrics is not None]
    divergence = [p.divergence for p in parts if p.divergence is not None]
    assert all(p.cross_entropy is not None for p in parts if p.divergence is not None)
    assert len(divergence) >= 4 and divergence[-1] < divergence[0], divergence


def test_full_dpo_on_zero3_scores_shares_of_unequal_size_and_trains(tmp_path: Path) -> None:
    """ZeRO-3 gathers the weights collectively in every forward: the reference scoring runs as many
    forwards on every rank even when the pairs do not divide evenly, and training goes on from it."""
    from tests.support.trainer_run import run, trainer_config

    ws = Workspace.create(tmp_path / "ws", records=16)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(61, seed=3))
    config = trainer_config(ws, f"file://{tmp_path / 'store'}", {
        "spec.dataset.sources": [{"uri": f"file://{pairs}", "shape": "preference"}],
        "spec.dataset.validationFraction": 0.2,
        "spec.training.objective": "dpo",
        "spec.training.maxSteps": 3,
        "spec.training.microBatchSize": 3,
        "spec.training.globalBatchSize": 6,
        "spec.deepspeed.zeroStage": 3,
    })  # fmt: skip
    done = run(config, tmp_path / "work")
    assert done.code == 0, done.output[-4000:]
    scored = [line for line in done.output.splitlines() if "pairs with the reference model" in line]
    assert len(scored) == 1 and done.progress is not None and done.progress.progress.metrics is not None
