"""The data position a checkpoint carries is typed in the trainer and stored as the same JSON as
always, so a checkpoint written before it was typed resumes at the same position."""

from __future__ import annotations

import json
import pickle

from finetune_trainer.batch_schedule import BatchSchedule
from finetune_trainer.position import DataPosition

# What every trainer so far stored for step 25 of 100 examples in batches of 8, key "abc":
# `{**plan.position(step), "dataKey": data.key}` in DeepSpeed's client state and in MANIFEST.json.
STORED = {"globalStep": 25, "epoch": 2, "stepInEpoch": 1, "samplesSeen": 200, "dataKey": "abc"}


def _schedule() -> BatchSchedule:
    return BatchSchedule(examples=100, global_batch=8, world_size=2, total_steps=30, seed=7, shuffle=True)


def test_the_stored_json_keeps_its_keys_order_and_values() -> None:
    stored = _schedule().position(25, "abc").to_json()
    assert json.dumps(stored) == json.dumps(STORED)
    assert pickle.dumps(stored) == pickle.dumps(STORED)  # DeepSpeed's client state is pickled


def test_a_position_stored_before_reads_back_unchanged() -> None:
    position = DataPosition.from_json(dict(STORED))
    assert position == _schedule().position(25, "abc")
    assert position is not None and position.to_json() == STORED


def test_a_position_stored_without_a_data_key_keeps_none() -> None:
    stored = {k: v for k, v in STORED.items() if k != "dataKey"}
    position = DataPosition.from_json(stored)
    assert position is not None and position.data_key is None and position.to_json() == stored


def test_a_checkpoint_without_a_position_starts_fresh() -> None:
    assert DataPosition.from_json({}) is None
