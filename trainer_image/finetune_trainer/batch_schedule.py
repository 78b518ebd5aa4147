"""Which examples every rank trains on at every optimizer step: a pure function of the step.

Because the order of each epoch is seeded and the split, mixture and tokenization are cached, the
optimizer step alone pins the exact data position. A checkpoint stores it, and a resumed run starts
at the next unseen global batch: nothing skipped, nothing repeated.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from finetune_operator.api import TrainerConfig

from finetune_trainer.failures import InvalidInput
from finetune_trainer.position import DataPosition


class NotEnoughData(InvalidInput):
    """Fewer training examples than one global batch: no step can be taken (an invalid config)."""


@dataclass(frozen=True)
class BatchSchedule:
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
        """Example indices data-parallel rank `rank` trains on in optimizer step `step` (0-based), in
        order (`world_size` counts data-parallel ranks: parallel_layout.py)."""
        return rank_shard(self.global_indices(step), 0, rank, self.world_size)


def schedule_for(config: TrainerConfig, examples: int) -> BatchSchedule:
    global_batch = config.schedule.global_batch_size
    if examples < global_batch:
        raise NotEnoughData(
            f"dataset: {examples} training examples after cleaning, fewer than one global batch "
            f"({global_batch}); add data or lower training.globalBatchSize"
        )
    steps_per_epoch = examples // global_batch
    total = config.training.max_steps or (config.training.epochs or 1) * steps_per_epoch
    return BatchSchedule(
        examples=examples,
        global_batch=global_batch,
        world_size=config.world.world_size // config.parallelism.model_parallel_size,  # data-parallel
        total_steps=total,
        seed=config.training.seed,
        shuffle=config.dataset.shuffle,
    )


@functools.lru_cache(maxsize=2)  # this epoch's and, across a boundary, the last one's
def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray[Any, Any]:
    """Epoch `epoch`'s order of the `n` examples: computed once per epoch, not per step (a shuffle of
    a million examples takes about a second), 8 bytes an example. shuffle() swaps by position, so
    the array gets the permutation a list of the same length would: data positions keep their
    meaning."""
    order = np.arange(n, dtype=np.int64)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)  # type: ignore[arg-type]
    order.flags.writeable = False  # shared by every later call for the epoch
    return order


def rank_shard(order: Sequence[int] | np.ndarray[Any, Any], start: int, rank: int, world_size: int
               ) -> list[int]:  # fmt: skip
    """Rank `rank`'s indices of the epoch from global position `start` on: disjoint across ranks.
    The tail that does not fill a whole step across all ranks is dropped, as every rank must step."""
    usable = (len(order) - start) // world_size * world_size
    return [int(i) for i in order[start : start + usable][rank::world_size]]
