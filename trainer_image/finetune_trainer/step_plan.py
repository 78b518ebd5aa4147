"""Which examples every rank trains on at every optimizer step: a pure function of the step.

Because the order of each epoch is seeded and the split, mixture and tokenization are cached, the
optimizer step alone pins the exact data position. A checkpoint stores it, and a resumed run starts
at the next unseen global batch: nothing skipped, nothing repeated.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api import TrainerConfig

from finetune_trainer.data import epoch_order, rank_shard
from finetune_trainer.failures import InvalidInput
from finetune_trainer.position import DataPosition


class NotEnoughData(InvalidInput):
    """Fewer training examples than one global batch: no step can be taken (an invalid config)."""


@dataclass(frozen=True)
class StepPlan:
    examples: int
    global_batch: int
    world_size: int
    total_steps: int
    seed: int
    shuffle: bool

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.global_batch

    def position(self, step: int, data_key: str | None = None) -> DataPosition:
        """Where the data stands after `step` optimizer steps; stored in every checkpoint."""
        return DataPosition(
            global_step=step,
            epoch=step // self.steps_per_epoch,
            step_in_epoch=step % self.steps_per_epoch,
            samples_seen=step * self.global_batch,
            data_key=data_key,
        )

    def global_indices(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based) on all ranks together."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.examples, epoch, self.seed, self.shuffle)
        window = order[in_epoch * self.global_batch : (in_epoch + 1) * self.global_batch]
        return [int(i) for i in window]

    def rank_indices(self, step: int, rank: int) -> list[int]:
        """Example indices rank `rank` trains on in optimizer step `step` (0-based), in order."""
        return rank_shard(self.global_indices(step), 0, rank, self.world_size)


def plan(config: TrainerConfig, examples: int) -> StepPlan:
    global_batch = config.schedule.global_batch_size
    if examples < global_batch:
        raise NotEnoughData(
            f"dataset: {examples} training examples after cleaning, fewer than one global batch "
            f"({global_batch}); add data or lower training.globalBatchSize"
        )
    steps_per_epoch = examples // global_batch
    total = config.training.max_steps or (config.training.epochs or 1) * steps_per_epoch
    return StepPlan(
        examples=examples,
        global_batch=global_batch,
        world_size=config.world.world_size,
        total_steps=total,
        seed=config.training.seed,
        shuffle=config.dataset.shuffle,
    )
