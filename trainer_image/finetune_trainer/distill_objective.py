"""distill: the student learns the teacher's next-token distribution (distill_loss.py) beside the
data's tokens, `alpha` x divergence + (1 - alpha) x cross-entropy, both means over the global batch's
target tokens (token_loss.py's arithmetic, so accumulation and ranks do not change the gradient).

The teacher runs forward on the fly, frozen, on the student's own micro batch (packed or not: the
same inputs, so it sees the same documents apart). Under ZeRO-3 it is loaded while the student's
HF/DeepSpeed link is alive, so `from_pretrained` partitions it as it loads, and wrapped in a
DeepSpeed engine without optimizer whose forward gathers each layer in turn: a 70B teacher never
sits whole on one GPU. Below ZeRO-3 every rank holds a copy. It is never checkpointed or exported: a
restart loads it again from its source.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune_operator.api import TrainerConfig
from finetune_operator.api.spec import DistillationSpec

from finetune_trainer.distill_loss import token_divergence
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.failures import InvalidInput
from finetune_trainer.model import ModelNotFound, local_source, torch_dtype
from finetune_trainer.objectives import (
    Evaluation,
    StepSums,
    accumulate,
    batch_inputs,
    evaluation_share,
    held_out,
)
from finetune_trainer.parallel_layout import Layout

if TYPE_CHECKING:
    from finetune_trainer.startup import RankContext

log = logging.getLogger(__name__)
FIELD = "training.distillation.teacher"


class TeacherVocabularyDiffers(InvalidInput):
    """The teacher scores another vocabulary: its distribution means nothing to the student (exit 2)."""


def _inference_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The student's DeepSpeed config without what only training needs: the same precision and
    ZeRO stage (3 shards the teacher; below it there is nothing to shard without an optimizer)."""
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


def load_teacher(ctx: RankContext, ds_config: dict[str, Any], student_vocab: int) -> Any:
    import deepspeed
    from transformers import AutoModelForCausalLM

    config = ctx.config
    settings: DistillationSpec = config.training.distillation  # type: ignore[assignment]
    try:
        source = local_source(settings.teacher, ctx.scratch / "models", ctx.phases, ctx.open)
        teacher = AutoModelForCausalLM.from_pretrained(
            source,
            revision=settings.teacher_revision,
            trust_remote_code=config.model.trust_remote_code,
            dtype=torch_dtype(config.training.precision),
            attn_implementation=config.training.attention_implementation,
        )
    except ModelNotFound as exc:
        raise ModelNotFound(f"{FIELD}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{FIELD} {settings.teacher}: {exc}".splitlines()[0]) from None
    vocab = teacher.config.vocab_size
    if vocab != student_vocab:
        raise TeacherVocabularyDiffers(
            f"{FIELD}: the teacher's vocabulary has {vocab} tokens, the student's {student_vocab}; "
            "distil from a teacher of the same tokenizer family"
        )
    teacher.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=teacher, config=_inference_config(ds_config))
    engine.eval()
    log.info("teacher %s loaded (%d-token vocabulary)", settings.teacher, vocab)
    return engine


class Distillation:
    metric_names = ("divergence", "cross_entropy")

    def __init__(self, config: TrainerConfig, layout: Layout, device: Any, train: ExampleTable,
                 teacher: Any) -> None:  # fmt: skip
        self.config, self.layout, self.device, self.train = config, layout, device, train
        self.settings: DistillationSpec = config.training.distillation  # type: ignore[assignment]
        self.teacher = teacher

    @classmethod
    def prepare(cls, ctx: RankContext, engine: Any, data: Any, ds_config: dict[str, Any]) -> Distillation:
        teacher = load_teacher(ctx, ds_config, engine.module.config.vocab_size)
        return cls(ctx.config, ctx.layout, ctx.device, data.train, teacher)

    def count(self, table: ExampleTable, indices: Sequence[int]) -> int:
        return table.targets(indices)

    def _sums(self, engine: Any, examples: list[Any], global_count: int) -> tuple[Any, Any, Any]:
        """The micro batch's summed loss (with its graph), divergence sum and cross-entropy sum
        (detached), over its target tokens."""
        import torch

        batch = batch_inputs(self.config, examples, self.device)
        out = engine(**batch, num_items_in_batch=global_count)
        cross_entropy = out.loss * global_count  # transformers' loss: summed, over the count given
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        s = self.settings
        divergence, _ = token_divergence(
            out.logits, teacher_logits, batch["labels"], beta=s.beta, temperature=s.temperature
        )
        loss = s.alpha * divergence + (1 - s.alpha) * cross_entropy
        return loss, divergence.detach().double(), cross_entropy.detach().double()

    def step(self, engine: Any, micro_batches: list[list[int]], global_count: int, world_size: int
             ) -> StepSums:  # fmt: skip
        import torch

        def sums(indices: list[int]) -> tuple[Any, Any]:
            loss, divergence, cross_entropy = self._sums(
                engine, [self.train[i] for i in indices], global_count
            )
            return loss, torch.stack([divergence, cross_entropy])

        return accumulate(engine, micro_batches, global_count, world_size, sums, len(self.metric_names),
                          self.device)  # fmt: skip

    def evaluate(self, engine: Any, examples: ExampleTable) -> Evaluation | None:
        """The same loss and parts per target token over the held-out examples."""
        batches = evaluation_share(examples, self.layout, self.config.schedule.micro_batch_size)
        if batches is None:
            return None

        def part(indices: list[int]) -> tuple[float, float, list[float]]:
            count = max(examples.targets(indices), 1)
            loss, divergence, cross_entropy = self._sums(engine, [examples[i] for i in indices], count)
            return float(loss), float(examples.targets(indices)), [float(divergence), float(cross_entropy)]

        return held_out(engine, batches, part, self.metric_names, self.device)
