"""Ulysses sequence parallelism (`parallelism.sequence`, DeepSpeed's Arctic Long Sequence Training):
each sequence of a micro batch is cut into `degree` consecutive shards, one per process of a
sequence-parallel group, so a rank holds the activations of 1/degree of every sequence. Attention
alone needs the whole sequence: DeepSpeed's `UlyssesSPAttentionHF`, registered with transformers in
place of the core attention (`training.attentionImplementation`), trades each rank's shard of every
head for every token of 1/degree of the heads by one all-to-all before attention and one after.

What this module owns, and why:

- Groups. `parallel_layout.Layout` puts `degree` consecutive ranks in a group, and DeepSpeed's
  `parallel_state_sp.initialize_sequence_parallel` builds its groups the same way (ranks
  `[i * degree, (i + 1) * degree)`), so `layout.model_rank` is the rank's place in its DeepSpeed group
  and the index of its shard. Every rank of a group trains the group's examples (the batch schedule
  counts data-parallel ranks). `register` returns DeepSpeed's `mpu` for `deepspeed.initialize`.
- Checkpoints: sequence parallelism shards no weight and ZeRO partitions over every rank whatever
  the degree, so a checkpoint loads as saved at the same world size and the export is the usual
  one; at another world size the universal conversion fails on it, so `refuse_conversion` ends the
  run first (exit 2: resume at the saved world size).
- Refusals before any weight loads (`check`, exit 2 naming `parallelism.sequence`): heads that the
  degree does not divide (each rank attends with heads / degree query heads and key/value
  heads / degree key/value heads), and the dpo and distill objectives (not wired: their per-sequence
  sums would need a reduction over the group, and a teacher would go through the same attention).
- Inputs (`Shards.inputs`): the collated micro batch padded to a width the degree divides (and to the
  registered micro batch rows: Ulysses checks each forward's shape against it), labels shifted over the
  *whole* sequence before it is cut (a shard's last token predicts the next shard's first), position
  ids always (Ulysses gathers them: sdpa's causal mask and flash-attention's packed parts are read
  from them), and no attention mask (Ulysses drops it: right padding is never attended to by a real
  token under a causal mask, and is never a target). The model gets the shard's shifted labels as
  `shift_labels`, and as `labels` too, since Llama computes a loss only when `labels` is given.
- The loss (token_loss.py's arithmetic). A rank's loss is its shard's summed cross-entropy over the
  target count of the whole global batch, times a multiplier (`Shards.multiplier`). The all-to-all's
  backward returns to each rank the gradient its keys and values got from the other shards'
  queries, so the sum of the gradients of a group's ranks is the gradient of the group's summed
  loss. DeepSpeed sums gradients over the sequence-data-parallel group (every rank: data x
  sequence) and divides by a size the multiplier must equal for the step's gradient to be the
  global batch's token mean. DeepSpeed 0.19 divides by world / degree, the data-parallel size, on
  ZeRO 0 (engine `_reduce_non_expert_gradients`) and ZeRO 1-2 (`average_tensor`,
  `gradient_reduction_w_predivide`, `allreduce_bucket`), but by the whole world on ZeRO-3's
  reduce-scatter (`__avg_scatter_grads`: `reduce_scatter_coalesced` pre-divides by the group's
  size), which is its default and the trainer's; ZeRO-3's other path (`reduce_scatter: false`,
  contiguous buckets) divides by the data-parallel size again unless one parameter outgrows the
  bucket, so `check` refuses that override. The multiplier is therefore the data-parallel size
  below ZeRO-3, as without sequence parallelism, and data-parallel size x degree on ZeRO-3
  (tests/integration/test_sequence_parallel.py checks both against plain data parallelism, and
  will fail if a DeepSpeed upgrade changes either). Gradient clipping needs nothing: DeepSpeed's
  norm counts each gradient once over the group (ZeRO 0 through the mpu, on the group's first rank;
  ZeRO 1-3 over disjoint partitions), and the clipped step equals data parallelism's in that test.
  The shard sums add up to the sequence's sum once (no rank holds another's tokens), so the step
  loop's all-reduced loss sums are right as they are; only the example-level token count, the same
  on every rank of a group, is counted by the group's first rank alone (step_loop.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from finetune_operator.api import TrainerConfig

from finetune_trainer.encoding import IGNORE_INDEX
from finetune_trainer.failures import InvalidInput
from finetune_trainer.parallel_layout import Layout

log = logging.getLogger(__name__)

FIELD = "parallelism.sequence"


class SequenceParallelRefused(InvalidInput):
    """What cannot run at this sequence-parallel degree: exit 2, naming parallelism.sequence."""


def check_heads(degree: int, model_config: Any) -> None:
    """Each rank attends with 1/degree of the query heads and of the key/value heads."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    if heads % degree or kv_heads % degree:
        divisors = [d for d in range(2, math.gcd(heads, kv_heads) + 1) if math.gcd(heads, kv_heads) % d == 0]
        fits = f"use {' or '.join(map(str, divisors))}" if divisors else "leave it at 1"
        raise SequenceParallelRefused(
            f"{FIELD}: {degree} must divide the model's attention heads ({heads}) and key/value heads "
            f"({kv_heads}), since each process attends with an equal share of both; {fits}"
        )


