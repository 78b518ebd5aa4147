"""What an optimizer step minimises, one component per `training.objective`: next-token
cross-entropy (sft, here), the DPO loss against the reference's log-probabilities
(preference_objective.py) or a teacher's next-token distribution (distill_objective.py).

Each objective owns four decisions, so the step loop makes none of them:
- `count`: what its per-step loss is a mean over, for the whole global batch (target tokens for sft
  and distill, pairs for dpo), counted without a collective from the memory-mapped table;
- `step`: this rank's micro batches, each loss scaled so the summed gradients are the gradient of
  that global mean however the batch is cut over accumulation and ranks (token_loss.py says why);
- `metric_names`: the parts it reports (status.progress.metrics), summed like the loss;
- `evaluate`: its loss and metrics over the held-out examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from finetune_operator.api import TrainerConfig

from finetune_trainer import process_group, sequence_parallel, tensor_parallel, token_loss
from finetune_trainer.encoding import IGNORE_INDEX, Example, collate, model_inputs
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.parallel_layout import Layout
from finetune_trainer.sequence_parallel import Shards

if TYPE_CHECKING:
    from finetune_trainer.prepared_data import PreparedData
    from finetune_trainer.startup import RankContext


@dataclass(frozen=True)
class StepSums:
    """A step's (or an evaluation's) sums on this rank: the loss summed over its items, and each
    metric's sum in `metric_names` order. Divided by the global count, they are the reported means."""

    loss: Any  # a detached float64 tensor
    metrics: Any  # a detached float64 tensor, one entry per metric (empty for sft)


@dataclass(frozen=True)
class Evaluation:
    loss: float
    metrics: dict[str, float]


class Objective(Protocol):
    metric_names: tuple[str, ...]

    def count(self, table: ExampleTable, indices: Sequence[int]) -> int: ...

    def step(self, engine: Any, micro_batches: list[list[int]], global_count: int, world_size: int
             ) -> StepSums: ...  # fmt: skip

    def evaluate(self, engine: Any, examples: ExampleTable) -> Evaluation | None: ...


