"""Two CPU ranks under torchrun train a tiny Llama with ZeRO-2, ZeRO-3 and LoRA, checkpoint to S3
(moto's server) and export a Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.checkpoint_store import CheckpointStore
from finetune_trainer.export import ExportManifest
from finetune_trainer.storage import open_store

from tests.support.s3 import SECRET_KEY, S3Endpoint
from tests.support.trainer_run import Finished, Workspace, losses, run, trainer_config

pytestmark = pytest.mark.slow

STEPS = 16


def _download(uri: str, dest: Path) -> Path:
    store = open_store(uri)
    for obj in store.list(""):
        store.get_file(obj.key, dest / obj.key)
    return dest


def _job_uri(bucket: str) -> str:
    return f"s3://{bucket}/runs/team-a/tiny"


def _train(workspace: Workspace, s3: S3Endpoint, root: Path, changes: dict[str, Any]) -> tuple[Finished, str]:
    bucket = s3.new_bucket()
    config = trainer_config(workspace, f"s3://{bucket}/runs", {"spec.training.maxSteps": STEPS, **changes})
    return run(config, root, env=s3.env()), bucket


@pytest.fixture(scope="module")
def zero2(workspace: Workspace, s3_module_env: S3Endpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return _train(workspace, s3_module_env, tmp_path_factory.mktemp("zero2"), {"spec.deepspeed.zeroStage": 2})


@pytest.fixture(scope="module")
def zero3(workspace: Workspace, s3_module_env: S3Endpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    changes = {"spec.deepspeed.zeroStage": 3, "spec.training.gradientCheckpointing": True}
    return _train(workspace, s3_module_env, tmp_path_factory.mktemp("zero3"), changes)


@pytest.fixture(scope="module")
def lora(workspace: Workspace, s3_module_env: S3Endpoint, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    # The base model comes from S3 here: one download per node into the node's cache.
    bucket = s3_module_env.new_bucket()
    model_store = open_store(f"s3://{bucket}/models/tiny")
    for path in Path(workspace.model_uri.removeprefix("file://")).iterdir():
        model_store.put_file(path, path.name)
    changes = {
        "spec.model.source": f"s3://{bucket}/models/tiny",
        "spec.training.method": "lora",
        "spec.training.learningRate": 0.01,
        "spec.training.lora": {
            "rank": 16,
            "targetModules": ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"],
        },
    }
    return _train(workspace, s3_module_env, tmp_path_factory.mktemp("lora"), changes)


def _assert_trained(finished: Finished) -> None:
    assert finished.code == 0, finished.output[-3000:]
    curve = losses(finished.output)
    assert len(curve) >= 4
    assert curve[-1] < 0.85 * curve[0], curve


def _export_matches_checkpoint(bucket: str, tmp: Path) -> None:
    """The exported model reproduces the logits of the weights in the last committed checkpoint."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    job = _job_uri(bucket)
    exported = AutoModelForCausalLM.from_pretrained(_download(f"{job}/final", tmp / "final"))
    store = CheckpointStore(open_store(job))
    step = store.committed_steps()[-1]
    store.download(store.manifest(step), tmp / "ckpt" / f"step-{step:08d}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp / "ckpt"), tag=f"step-{step:08d}")
    reference = AutoModelForCausalLM.from_config(exported.config)
    reference.load_state_dict(state)
    ids = torch.randint(0, exported.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


class TestZero2:
    def test_loss_falls_on_the_learnable_dataset(self, zero2: tuple[Finished, str]) -> None:
        _assert_trained(zero2[0])

    def test_checkpoints_commit_to_s3_and_keep_last_holds(self, zero2: tuple[Finished, str]) -> None:
        store = CheckpointStore(open_store(_job_uri(zero2[1])))
        assert store.committed_steps() == [12, 16]  # every 4 steps, keepLast 2

    def test_evaluation_loss_is_reported(self, zero2: tuple[Finished, str]) -> None:
        report = zero2[0].progress
        assert report is not None and report.progress.eval_loss is not None

    def test_rank0_reports_the_latest_commit(self, zero2: tuple[Finished, str]) -> None:
        report = zero2[0].progress
        assert report is not None and report.latest_checkpoint is not None
        assert report.latest_checkpoint.step == STEPS and report.progress.step == STEPS
        assert report.latest_checkpoint.uri == f"{_job_uri(zero2[1])}/checkpoints/step-{STEPS:08d}"

    def test_exported_model_reproduces_the_trained_logits(
        self, zero2: tuple[Finished, str], tmp_path: Path
    ) -> None:
        _export_matches_checkpoint(zero2[1], tmp_path)

    def test_tensorboard_events_are_next_to_the_checkpoints(self, zero2: tuple[Finished, str]) -> None:
        keys = [o.key for o in open_store(_job_uri(zero2[1])).list("tensorboard/")]
        assert any("events.out.tfevents" in k for k in keys)

    def test_the_storage_secret_never_reaches_the_logs(self, zero2: tuple[Finished, str]) -> None:
        assert SECRET_KEY not in zero2[0].output

    def test_only_rank0_logs_progress(self, zero2: tuple[Finished, str]) -> None:
        step_lines = [line for line in zero2[0].output.splitlines() if f"INFO step {STEPS}/{STEPS}" in line]
        assert len(step_lines) == 1


class TestZero3:
    def test_loss_falls_on_the_learnable_dataset(self, zero3: tuple[Finished, str]) -> None:
        _assert_trained(zero3[0])

    def test_exported_model_is_gathered_from_the_shards(
        self, zero3: tuple[Finished, str], tmp_path: Path
    ) -> None:
        _export_matches_checkpoint(zero3[1], tmp_path)


class TestLora:
    def test_loss_falls_with_adapters_only(self, lora: tuple[Finished, str]) -> None:
        _assert_trained(lora[0])

    def test_merged_export_loads_as_a_plain_model(self, lora: tuple[Finished, str], tmp_path: Path) -> None:
        from transformers import AutoModelForCausalLM

        final = f"{_job_uri(lora[1])}/final"
        manifest = ExportManifest.model_validate_json(open_store(final).get_bytes("MANIFEST.json"))
        assert manifest.kind == "merged" and manifest.step == STEPS
        model = AutoModelForCausalLM.from_pretrained(_download(final, tmp_path / "final"))
        assert not any("lora" in name for name, _ in model.named_parameters())
