"""Tensor parallelism (`parallelism.tensor`, DeepSpeed AutoTP): each layer's matrices split over the
consecutive ranks of a tensor-parallel group inside a node. Everything the trainer does about it is
here; startup, the DeepSpeed config, the step loop, the resume and the export only call it.

- Refusals, before any weight loads (`check`, exit 2 naming `parallelism.tensor`): attention heads,
  key/value heads and the MLP's intermediate size must divide by the degree (AutoTP splits whole heads
  and equal column blocks; DeepSpeed would otherwise cut them unevenly or leave ranks without a head),
  and the run must be full fine-tuning with sft or dpo, without Liger's kernels (LoRA's wrapped
  layers and distillation's teacher engine are not sharded by AutoTP as we use it, and Liger's fused
  cross-entropy reads the whole lm_head, which AutoTP splits).
- Groups (`model_parallel_unit`): DeepSpeed's own mesh (`deepspeed.utils.groups._init_tp_mesh_device`,
  a (data, tensor) DeviceMesh: tensor-parallel groups are consecutive ranks, data-parallel groups
  ranks strided by the degree), made before `deepspeed.initialize` and handed to it as its `mpu`, so
  DeepSpeed counts data-parallel ranks in `train_batch_size` (micro x accumulation x data-parallel
  ranks = the global batch) as it does for the rest of the engine. `parallel_layout.Layout` gives
  the same ranks; the groups are checked against it.
- Sharding: `"tensor_parallel": {"autotp_size": N}` in the DeepSpeed config (`ds_config_section`);
  `deepspeed.initialize` then replaces the linear layers by AutoTP's (Llama: q/k/v, gate/up column
  parallel, o/down row parallel with an all-reduce, lm_head split by vocabulary with its output
  gathered; a tied embedding and head are split by vocabulary with a distributed cross-entropy,
  except for dpo, whose log-probabilities need every logit: `vocab_parallel_lm_head` false).
- Gradients: a tensor-parallel group's ranks run each forward and backward together on the same
  examples; a sharded weight's gradient lives on its rank, a replicated one's (norms, an unsplit
  embedding) is whole and equal on every rank of the group, since the column-parallel layers
  all-reduce their input's gradient. DeepSpeed then averages gradients over the data-parallel group
  only (its `dp_world_size` is the world over the degree), so the loss's world multiplier
  (token_loss.py) is the data-parallel size, `Layout.data_size`. Clipping's norm counts each shard
  once (DeepSpeed's `mpu`).
- Reporting (`report_share`): every rank of a group holds the whole loss of its examples, so only
  the group's first rank adds its sums to the world's all-reduce.
- Checkpoints: DeepSpeed's own files, one `mp_rank_NN_model_states.pt` per tensor-parallel rank
  and `zero_pp_rank_D_mp_rank_NN_optim_states.pt` per (data, tensor) rank; a node downloads the
  shards of its data-parallel ranks (`node_data_ranks`). A resume needs the degree and the world
  size the checkpoint was saved at (`check_resume`).
- Export (`gathered_state_dict`): the shards gathered into whole weights on rank 0 (DeepSpeed's
  `GatherReplacedLayerParams`, a collective of each group), saved as a plain Hugging Face model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.failures import InvalidInput
from finetune_trainer.parallel_layout import Layout

FIELD = "parallelism.tensor"


class TensorParallelRefused(InvalidInput):
    """The model or the run cannot be split at this degree: exit 2, naming parallelism.tensor."""


def degree(config: TrainerConfig) -> int:
    return config.parallelism.tensor


def degree_of(engine: Any) -> int:
    """The degree a DeepSpeed engine was built with (1 without AutoTP)."""
    size = getattr(engine, "autotp_size", None)
    return max(1, int(size())) if callable(size) else 1


# The model config's fields AutoTP splits, with the words a refusal uses for them.
SPLIT_FIELDS = (
    ("num_attention_heads", "attention heads"),
    ("num_key_value_heads", "key/value heads"),
    ("intermediate_size", "MLP intermediate size"),
)


def check_run(config: TrainerConfig) -> None:
    """Refuse what AutoTP cannot train here, from the config alone."""
    tp = degree(config)
    if tp == 1:
        return
    if config.training.method == "lora":
        raise TensorParallelRefused(
            f"{FIELD}: {tp} with training.method lora is not supported (AutoTP does not shard peft's "
            "wrapped layers); use full fine-tuning, or parallelism.tensor 1 with LoRA"
        )
    if config.training.liger_kernels:
        raise TensorParallelRefused(
            f"{FIELD}: {tp} with training.ligerKernels is not supported (Liger's fused cross-entropy "
            "multiplies by the whole lm_head, which AutoTP splits by vocabulary); set ligerKernels false"
        )
    if config.training.objective == "distill":
        raise TensorParallelRefused(
            f"{FIELD}: {tp} with training.objective distill is not supported (the teacher's engine is "
            "not tensor parallel); set parallelism.tensor to 1 and use ZeRO-3 for a large teacher"
        )


def check_model(config: TrainerConfig, model_config: Any) -> None:
    """Refuse a model whose heads or MLP do not split evenly at the degree."""
    tp = degree(config)
    if tp == 1:
        return
    text = getattr(model_config, "text_config", None) or model_config
    sizes = {name: getattr(text, name, None) for name, _ in SPLIT_FIELDS}
    if sizes["num_key_value_heads"] is None:
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    if sizes["num_attention_heads"] is None:
        raise TensorParallelRefused(
            f"{FIELD}: {tp}: the model config ({type(text).__name__}) names no num_attention_heads, "
            "so AutoTP cannot split it; set parallelism.tensor to 1"
        )
    uneven = [
        f"{words} {sizes[name]}"
        for name, words in SPLIT_FIELDS
        if isinstance(sizes[name], int) and sizes[name] % tp
    ]
    if uneven:
        divisors = sorted(d for d in range(1, tp) if all(
            not isinstance(sizes[n], int) or sizes[n] % d == 0 for n, _ in SPLIT_FIELDS))  # fmt: skip
        raise TensorParallelRefused(
            f"{FIELD}: {tp} does not divide the model's {', '.join(uneven)}; AutoTP splits whole heads "
            f"and equal MLP blocks: use a degree that divides them (at most {max(divisors)} below this "
            "one) that also divides resources.processesPerNode"
        )


def check(config: TrainerConfig, model_source: str) -> None:
    """Every refusal, before any weight loads: the run's settings, then the model's config.json."""
    if degree(config) == 1:
        return
    check_run(config)
    from transformers import AutoConfig

    from finetune_trainer.model import ModelNotFound

    try:
        model_config = AutoConfig.from_pretrained(
            model_source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except OSError as exc:  # as load_base answers it: exit 3
        raise ModelNotFound(f"model {model_source}: {exc}".splitlines()[0]) from None
    check_model(config, model_config)


def ds_config_section(config: TrainerConfig) -> dict[str, Any]:
    """What the DeepSpeed config gets for the degree: nothing at 1."""
    tp = degree(config)
    if tp == 1:
        return {}
    section: dict[str, Any] = {"autotp_size": tp}
    if config.training.objective == "dpo":
        # Sequence log-probabilities need the whole vocabulary's logits on every rank; the
        # vocabulary-parallel head (for a tied embedding) keeps only a rank's slice.
        section["vocab_parallel_lm_head"] = False
    return {"tensor_parallel": section}


class ConfigView:
    """What DeepSpeed's config parser asks a model-parallel unit when it checks the batch sizes
    (`DeepSpeedConfig(config, mpu)`: `get_data_parallel_world_size`), without making any group: for
    `ds_config.check`, before the engine exists."""

    def __init__(self, data_parallel_size: int) -> None:
        self.data_parallel_size = data_parallel_size

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size


def config_view(config: TrainerConfig) -> ConfigView | None:
    if degree(config) == 1:
        return None
    return ConfigView(config.world.world_size // config.parallelism.model_parallel_size)


def model_parallel_unit(config: TrainerConfig, layout: Layout) -> Any:
    """DeepSpeed's tensor- and data-parallel groups, made now (every rank together), as the `mpu`
    for `deepspeed.initialize`; None at degree 1. Its groups must be the layout's: the batch
    schedule gives data-parallel rank `rank // degree` the examples its group trains."""
    tp = degree(config)
    if tp == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    ours = (layout.data_rank, layout.data_size, layout.model_rank)
    theirs = (
        groups.get_data_parallel_rank(),
        groups.get_data_parallel_world_size(),
        groups.get_tensor_model_parallel_rank(),
    )
    if ours != theirs:
        raise RuntimeError(f"DeepSpeed's tensor-parallel groups (data rank, size, tensor rank) {theirs} "
                           f"are not the layout's {ours}")  # fmt: skip
    return groups


def report_share(config: TrainerConfig, layout: Layout) -> float:
    """This rank's weight in the world's sums of losses, metrics and tokens: the ranks of a
    tensor-parallel group hold the same sums (each computes the whole loss of the group's
    examples), so the group's first rank counts for it."""
    return 1.0 if degree(config) == 1 or layout.model_rank == 0 else 0.0