def batch_inputs(config: TrainerConfig, examples: list[Example], device: Any, shards: Shards | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """A micro batch of single examples (sft, distill) as model inputs; with sequence parallelism,
    this rank's shard of it (sequence_parallel.py)."""
    pad_id = 0  # masked out of attention and loss, so any id serves
    columns = collate(
        examples,
        pad_id,
        config.dataset.max_seq_length,
        packed=config.dataset.packing,
        flatten=config.training.attention_implementation == "flash_attention_2",
    )
    return model_inputs(columns, device) if shards is None else shards.inputs(columns, device)


def evaluation_share(examples: ExampleTable, layout: Layout, micro: int) -> list[list[int]] | None:
    """This rank's micro batches of the held-out examples: equal shares on every data-parallel rank,
    since ZeRO-3 gathers parameters collectively on every forward (and a model-parallel group's ranks
    run each forward together). None when there are fewer examples than data-parallel ranks."""
    per_rank = len(examples) // layout.data_size
    if per_rank == 0:
        return None
    first = layout.data_rank * per_rank
    return [
        list(range(at, min(at + micro, first + per_rank))) for at in range(first, first + per_rank, micro)
    ]


# A micro batch's summed loss (with its graph) and its metric sums (detached).
MicroSums = Callable[[list[int]], tuple[Any, Any]]


def accumulate(engine: Any, micro_batches: list[list[int]], global_count: int, world_size: int,
               sums: MicroSums, metrics: int, device: Any) -> StepSums:  # fmt: skip
    """One optimizer step over this rank's micro batches, `sums` giving a micro batch's summed loss
    (with its graph) and its metric sums: each loss over the global count times the data-parallel
    size, backward without DeepSpeed's division by the accumulation steps (token_loss.py says why)."""
    import torch

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    metric_sums = torch.zeros(metrics, dtype=torch.float64, device=device)
    for indices in micro_batches:
        loss, parts = sums(indices)
        engine.backward(loss / global_count * world_size, scale_wrt_gas=False)
        engine.step()
        loss_sum += loss.detach().double()
        metric_sums += parts
    return StepSums(loss=loss_sum, metrics=metric_sums)


# One held-out micro batch's (loss sum, items counted, metric sums), computed without gradients.
Part = Callable[[list[int]], tuple[float, float, list[float]]]


def held_out(engine: Any, batches: list[list[int]], part: Part, names: tuple[str, ...], device: Any,
             share: float = 1.0) -> Evaluation | None:  # fmt: skip
    """Loss and metrics over every rank's share of the held-out examples, `part` giving one micro
    batch's (loss sum, items counted, metric sums) without gradients; None when nothing counted.
    `share` weighs this rank's sums in the world's (tensor_parallel.report_share)."""
    import torch

    loss_sum, counted, metric_sums = 0.0, 0.0, [0.0] * len(names)
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            loss, count, metrics = part(batch)
            loss_sum, counted = loss_sum + loss, counted + count
            metric_sums = [a + b for a, b in zip(metric_sums, metrics, strict=True)]
    engine.train()
    sums = [share * v for v in (loss_sum, counted, *metric_sums)]
    total, count, *metrics = process_group.all_reduce(sums, "sum", device)
    if not count:
        return None
    return Evaluation(loss=total / count, metrics={n: v / count for n, v in zip(names, metrics, strict=True)})


class Supervised:
    """sft: the mean cross-entropy over every target token of the global batch (token_loss.py)."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, config: TrainerConfig, layout: Layout, device: Any, train: ExampleTable,
                 shards: Shards | None = None) -> None:  # fmt: skip
        self.config, self.layout, self.device, self.train = config, layout, device, train
        self.shards = shards  # this rank's cut of every sequence under sequence parallelism

    def count(self, table: ExampleTable, indices: Sequence[int]) -> int:
        return table.targets(indices)

    def step(self, engine: Any, micro_batches: list[list[int]], global_count: int, world_size: int
             ) -> StepSums:  # fmt: skip
        import torch

        batches = (
            batch_inputs(self.config, [self.train[i] for i in b], self.device, self.shards)
            for b in micro_batches
        )
        multiplier = world_size if self.shards is None else self.shards.multiplier(world_size)
        loss = token_loss.step(engine, batches, global_count, multiplier)
        return StepSums(loss=loss, metrics=torch.zeros(0, dtype=torch.float64, device=self.device))

    def evaluate(self, engine: Any, examples: ExampleTable) -> Evaluation | None:
        """Mean loss per target token over the held-out examples."""
        batches = evaluation_share(examples, self.layout, self.config.schedule.micro_batch_size)
        if batches is None:
            return None

        def part(indices: list[int]) -> tuple[float, float, list[float]]:
            batch = batch_inputs(self.config, [examples[i] for i in indices], self.device, self.shards)
            if self.shards is not None:  # this rank's shard: its own targets, its summed loss
                return float(engine(**batch, num_items_in_batch=1).loss), sequence_parallel.targets(batch), []
            targets = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            return float(engine(**batch).loss) * targets, targets, []

        share = tensor_parallel.report_share(self.config, self.layout)
        return held_out(engine, batches, part, self.metric_names, self.device, share)


def objective_for(ctx: RankContext, engine: Any, data: PreparedData, *, store: Any,
                  ds_config: dict[str, Any]) -> Objective:  # fmt: skip
    """The run's objective, ready: called before any checkpoint is loaded, while the engine holds the
    base model's weights (the DPO reference is scored from them)."""
    objective = ctx.config.training.objective
    if objective == "dpo":
        from finetune_trainer.preference_objective import Preference

        return Preference.prepare(ctx, engine, data, store)
    if objective == "distill":
        from finetune_trainer.distill_objective import Distillation

        return Distillation.prepare(ctx, engine, data, ds_config)
    return Supervised(ctx.config, ctx.layout, ctx.device, data.train, Shards.of(ctx.config, ctx.layout))
