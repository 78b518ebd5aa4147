"""Tokenized examples live on disk memory-mapped: what was written reads back exactly, lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from finetune_trainer import token_loss
from finetune_trainer.encoding import IGNORE_INDEX, Example
from finetune_trainer.example_table import ExampleTable, write_examples

EXAMPLES = [
    Example(id="source0:0", input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7]),
    Example(id="source0:1+source1:4", input_ids=[8], labels=[8]),
    Example(id="sóurce2:9", input_ids=[9, 10], labels=[IGNORE_INDEX, IGNORE_INDEX]),
]


def test_written_examples_read_back_exactly(tmp_path: Path) -> None:
    assert write_examples(iter(EXAMPLES), tmp_path, "train") == 3
    table = ExampleTable(tmp_path, "train")
    assert len(table) == 3 and list(table) == EXAMPLES and table[1] == EXAMPLES[1]


def test_an_empty_split_is_an_empty_table(tmp_path: Path) -> None:
    write_examples([], tmp_path, "validation")
    table = ExampleTable(tmp_path, "validation")
    assert len(table) == 0 and not table


def test_the_tokens_are_mapped_not_loaded(tmp_path: Path) -> None:
    """The ranks of a node share the files through the page cache: nothing is read into the process."""
    write_examples(EXAMPLES * 1000, tmp_path, "train")
    table = ExampleTable(tmp_path, "train")
    assert all(isinstance(column, np.memmap) for column in table._columns.values())


def test_target_counts_skip_the_first_label_and_the_masked_ones(tmp_path: Path) -> None:
    """The count transformers' shifted causal-LM loss divides by (`labels[..., 1:] != -100`)."""
    examples = [
        Example(id="a", input_ids=[1, 2, 3, 4], labels=[1, 2, 3, 4]),
        Example(id="b", input_ids=[5, 6, 7], labels=[IGNORE_INDEX, IGNORE_INDEX, 7]),
        Example(id="c", input_ids=[8, 9], labels=[8, IGNORE_INDEX]),
    ]
    write_examples(examples, tmp_path, "train")
    table = ExampleTable(tmp_path, "train")
    assert [token_loss.targets_of(e.labels) for e in examples] == [3, 1, 0]
    assert table.targets([0, 1, 2]) == 4
    assert table.targets([1, 1]) == 2


def test_a_packed_windows_parts_read_back(tmp_path: Path) -> None:
    window = Example(
        id="a+b", input_ids=[1, 2, 3, 4, 5], labels=[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], segments=(3, 2)
    )
    write_examples([EXAMPLES[0], window, EXAMPLES[1]], tmp_path, "train")
    table = ExampleTable(tmp_path, "train")
    assert list(table) == [EXAMPLES[0], window, EXAMPLES[1]]
    assert table[1].position_ids == [0, 1, 2, 0, 1] and table.lengths().tolist() == [3, 5, 1]
