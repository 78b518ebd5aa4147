"""The optimizer step alone pins which examples every rank trains on."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.batch_schedule import (
    BatchSchedule,
    NotEnoughData,
    epoch_order,
    rank_shard,
    schedule_for,
)

from tests.support.factories import job


def _schedule(examples: int = 100, batch: int = 8, world: int = 2, total: int = 30) -> BatchSchedule:
    return BatchSchedule(
        examples=examples, global_batch=batch, world_size=world, total_steps=total, seed=7, shuffle=True
    )


def test_ranks_train_disjoint_shares_of_each_global_batch() -> None:
    p = _schedule()
    for step in range(5):
        first, second = p.rank_indices(step, 0), p.rank_indices(step, 1)
        assert len(first) == len(second) == 4 and not set(first) & set(second)


def test_one_epoch_visits_every_example_at_most_once() -> None:
    p = _schedule()
    seen = Counter(
        i for step in range(p.steps_per_epoch) for rank in (0, 1) for i in p.rank_indices(step, rank)
    )
    assert max(seen.values()) == 1 and len(seen) == p.steps_per_epoch * 8


def test_the_next_epoch_is_ordered_differently() -> None:
    p = _schedule()
    assert p.rank_indices(0, 0) != p.rank_indices(p.steps_per_epoch, 0)


def test_the_same_step_gives_the_same_examples_after_a_restart() -> None:
    assert _schedule().rank_indices(17, 1) == _schedule().rank_indices(17, 1)


@pytest.mark.parametrize(
    ("step", "epoch", "in_epoch"),
    [(0, 0, 0), (11, 0, 11), (12, 1, 0), (25, 2, 1)],
)
def test_position_names_epoch_and_step_within_it(step: int, epoch: int, in_epoch: int) -> None:
    position = _schedule().position(step).to_json()  # 100 // 8 = 12 steps per epoch
    assert (position["epoch"], position["stepInEpoch"], position["samplesSeen"]) == (
        epoch,
        in_epoch,
        step * 8,
    )


def test_epochs_set_the_total_when_max_steps_is_left_out() -> None:
    config = resolve_trainer_config(job({"spec.training.epochs": 3, "spec.training.globalBatchSize": 8}))
    assert schedule_for(config, 100).total_steps == 3 * 12


def test_max_steps_wins_over_the_data_size() -> None:
    config = resolve_trainer_config(job({"spec.training.maxSteps": 5}))
    assert schedule_for(config, 100).total_steps == 5


def test_fewer_examples_than_one_batch_is_refused_with_the_fix() -> None:
    config = resolve_trainer_config(job({"spec.training.globalBatchSize": 64}))
    with pytest.raises(NotEnoughData, match="globalBatchSize"):
        schedule_for(config, 10)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_shards_are_disjoint_and_cover_whole_steps(world_size: int) -> None:
    order = epoch_order(103, epoch=0, seed=5, shuffle=True)
    shards = [rank_shard(order, 0, r, world_size) for r in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert len(flat) == len(set(flat)) == 103 // world_size * world_size
    assert len({len(s) for s in shards}) == 1


def test_resuming_from_a_position_continues_with_the_next_unseen_samples() -> None:
    order = epoch_order(64, epoch=2, seed=5, shuffle=True)
    seen = {i for r in range(2) for i in rank_shard(order, 0, r, 2)[:10]}  # 10 steps of 2 ranks
    rest = {i for r in range(2) for i in rank_shard(order, 20, r, 2)}
    assert not seen & rest and len(seen | rest) == 64


def test_each_epoch_has_its_own_order() -> None:
    first, second = epoch_order(50, 0, seed=1, shuffle=True), epoch_order(50, 1, seed=1, shuffle=True)
    assert first.tolist() != second.tolist()
    assert epoch_order(50, 3, seed=1, shuffle=False).tolist() == list(range(50))


def test_an_epoch_order_is_the_permutation_a_shuffled_list_gets() -> None:
    """What checkpoints taken before the order became an array recorded as their data position."""
    shuffled = list(range(1000))
    random.Random("5:2").shuffle(shuffled)
    assert epoch_order(1000, epoch=2, seed=5, shuffle=True).tolist() == shuffled
