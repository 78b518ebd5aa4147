"""The tokenized cache is found again exactly when nothing that shapes the examples changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer.prepared_data import build
from finetune_trainer.tiny import counting_records, tiny_tokenizer, write_jsonl
from finetune_trainer.tokenized_cache import cache_key

from tests.support.factories import job

CORPUS = ["count continue list go after :", " ".join(f"n{i}" for i in range(48))]


@pytest.fixture
def files(tmp_path: Path) -> dict[int, list[Path]]:
    return {0: [write_jsonl(tmp_path / "train.jsonl", counting_records(40))]}


def _config(changes: dict[str, Any] | None = None) -> Any:
    base = {"spec.dataset.sources": [{"uri": "file:///data/train.jsonl", "shape": "promptCompletion"}]}
    return resolve_trainer_config(job({**base, **(changes or {})}))


def test_the_same_inputs_give_the_same_key(files: dict[int, list[Path]]) -> None:
    tokenizer = tiny_tokenizer(CORPUS)
    assert cache_key(_config(), files, tokenizer) == cache_key(_config(), files, tiny_tokenizer(CORPUS))


@pytest.mark.parametrize(
    "changes",
    [{"spec.dataset.maxSeqLength": 64}, {"spec.dataset.packing": True}, {"spec.training.seed": 1}],
)
def test_a_dataset_setting_changes_the_key(files: dict[int, list[Path]], changes: dict[str, Any]) -> None:
    tokenizer = tiny_tokenizer(CORPUS)
    assert cache_key(_config(), files, tokenizer) != cache_key(_config(changes), files, tokenizer)


def test_other_data_changes_the_key(files: dict[int, list[Path]]) -> None:
    tokenizer = tiny_tokenizer(CORPUS)
    before = cache_key(_config(), files, tokenizer)
    write_jsonl(files[0][0], counting_records(41))
    assert cache_key(_config(), files, tokenizer) != before


def test_another_tokenizer_changes_the_key(files: dict[int, list[Path]]) -> None:
    other = tiny_tokenizer([*CORPUS, "extra words"])
    assert cache_key(_config(), files, tiny_tokenizer(CORPUS)) != cache_key(_config(), files, other)


def test_training_settings_outside_the_data_keep_the_key(files: dict[int, list[Path]]) -> None:
    tokenizer = tiny_tokenizer(CORPUS)
    assert cache_key(_config(), files, tokenizer) == cache_key(
        _config({"spec.training.learningRate": 0.5}), files, tokenizer
    )


def test_build_reports_what_cleaning_and_encoding_did(files: dict[int, list[Path]]) -> None:
    train, validation, report = build(
        _config({"spec.dataset.validationFraction": 0.2}), files, tiny_tokenizer(CORPUS)
    )
    source = report["sources"]["source0"]
    assert source["read"] == 40 and source["kept"] + source["duplicates"] == 40
    assert report["train"] == len(train) and report["validation"] == len(validation) and validation


def test_the_report_gives_the_padding_share_and_packing_lowers_it(files: dict[int, list[Path]]) -> None:
    tokenizer = tiny_tokenizer(CORPUS)
    changes = {"spec.dataset.maxSeqLength": 64, "spec.dataset.validationFraction": 0.2}
    train, _, padded = build(_config(changes), files, tokenizer)
    packed_train, _, packed = build(_config({**changes, "spec.dataset.packing": True}), files, tokenizer)
    tokens = sum(len(e.input_ids) for e in train)
    assert padded["paddingShare"]["train"] == round(1 - tokens / (len(train) * 64), 4)
    assert sum(len(e.input_ids) for e in packed_train) == tokens  # whole examples, none lost
    assert packed["paddingShare"]["train"] < padded["paddingShare"]["train"] / 2
