"""The tokenized cache is committed like a checkpoint: a committed cache is only reused whole."""

from __future__ import annotations

from pathlib import Path

from finetune_trainer.committed_dir import MANIFEST
from finetune_trainer.encoding import IGNORE_INDEX, Example
from finetune_trainer.example_table import ExampleTable
from finetune_trainer.storage import FileStore
from finetune_trainer.tokenized_cache import CacheLayout, commit_cache, read_cache

EXAMPLES = [
    Example(id="source0:0", input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7]),
    Example(id="source0:1+source1:4", input_ids=[8], labels=[8]),
    Example(id="sóurce2:9", input_ids=[9, 10], labels=[IGNORE_INDEX, IGNORE_INDEX]),
]


def test_a_committed_cache_is_read_by_another_node(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    splits = {"train": EXAMPLES, "validation": EXAMPLES[:1]}
    commit_cache(store, CacheLayout("k1", tmp_path / "a"), splits, {"train": 3}, 64)
    assert read_cache(store, CacheLayout("k1", tmp_path / "b"))
    assert list(ExampleTable(tmp_path / "b" / "k1", "train")) == EXAMPLES


def test_a_torn_cache_is_not_reused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    commit_cache(store, CacheLayout("k1", tmp_path / "a"), {"train": EXAMPLES, "validation": []}, {}, 64)
    tokens = tmp_path / "store" / CacheLayout("k1", tmp_path / "a").prefix / "train.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    assert not read_cache(store, CacheLayout("k1", tmp_path / "b"))
    assert not (tmp_path / "b" / "k1" / MANIFEST).exists()


def test_an_uncommitted_cache_is_not_reused(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    commit_cache(store, CacheLayout("k1", tmp_path / "a"), {"train": EXAMPLES, "validation": []}, {}, 64)
    store.delete([f"{CacheLayout('k1', tmp_path / 'a').prefix}/{MANIFEST}"])
    assert not read_cache(store, CacheLayout("k1", tmp_path / "b"))
