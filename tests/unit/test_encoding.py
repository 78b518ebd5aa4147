"""Records become token ids with the loss masked on everything that is not a target."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_trainer.encoding import IGNORE_INDEX, EncodingReport, Example, collate, encode, encode_all
from finetune_trainer.records import Record
from finetune_trainer.tiny import tiny_tokenizer

CORPUS = "what is two plus two four system be brief hello there how are you fine thanks long prompt"


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer([CORPUS])


def _rec(**fields: Any) -> Record:
    return Record(id="s:0", source="s", fields=fields)


def _targets(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_text_is_learned_whole_and_ends_with_eos(tok: Any) -> None:
    ids, labels = encode(_rec(text="hello there"), tok)
    assert ids == labels and ids[-1] == tok.eos_token_id


def test_prompt_tokens_are_masked_and_completion_tokens_learned(tok: Any) -> None:
    ids, labels = encode(_rec(prompt="what is two plus two", completion="four"), tok)
    assert labels[:5] == [IGNORE_INDEX] * 5
    assert _targets(tok, ids, labels) == "four </s>"


def test_only_assistant_turns_are_learned_in_a_chat(tok: Any) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    ids, labels = encode(_rec(messages=messages), tok)
    assert ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    targets = _targets(tok, ids, labels)
    assert targets == "hello <|end|> fine thanks <|end|>"  # answers and their end, not the role headers


def test_overlength_records_are_truncated_or_dropped_and_counted(tok: Any) -> None:
    records = [_rec(text="hello " * 20), _rec(text="hello there")]
    report = EncodingReport()
    kept = encode_all(records, tok, max_len=8, overlength="truncate", report=report)
    assert [len(e.input_ids) for e in kept] == [8, 3] and report.truncated == 1
    report = EncodingReport()
    kept = encode_all(records, tok, max_len=8, overlength="drop", report=report)
    assert len(kept) == 1 and report.dropped_overlength == 1


def test_a_prompt_filling_the_window_leaves_nothing_to_learn_and_is_dropped(tok: Any) -> None:
    report = EncodingReport()
    record = _rec(prompt="long prompt " * 10, completion="four")
    assert encode_all([record], tok, max_len=6, overlength="truncate", report=report) == []
    assert report.dropped_no_target == 1


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate(
        [Example("a", [5, 6, 7], [5, 6, 7]), Example("b", [8], [IGNORE_INDEX])], pad_id=1, max_len=16
    )
    assert batch["input_ids"] == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"][1] == [IGNORE_INDEX] * 3
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]


def test_a_packed_batch_restarts_positions_per_part_and_has_no_attention_mask() -> None:
    window = Example("a+b", [5, 6, 7, 8, 9], [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], segments=(3, 2))
    batch = collate([window, Example("c", [4, 4], [IGNORE_INDEX, 4])], pad_id=1, max_len=8, packed=True)
    assert "attention_mask" not in batch  # transformers reads packed position ids only without one
    assert batch["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the padding tail is a part too
    assert batch["labels"][1] == [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_a_flattened_batch_is_one_unpadded_row_whose_parts_never_predict_each_other() -> None:
    batch = collate([Example("a", [5, 6, 7], [5, 6, 7]), Example("b", [8, 9], [8, 9])], 1, 8, flatten=True)
    assert batch == {
        "input_ids": [[5, 6, 7, 8, 9]],
        "labels": [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]],
        "position_ids": [[0, 1, 2, 0, 1]],
    }


def test_an_overlength_record_split_into_windows_still_predicts_each_token_once(tok: Any) -> None:
    record = _rec(text=" ".join(["hello", "there", "how", "are", "you"] * 4))  # 20 words + eos
    report = EncodingReport()
    windows = encode_all([record], tok, max_len=8, overlength="split", report=report)
    ids, _ = encode(record, tok)
    assert report.split == 1 and [w.id for w in windows] == ["s:0", "s:0#1", "s:0#2"]
    assert all(len(w.input_ids) <= 8 for w in windows)
    predicted = [t for w in windows for t in w.labels[1:]]  # what the shifted loss learns
    assert predicted == ids[1:]
