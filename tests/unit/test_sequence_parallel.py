"""parallelism.sequence in the trainer (sequence_parallel.py): what is refused before any weight loads
(exit 2, naming the field), and how each rank cuts a collated micro batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator import contract
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.ds_config import deepspeed_config
from finetune_trainer.encoding import IGNORE_INDEX as X
from finetune_trainer.encoding import Example, collate
from finetune_trainer.sequence_parallel import SequenceParallelRefused, Shards, check, check_heads
from finetune_trainer.tiny import write_tiny_model
from transformers import LlamaConfig

from tests.support.factories import job


def _config(degree: int, changes: dict[str, Any] | None = None) -> Any:
    base = {
        "spec.dataset.sources": [{"uri": "file:///d.jsonl"}],
        "spec.resources.gpusPerNode": 4,
        "spec.resources.processesPerNode": 4,
        "spec.parallelism.sequence": degree,
    }
    return resolve_trainer_config(job({**base, **(changes or {})}))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 attention heads, 2 key/value heads."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_a_degree_that_divides_both_head_counts_is_accepted(tiny_model: Path) -> None:
    config = _config(2)
    check(config, str(tiny_model), deepspeed_config(config))


def test_key_value_heads_the_degree_does_not_divide_are_refused_naming_the_field(tiny_model: Path) -> None:
    config = _config(4)
    with pytest.raises(SequenceParallelRefused) as refused:
        check(config, str(tiny_model), deepspeed_config(config))
    assert refused.value.exit_code == contract.ExitCode.INVALID_CONFIG == 2
    assert str(refused.value).startswith(
        "parallelism.sequence: 4 must divide the model's attention heads (4) and key/value heads (2)"
    )
    assert "use 2" in str(refused.value)


@pytest.mark.parametrize("heads,kv_heads,degree", [(6, 6, 4), (12, 4, 3), (32, 8, 16)])
def test_heads_the_degree_does_not_divide_are_refused(heads: int, kv_heads: int, degree: int) -> None:
    model = LlamaConfig(hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv_heads)
    with pytest.raises(SequenceParallelRefused, match=r"^parallelism\.sequence: "):
        check_heads(degree, model)


def test_llama_70b_heads_take_up_to_8() -> None:
    model = LlamaConfig(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8)
    for degree in (2, 4, 8):
        check_heads(degree, model)


@pytest.mark.parametrize("objective", ["dpo", "distill"])
def test_objectives_other_than_sft_are_refused(tiny_model: Path, objective: str) -> None:
    config = _config(2)
    config = config.model_copy(
        update={"training": config.training.model_copy(update={"objective": objective})}
    )
    with pytest.raises(
        SequenceParallelRefused, match=rf"^parallelism\.sequence: .* training\.objective {objective}"
    ):
        check(config, str(tiny_model), deepspeed_config(config))


def test_zero3_without_reduce_scatter_is_refused(tiny_model: Path) -> None:
    override = {"zero_optimization": {"reduce_scatter": False}}
    config = _config(2, {"spec.deepspeed.zeroStage": 3, "spec.deepspeed.override": override})
    with pytest.raises(
        SequenceParallelRefused, match=r"^deepspeed\.override: zero_optimization\.reduce_scatter"
    ):
        check(config, str(tiny_model), deepspeed_config(config))


def test_nothing_is_checked_without_sequence_parallelism() -> None:
    config = _config(1)
    check(config, "/nonexistent", deepspeed_config(config))
    assert "sequence_parallel_size" not in deepspeed_config(config)


def test_the_deepspeed_config_names_the_degree() -> None:
    assert deepspeed_config(_config(2))["sequence_parallel_size"] == 2


def test_the_loss_multiplier_is_what_deepspeed_divides_the_summed_gradients_by() -> None:
    assert Shards(degree=2, rank=0, rows=1, zero3=False).multiplier(3) == 3  # ZeRO 0-2: data-parallel ranks
    assert Shards(degree=2, rank=0, rows=1, zero3=True).multiplier(3) == 6  # ZeRO-3: every rank


def _cut(examples: list[Example], degree: int, rows: int, flatten: bool = False) -> list[dict[str, Any]]:
    columns = collate(examples, 0, 64, flatten=flatten)
    return [Shards(degree=degree, rank=r, rows=rows, zero3=False).columns(columns) for r in range(degree)]


def test_each_rank_gets_its_consecutive_share_with_labels_shifted_over_the_whole_sequence() -> None:
    example = Example("a", [11, 12, 13, 14, 15], [X, X, 13, 14, 15])
    first, second = _cut([example], degree=2, rows=1)
    # width 5 padded to 6; the first shard's last token predicts the second shard's first
    assert first == {"input_ids": [[11, 12, 13]], "position_ids": [[0, 1, 2]], "shift_labels": [[X, 13, 14]]}
    assert second == {"input_ids": [[14, 15, 0]], "position_ids": [[3, 4, 5]], "shift_labels": [[15, X, X]]}


def test_a_short_micro_batch_is_filled_with_rows_that_train_nothing() -> None:
    (only,) = _cut([Example("a", [1, 2, 3, 4], [1, 2, 3, 4])], degree=1, rows=2)
    assert only["input_ids"] == [[1, 2, 3, 4], [0, 0, 0, 0]]
    assert only["shift_labels"][1] == [X] * 4
    assert only["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_packed_parts_keep_their_positions_and_padding_is_a_part_of_its_own() -> None:
    parts = [Example("a", [1, 2, 3], [1, 2, 3]), Example("b", [4, 5, 6], [4, 5, 6]), Example("c", [7], [7])]
    shards = _cut(parts, degree=4, rows=1, flatten=True)  # one row of 7, padded to 8: shards of 2
    positions = [p for s in shards for p in s["position_ids"][0]]
    labels = [t for s in shards for t in s["shift_labels"][0]]
    assert positions == [0, 1, 2, 0, 1, 2, 0, 0]
    # never predict across parts: a part's last token has no target (its next part's first label is -100)
    assert labels == [2, 3, X, 5, 6, X, X, X]


def test_a_checkpoint_of_another_world_size_is_refused_under_sequence_parallelism() -> None:
    """DeepSpeed's universal conversion reads the degree as tensor parallelism and fails on it."""
    from types import SimpleNamespace

    from finetune_trainer.sequence_parallel import refuse_conversion

    refuse_conversion(SimpleNamespace(sequence_parallel_size=1), 4, 2, 4)  # data parallel: converted
    why = r"^parallelism\.sequence: checkpoint step 4 .* resume at world size 2 \(resources\.nodes x "
    with pytest.raises(SequenceParallelRefused, match=why):
        refuse_conversion(SimpleNamespace(sequence_parallel_size=2), 4, 2, 4)
