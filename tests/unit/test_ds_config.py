"""The DeepSpeed config and schedule the trainer derives from a job's spec."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from finetune_operator.api import resolve_trainer_config
from finetune_trainer.ds_config import deepspeed_config, lr_at, parameter_groups, warmup_steps

from tests.support.factories import job


def _ds(changes: dict[str, Any]) -> dict[str, Any]:
    return deepspeed_config(resolve_trainer_config(job(changes)))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_is_the_specs(stage: int) -> None:
    assert _ds({"spec.deepspeed.zeroStage": stage})["zero_optimization"]["stage"] == stage


def test_zero3_gathers_weights_for_a_plain_export() -> None:
    assert _ds({"spec.deepspeed.zeroStage": 3})["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"
    ]


def test_offload_settings_reach_zero() -> None:
    zero = _ds(
        {
            "spec.deepspeed.zeroStage": 3,
            "spec.deepspeed.offloadOptimizer": True,
            "spec.deepspeed.offloadParameters": True,
        }
    )["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    "precision,bf16,fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)]
)
def test_precision(precision: str, bf16: bool, fp16: bool) -> None:
    ds = _ds({"spec.training.precision": precision})
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16


def test_batch_arithmetic_is_consistent_for_deepspeed() -> None:
    ds = _ds(
        {"spec.resources.nodes": 2, "spec.training.microBatchSize": 2, "spec.training.globalBatchSize": 128}
    )
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 16
    )
    assert ds["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(("size", "accumulation"), [(2, 2), (1, 4)])
def test_a_reduced_micro_batch_keeps_deepspeeds_batch_arithmetic(size: int, accumulation: int) -> None:
    """status.microBatch after an out-of-memory failure (policy/memory.py): DeepSpeed gets the reduced
    micro batch and the accumulation that keeps train_batch_size."""
    reduced = {"size": size, "gradientAccumulationSteps": accumulation, "reason": "OutOfMemory"}
    batch = {
        "spec.resources.nodes": 2,
        "spec.training.microBatchSize": 4,
        "spec.training.globalBatchSize": 64,
    }
    ds = _ds({**batch, "status": {"attempt": 1, "microBatch": reduced}})
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (size, accumulation)
    assert ds["train_batch_size"] == 64 == size * accumulation * 16  # 2 nodes x 8 GPUs


def test_the_raw_override_is_merged_last() -> None:
    ds = _ds(
        {
            "spec.deepspeed.override": {
                "zero_optimization": {"reduce_bucket_size": 1e7},
                "gradient_clipping": 0.5,
            }
        }
    )
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1e7 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 0.5


def test_no_weight_decay_on_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    names = dict(model.named_parameters())
    decay, no_decay = parameter_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p is names["0.weight"] for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(names[n]) for n in ("0.bias", "1.weight", "1.bias")}


def test_without_weight_decay_one_group_holds_every_trainable_parameter() -> None:
    """A second group would cost ZeRO an all-gather and an optimizer pass per step for nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    (group,) = parameter_groups(model.named_parameters(), 0.0)
    assert group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(model[0].weight), id(model[0].bias), id(model[1].bias)}


def test_warmup_then_cosine_decay_to_zero() -> None:
    values = [lr_at(s, total_steps=100, warmup=10, schedule="cosine") for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    assert values[100] == pytest.approx(0.0, abs=1e-9)


def test_linear_and_constant_schedules() -> None:
    assert lr_at(55, total_steps=100, warmup=10, schedule="linear") == pytest.approx(0.5)
    assert lr_at(99, total_steps=100, warmup=0, schedule="constant") == 1.0


def test_warmup_ratio_and_steps_resolve_to_steps() -> None:
    assert warmup_steps(resolve_trainer_config(job()), 1000) == 30
    assert warmup_steps(resolve_trainer_config(job({"spec.training.warmupSteps": 5})), 1000) == 5
