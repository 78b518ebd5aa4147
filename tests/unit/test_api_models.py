"""The FineTuneJob models: defaults that fit one 8-GPU node, derived numbers, and status parsing."""

from __future__ import annotations

import pytest
from finetune_operator.api import FineTuneJobStatus, Phase, resolve_trainer_config

from tests.support.factories import job


def test_a_minimal_manifest_is_model_dataset_and_checkpoint_uri() -> None:
    spec = job().spec
    assert spec.resources.nodes == 1 and spec.resources.gpus_per_node == 8
    assert spec.resources.world_size == 8
    assert spec.training.method == "full" and spec.training.precision == "bf16"
    assert spec.deepspeed.zero_stage == 2
    assert spec.checkpoint.resume == "latest" and spec.checkpoint.keep_last == 3


@pytest.mark.parametrize(
    "changes,world,accumulation,global_batch",
    [
        ({}, 8, 1, 8),
        ({"spec.training.microBatchSize": 2, "spec.training.globalBatchSize": 64}, 8, 4, 64),
        ({"spec.resources.nodes": 4, "spec.training.globalBatchSize": 256}, 32, 8, 256),
        (
            {"spec.resources.gpusPerNode": 0, "spec.resources.nodes": 2, "spec.training.globalBatchSize": 8},
            2,
            4,
            8,
        ),
        ({"spec.resources.gpusPerNode": 0, "spec.resources.processesPerNode": 3}, 3, 1, 3),
    ],
)
def test_gradient_accumulation_is_derived_from_the_global_batch(
    changes: dict[str, object], world: int, accumulation: int, global_batch: int
) -> None:
    config = resolve_trainer_config(job(changes))
    assert config.world.world_size == world
    assert config.schedule.gradient_accumulation_steps == accumulation
    assert config.schedule.global_batch_size == global_batch


@pytest.mark.parametrize("method,rate", [("full", 2e-5), ("lora", 2e-4)])
def test_learning_rate_defaults_depend_on_the_method(method: str, rate: float) -> None:
    assert resolve_trainer_config(job({"spec.training.method": method})).schedule.learning_rate == rate


def test_an_explicit_learning_rate_wins() -> None:
    assert resolve_trainer_config(job({"spec.training.learningRate": 1e-4})).schedule.learning_rate == 1e-4


def test_warmup_steps_replace_the_default_ratio() -> None:
    schedule = resolve_trainer_config(job({"spec.training.warmupSteps": 100})).schedule
    assert schedule.warmup_steps == 100 and schedule.warmup_ratio == 0.0


def test_lora_method_gets_lora_defaults_when_settings_are_left_out() -> None:
    spec = job({"spec.training.method": "lora"}).spec
    assert spec.training.lora is None  # the trainer applies LoraSpec() defaults
    assert (
        job({"spec.training.method": "lora", "spec.training.lora": {"rank": 64}}).spec.training.lora.rank
        == 64
    )  # type: ignore[union-attr]


def test_checkpoint_and_output_locations_are_per_namespace_and_job() -> None:
    config = resolve_trainer_config(job({"spec.checkpoint.uri": "file:///mnt/store/"}))
    assert config.checkpoint.job_uri == "file:///mnt/store/team-a/demo"
    assert config.output_uri == "file:///mnt/store/team-a/demo/final"


def test_an_explicit_output_uri_wins() -> None:
    config = resolve_trainer_config(job({"spec.output.uri": "s3://models/finetuned"}))
    assert config.output_uri == "s3://models/finetuned"


def test_status_parses_what_the_api_server_returns() -> None:
    status = FineTuneJobStatus.model_validate(
        {
            "phase": "Running",
            "attempt": 2,
            "restarts": 1,
            "startTime": "2026-11-23T10:00:00Z",
            "conditions": [
                {"type": "Running", "status": "True", "lastTransitionTime": "2026-11-23T10:01:00Z"}
            ],
            "progress": {"step": 120, "totalSteps": 1000, "percent": 12.0, "loss": 1.5},
            "latestCheckpoint": {"step": 100, "uri": "s3://ckpt/team-a/demo/checkpoints/step-00000100"},
        }
    )
    assert status.phase is Phase.RUNNING and status.progress is not None and status.progress.step == 120


def test_status_round_trips_through_its_wire_form() -> None:
    status = FineTuneJobStatus(phase=Phase.SUCCEEDED, attempt=3, restarts=2)
    assert FineTuneJobStatus.model_validate(status.to_wire()) == status


def test_the_models_api_version_is_the_contracts() -> None:
    from finetune_operator.api import API_VERSION, FineTuneJob

    assert FineTuneJob.model_fields["api_version"].default == API_VERSION
