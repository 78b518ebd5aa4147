"""The optimizer step alone pins which examples every rank trains on."""

from __future__ import annotations

from collections import Counter

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.step_plan import NotEnoughData, StepPlan, plan

from tests.support.factories import job


def _plan(examples: int = 100, batch: int = 8, world: int = 2, total: int = 30) -> StepPlan:
    return StepPlan(
        examples=examples, global_batch=batch, world_size=world, total_steps=total, seed=7, shuffle=True
    )


def test_ranks_train_disjoint_shares_of_each_global_batch() -> None:
    p = _plan()
    for step in range(5):
        first, second = p.rank_indices(step, 0), p.rank_indices(step, 1)
        assert len(first) == len(second) == 4 and not set(first) & set(second)


def test_one_epoch_visits_every_example_at_most_once() -> None:
    p = _plan()
    seen = Counter(
        i for step in range(p.steps_per_epoch) for rank in (0, 1) for i in p.rank_indices(step, rank)
    )
    assert max(seen.values()) == 1 and len(seen) == p.steps_per_epoch * 8


def test_the_next_epoch_is_ordered_differently() -> None:
    p = _plan()
    assert p.rank_indices(0, 0) != p.rank_indices(p.steps_per_epoch, 0)


def test_the_same_step_gives_the_same_examples_after_a_restart() -> None:
    assert _plan().rank_indices(17, 1) == _plan().rank_indices(17, 1)


@pytest.mark.parametrize(
    ("step", "epoch", "in_epoch"),
    [(0, 0, 0), (11, 0, 11), (12, 1, 0), (25, 2, 1)],
)
def test_position_names_epoch_and_step_within_it(step: int, epoch: int, in_epoch: int) -> None:
    position = _plan().position(step).to_json()  # 100 // 8 = 12 steps per epoch
    assert (position["epoch"], position["stepInEpoch"], position["samplesSeen"]) == (
        epoch,
        in_epoch,
        step * 8,
    )


def test_epochs_set_the_total_when_max_steps_is_left_out() -> None:
    config = resolve_trainer_config(job({"spec.training.epochs": 3, "spec.training.globalBatchSize": 8}))
    assert plan(config, 100).total_steps == 3 * 12


def test_max_steps_wins_over_the_data_size() -> None:
    config = resolve_trainer_config(job({"spec.training.maxSteps": 5}))
    assert plan(config, 100).total_steps == 5


def test_fewer_examples_than_one_batch_is_refused_with_the_fix() -> None:
    config = resolve_trainer_config(job({"spec.training.globalBatchSize": 64}))
    with pytest.raises(NotEnoughData, match="globalBatchSize"):
        plan(config, 10)
