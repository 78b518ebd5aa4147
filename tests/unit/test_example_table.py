"""Tokenized examples live on disk memory-mapped: what was written reads back exactly, lazily, and a
committed cache is only reused whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from finetune_trainer.encoding import IGNORE_INDEX, Example
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.prepared_data import MANIFEST, _commit, _prefix, _read
from finetune_trainer.storage import FileStore

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


def test_a_committed_cache_is_read_by_another_node(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    _commit(store, "k1", {"train": EXAMPLES, "validation": EXAMPLES[:1]}, {"train": 3}, tmp_path / "a" / "k1")
    assert _read(store, "k1", tmp_path / "b" / "k1")
    assert list(ExampleTable(tmp_path / "b" / "k1", "train")) == EXAMPLES


def test_a_torn_cache_is_not_reused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    _commit(store, "k1", {"train": EXAMPLES, "validation": []}, {}, tmp_path / "a" / "k1")
    tokens = tmp_path / "store" / _prefix("k1") / "train.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    assert not _read(store, "k1", tmp_path / "b" / "k1")
    assert not (tmp_path / "b" / "k1" / MANIFEST).exists()


def test_an_uncommitted_cache_is_not_reused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    _commit(store, "k1", {"train": EXAMPLES, "validation": []}, {}, tmp_path / "a" / "k1")
    store.delete([f"{_prefix('k1')}/{MANIFEST}"])
    assert not _read(store, "k1", tmp_path / "b" / "k1")