def node_data_ranks(first_rank: int, local_world_size: int, tp: int) -> range:
    """The data-parallel ranks of a node whose global ranks start at `first_rank`: DeepSpeed names
    ZeRO's shards (`zero_pp_rank_D_...`) by data-parallel rank, the global rank over the degree."""
    return range(first_rank // tp, (first_rank + local_world_size) // tp)


MP_RANK = re.compile(r"(?:^|/)(?:(?:bf16_)?zero_pp_rank_\d+_)?mp_rank_(\d+)_(?:model|optim)_states\.pt$")


def saved_degree(paths: Iterable[str]) -> int:
    """The tensor-parallel degree a DeepSpeed checkpoint was saved at: one `mp_rank_NN` per rank of
    a group (1 for a checkpoint without them)."""
    ranks = [int(m.group(1)) for p in paths if (m := MP_RANK.search(p))]
    return max(ranks, default=0) + 1


def check_resume(step: int, paths: Iterable[str], saved_world_size: int, tp: int, world_size: int) -> None:
    """A checkpoint resumes only at the degree it was saved at, and under tensor parallelism only at
    its world size: AutoTP's shards are not resliced here (DeepSpeed's universal conversion of
    AutoTP checkpoints is not wired or tested)."""
    saved = saved_degree(paths)
    if saved != tp:
        raise TensorParallelRefused(
            f"{FIELD}: checkpoint step {step} was saved at tensor-parallel degree {saved}, this run's is "
            f"{tp}; set parallelism.tensor to {saved}, or checkpoint.resume to none to start over"
        )
    if tp > 1 and saved_world_size != world_size:
        raise TensorParallelRefused(
            f"{FIELD}: checkpoint step {step} was saved by {saved_world_size} processes at tensor-parallel "
            f"degree {tp}, this run has {world_size}; resume a tensor-parallel run at its world size"
        )


def gathered_state_dict(engine: Any) -> dict[str, Any] | None:
    """The whole model on rank 0 (None elsewhere): every sharded weight gathered from its group
    (DeepSpeed's `_replace_module_consolidated_state_dict`, a collective of every rank), copied, and
    the module's buffers beside them. Called once training is over: a gather leaves each rank's
    shard a fresh tensor, no longer ZeRO's flat buffer."""
    import torch.distributed as dist

    gathered = engine._replace_module_consolidated_state_dict()
    if dist.get_rank() != 0:
        return None
    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in gathered.items()}
    for name, buffer in engine.module.named_buffers():
        if name not in state and _persistent(engine.module, name):
            state[name] = buffer.detach().to("cpu", copy=True)
    return state


def _persistent(module: Any, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    holder = module.get_submodule(owner) if owner else module
    return leaf not in getattr(holder, "_non_persistent_buffers_set", set())
