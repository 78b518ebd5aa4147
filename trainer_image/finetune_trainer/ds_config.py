"""The DeepSpeed config, generated from the resolved trainer config; the user's raw override last.

The optimizer is DeepSpeed's own AdamW (so ZeRO-Offload gets its CPU Adam), fed parameter groups
that exempt biases and norm weights from weight decay. The learning-rate schedule is a plain
function of the step (`lr_at`), handed to DeepSpeed as a LambdaLR, so it is testable without it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer import tensor_parallel
from finetune_trainer.failures import InvalidInput

ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins key by key; nested mappings merge, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zero(config: TrainerConfig) -> dict[str, Any]:
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if ds.zero_stage == 3:
        # Export gathers the full 16-bit weights on rank 0, so final/ is a plain Hugging Face model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(config: TrainerConfig, *, cpu: bool = False) -> dict[str, Any]:
    training, schedule = config.training, config.schedule
    generated: dict[str, Any] = {
        # The micro batch in effect (after an out-of-memory reduction, smaller than the spec's);
        # micro x accumulation x world size == train_batch_size holds for every size the operator picks.
        "train_micro_batch_size_per_gpu": schedule.micro_batch_size,
        "gradient_accumulation_steps": schedule.gradient_accumulation_steps,
        "train_batch_size": schedule.global_batch_size,
        "gradient_clipping": training.gradient_clipping,
        "zero_optimization": _zero(config),
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": schedule.learning_rate,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": training.weight_decay,
                # On CPU, PyTorch's AdamW: DeepSpeed's fused kernel targets GPUs and would only add
                # a compile step (ZeRO-Offload still gets DeepSpeed's CPU Adam).
                **({"torch_adam": True} if cpu and not config.deepspeed.offload_optimizer else {}),
            },
        },
        "steps_per_print": 10**9,  # progress is reported by the trainer, once, from rank 0
        "wall_clock_breakdown": False,
        **tensor_parallel.ds_config_section(config),  # AutoTP: nothing at parallelism.tensor 1
    }
    if config.parallelism.sequence > 1:
        # Ulysses (sequence_parallel.py): DeepSpeed's batch check and ZeRO-3's HF link divide the
        # world by it; the engine itself takes the groups from the mpu.
        generated["sequence_parallel_size"] = config.parallelism.sequence
    return deep_merge(generated, config.deepspeed.override or {})


class DeepSpeedConfigError(InvalidInput):
    """DeepSpeed refused the config (almost always an override key), or the device has not the
    precision: exit 2, not a counted retry."""


def check(config: TrainerConfig, ds_config: dict[str, Any]) -> None:
    """Ask DeepSpeed's accelerator whether it has the precision, and parse `ds_config` with DeepSpeed's
    own parser (what `deepspeed.initialize` runs first, with the process group's world size), so a bad
    override or precision ends the run as InvalidConfig naming the fix instead of a traceback that
    every restart repeats."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.config import DeepSpeedConfig

    accelerator, precision = get_accelerator(), config.training.precision
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}
    if precision in supported and not supported[precision]():
        raise DeepSpeedConfigError(
            f"training.precision: {precision} is not supported on this {accelerator.device_name()} device; "
            "use " + " or ".join(p for p in ("bf16", "fp32") if p != precision)
        )
    try:
        # Under tensor parallelism DeepSpeed counts data-parallel ranks in the batch (its mpu).
        DeepSpeedConfig(copy.deepcopy(ds_config), mpu=tensor_parallel.config_view(config))
    except Exception as exc:  # DeepSpeed raises pydantic errors, assertions and ValueErrors alike
        first = " ".join(str(exc).split())[:400] or type(exc).__name__
        field = "deepspeed.override" if config.deepspeed.override else "the generated DeepSpeed config"
        raise DeepSpeedConfigError(
            f"{field}: DeepSpeed refused it ({type(exc).__name__}: {first}); fix or remove the key it "
            "names (the batch sizes come from training.microBatchSize/globalBatchSize, not the override)"
        ) from None


def is_decayed(name: str, ndim: int) -> bool:
    """Weight decay applies to matrices, never to biases or normalisation weights."""
    lowered = name.lower()
    return ndim >= 2 and not lowered.endswith(".bias") and "norm" not in lowered


def parameter_groups(named_parameters: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, decayed and not, when there is weight decay; one otherwise. Every group costs
    ZeRO an all-gather and an optimizer pass per step, for nothing when no group decays."""
    decay, no_decay = [], []
    if weight_decay == 0:
        return [{"params": [p for _, p in named_parameters if p.requires_grad], "weight_decay": 0.0}]
    for name, param in named_parameters:
        if param.requires_grad:
            # Under ZeRO-3 a parameter is a flat shard; its real shape is kept in ds_shape.
            ndim = len(getattr(param, "ds_shape", param.shape))
            (decay if is_decayed(name, ndim) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_steps(config: TrainerConfig, total_steps: int) -> int:
    if config.schedule.warmup_steps is not None:
        return min(config.schedule.warmup_steps, total_steps)
    return math.ceil(config.schedule.warmup_ratio * total_steps)


def lr_at(step: int, *, total_steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
