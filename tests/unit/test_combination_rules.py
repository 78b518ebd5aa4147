"""The combinations the API refuses because they cannot run, refused by both layers (the CRD's CEL as
`kubectl apply` meets it, the pydantic models as `ftjob validate` and the trainer do) with one
message; everything else in the matrix of tests/integration/test_spec_matrix.py runs."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.api import describe, parse_manifest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer import ds_config
from finetune_trainer.failures import InvalidInput
from pydantic import ValidationError

from tests.support.apiserver import FakeApiServer
from tests.support.factories import manifest

FP16_ON_CPU = {"spec.training.precision": "fp16", "spec.resources.gpusPerNode": 0}
FIELD = "spec.training.precision"


def test_fp16_on_cpu_is_refused_by_the_crd_and_the_models_with_one_message(apiserver: FakeApiServer) -> None:
    data = manifest(FP16_ON_CPU)
    crd = {e.split("Invalid value: ", 1)[1] for e in apiserver.admit(data).errors if e.startswith(FIELD)}
    with pytest.raises(ValidationError) as caught:
        parse_manifest(data)
    models = {line.split(": ", 1)[1] for line in describe(caught.value) if line.startswith(FIELD + ":")}
    assert crd & models and any("bf16 or fp32" in m for m in models), (crd, models)


@pytest.mark.parametrize(
    "changes",
    [
        {"spec.training.precision": "fp16", "spec.resources.gpusPerNode": 8},
        {"spec.training.precision": "bf16", "spec.resources.gpusPerNode": 0},
        {"spec.training.precision": "fp32", "spec.resources.gpusPerNode": 0},
    ],
    ids=["fp16-gpu", "bf16-cpu", "fp32-cpu"],
)
def test_precisions_the_device_has_pass_both_layers(
    changes: dict[str, Any], apiserver: FakeApiServer
) -> None:
    data = manifest(changes)
    assert apiserver.admit(data).allowed
    parse_manifest(data)


def test_the_trainer_refuses_a_precision_its_device_lacks_as_invalid_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past both layers (a config written by hand, or an fp16 job on a GPU-less node): DeepSpeed's
    own accelerator says no, and the run ends with exit 2 instead of a traceback every restart repeats."""
    import deepspeed.accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    cpu = CPU_Accelerator()  # whatever this machine has
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: cpu)
    job = parse_manifest(manifest({"spec.training.precision": "fp16", "spec.resources.gpusPerNode": 8}))
    config = resolve_trainer_config(job)
    with pytest.raises(InvalidInput, match=r"training\.precision: fp16 is not supported on this cpu device"):
        ds_config.check(config, ds_config.deepspeed_config(config, cpu=True))


def test_the_global_batch_counts_data_parallel_ranks_only(apiserver: FakeApiServer) -> None:
    """8 processes in one tensor-parallel group train one sequence at a time: a global batch of 2 is
    2 accumulation steps, in both layers and in the trainer's config."""
    data = manifest({
        "spec.resources.gpusPerNode": 8, "spec.parallelism.tensor": 8,
        "spec.training.microBatchSize": 1, "spec.training.globalBatchSize": 2,
    })  # fmt: skip
    assert apiserver.admit(data).allowed, apiserver.admit(data).errors
    schedule = resolve_trainer_config(parse_manifest(data)).schedule
    assert (schedule.global_batch_size, schedule.gradient_accumulation_steps) == (2, 2)


def test_left_out_the_global_batch_is_one_micro_batch_per_data_parallel_rank() -> None:
    data = manifest({"spec.resources.gpusPerNode": 8, "spec.parallelism.sequence": 4,
                     "spec.training.microBatchSize": 3})  # fmt: skip
    schedule = resolve_trainer_config(parse_manifest(data)).schedule
    assert (schedule.global_batch_size, schedule.gradient_accumulation_steps) == (6, 1)