def check(config: TrainerConfig, model_source: str, ds_config: dict[str, Any]) -> None:
    """Refuse, before any weight loads, what sequence parallelism cannot run (exit 2)."""
    degree = config.parallelism.sequence
    if degree == 1:
        return
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("reduce_scatter", True):
        raise SequenceParallelRefused(
            f"deepspeed.override: zero_optimization.reduce_scatter false with {FIELD} on ZeRO-3 averages "
            "some gradients over the data-parallel ranks and others over every rank (DeepSpeed 0.19), so "
            "the loss could not be scaled right; remove it"
        )
    objective = config.training.objective
    if objective != "sft":
        raise SequenceParallelRefused(
            f"{FIELD}: sequence parallelism trains the sft objective only; training.objective {objective} "
            f"sums log-probabilities per sequence, which a sequence cut over processes does not yet "
            f"gather: set {FIELD} to 1 for {objective}"
        )
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            model_source, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except OSError:
        return  # load_model reports a missing model in its own words (exit 3)
    check_heads(degree, model_config)


def refuse_conversion(engine: Any, step: int, saved_world_size: int, world_size: int) -> None:
    """A checkpoint saved at another world size loads through DeepSpeed's universal conversion, which
    (DeepSpeed 0.19) reads a sequence-parallel checkpoint's degree as tensor parallelism and fails
    ("model-state file count 1 does not match pp_degree=1 * tp_degree=2"): refused, saying what works.
    At the same world size a checkpoint loads as saved, whatever the degree."""
    degree = int(getattr(engine, "sequence_parallel_size", 1) or 1)
    if degree > 1:
        raise SequenceParallelRefused(
            f"{FIELD}: checkpoint step {step} was saved at world size {saved_world_size}; with sequence "
            f"parallelism it cannot be converted to world size {world_size} (DeepSpeed's universal "
            f"checkpoint conversion does not support it); resume at world size {saved_world_size} "
            "(resources.nodes x processesPerNode)"
        )


def rows(config: TrainerConfig) -> int:
    """The rows of every micro batch the model sees: one under flash_attention_2 (collate flattens the
    batch into one row), the micro batch in effect otherwise (short ones are filled with padding)."""
    if config.training.attention_implementation == "flash_attention_2":
        return 1
    return config.schedule.micro_batch_size


def register(config: TrainerConfig, model: Any) -> Any:
    """Put Ulysses in place of the model's core attention, in this process, and build DeepSpeed's
    sequence-parallel groups; the `mpu` for `deepspeed.initialize`, None at degree 1."""
    degree = config.parallelism.sequence
    if degree == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    attention = config.training.attention_implementation
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=attention,
        sequence_parallel_size=degree,
        micro_batch_size=rows(config),
        seq_length_is_variable=True,  # micro batches are as wide as their longest example
    )
    log.info("sequence parallel %d (Ulysses over %s): each rank holds 1/%d of every sequence", degree,
             attention, degree)  # fmt: skip
    return mpu


@dataclass(frozen=True)
class Shards:
    """How this rank cuts each collated micro batch: its shard `rank` of `degree`."""

    degree: int
    rank: int
    rows: int
    zero3: bool  # DeepSpeed's ZeRO-3 averages gradients over every rank, not the data-parallel ones

    @classmethod
    def of(cls, config: TrainerConfig, layout: Layout) -> Shards | None:
        degree = config.parallelism.sequence
        if degree == 1:
            return None
        return cls(degree=degree, rank=layout.model_rank, rows=rows(config),
                   zero3=config.deepspeed.zero_stage == 3)  # fmt: skip

    def multiplier(self, data_size: int) -> int:
        """What each micro batch's loss is multiplied by (token_loss.step's `world_size`): the size
        DeepSpeed divides the summed gradients of every rank by (the module's docstring says why)."""
        return data_size * self.degree if self.zero3 else data_size

    def columns(self, columns: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        """This rank's shard of collated columns (`encoding.collate`): input ids, position ids and
        the labels shifted over the whole sequence, with no attention mask."""
        width = len(columns["input_ids"][0])
        padded = -(-width // self.degree) * self.degree
        chunk = padded // self.degree
        at = slice(self.rank * chunk, (self.rank + 1) * chunk)
        out: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "shift_labels": []}
        packed = "position_ids" in columns  # packed parts: positions restart at every part
        for row in range(self.rows):
            if row < len(columns["input_ids"]):
                ids, labels = columns["input_ids"][row], columns["labels"][row]
                positions = columns["position_ids"][row] if packed else list(range(width))
            else:  # a short micro batch (the last held-out one): a row of padding, nothing learned
                ids, labels, positions = [0] * width, [IGNORE_INDEX] * width, list(range(width))
            pad = padded - width
            ids = ids + [0] * pad
            shifted = labels[1:] + [IGNORE_INDEX] * (pad + 1)  # the target of token t is label t + 1
            # Padding continues the positions (a causal mask keeps real tokens from it), or under
            # packing is a part of its own, as collate pads.
            positions = positions + (list(range(pad)) if packed else list(range(width, padded)))
            out["input_ids"].append(ids[at])
            out["position_ids"].append(positions[at])
            out["shift_labels"].append(shifted[at])
        return out

    def inputs(self, columns: dict[str, list[list[int]]], device: Any) -> dict[str, Any]:
        """This rank's shard as the model's keyword arguments (Llama computes a loss only when
        `labels` is given; with `shift_labels` it reads those instead)."""
        import torch

        shard = {k: torch.tensor(v, device=device) for k, v in self.columns(columns).items()}
        return {**shard, "labels": shard["shift_labels"], "use_cache": False}


def targets(batch: dict[str, Any]) -> int:
    """The target tokens of this rank's shard of a micro batch (`Shards.inputs`)."""
    return int((batch["shift_labels"] != IGNORE_INDEX).sum())
