"""Where a process sits in the run's parallel layout: which data-parallel rank it trains as, and how
many there are.

`parallelism.sequence` or `parallelism.tensor` above 1 makes groups of that many consecutive ranks
(always inside a node: both layers refuse a degree that does not divide the processes per node)
share each sequence of a batch. The batch schedule, the loss's world multiplier and the evaluation
shares then count data-parallel ranks, not processes: every rank of a group trains the group's
examples. With both degrees 1 (the default) the layout is the world itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_operator.api import TrainerConfig

from finetune_trainer.process_group import Ranks


@dataclass(frozen=True)
class Layout:
    data_rank: int  # which share of each global batch this process trains
    data_size: int  # data-parallel ranks: the world over the model-parallel degree
    model_parallel: int  # processes that share each sequence (sequence x tensor degree)
    model_rank: int  # this process's place inside its model-parallel group

    @classmethod
    def of(cls, config: TrainerConfig, ranks: Ranks) -> Layout:
        degree = config.parallelism.model_parallel_size
        return cls(
            data_rank=ranks.rank // degree,
            data_size=ranks.world_size // degree,
            model_parallel=degree,
            model_rank=ranks.rank % degree,
        )
