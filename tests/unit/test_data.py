"""Dataset expansion on small hand-made files: cleaning counts, dedupe, split, mixture, shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from finetune_operator.api.spec import DatasetSpec
from finetune_trainer.data import (
    DataNotFound,
    DataReport,
    Record,
    epoch_order,
    fetch_source,
    load_records,
    mix,
    rank_shard,
    split,
)


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _spec(*sources: dict[str, Any], **settings: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"sources": list(sources), **settings})


def _load(spec: DatasetSpec, cache: Path) -> tuple[list[list[Record]], DataReport]:
    report = DataReport()
    files = {i: fetch_source(s, cache) for i, s in enumerate(spec.sources)}
    return load_records(spec, files, report), report


def test_cleaning_counts_malformed_empty_and_duplicate_rows(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "qa.jsonl",
        [
            {"prompt": "2+2?", "completion": "4"},
            {"prompt": "3+3?", "completion": "6"},
            {"prompt": "2+2?", "completion": "4"},  # duplicate
            {"prompt": "no answer", "completion": "   "},  # empty
            {"prompt": "wrong type", "completion": 7},  # malformed
            "{not json",  # malformed
            "",  # empty line
        ],
    )
    spec = _spec({"uri": f"file://{path}", "shape": "promptCompletion", "name": "qa"})
    (records,), report = _load(spec, tmp_path / "cache")
    assert report.as_dict()["qa"] == {"read": 7, "malformed": 2, "empty": 2, "duplicates": 1, "kept": 2}
    assert [r.id for r in records] == ["qa:0", "qa:1"]


def test_duplicates_are_removed_across_sources(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "shared"}, {"text": "only a"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "shared"}, {"text": "only b"}])
    spec = _spec({"uri": f"file://{a}", "name": "a"}, {"uri": f"file://{b}", "name": "b"})
    (ra, rb), report = _load(spec, tmp_path / "cache")
    assert len(ra) == 2 and len(rb) == 1 and report.duplicates["b"] == 1


def test_dedupe_can_be_turned_off(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}, {"text": "x"}])
    (records,), _ = _load(_spec({"uri": f"file://{path}"}, dedupe=False), tmp_path / "cache")
    assert len(records) == 2


def test_chat_records_need_an_assistant_answer(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}]},  # nothing to learn: empty
            {"messages": [{"role": "user"}]},  # malformed
        ],
    )
    (records,), report = _load(
        _spec({"uri": f"file://{path}", "shape": "chat", "name": "c"}), tmp_path / "cache"
    )
    assert len(records) == 1 and report.empty["c"] == 1 and report.malformed["c"] == 1


def test_parquet_sources_and_custom_field_names(tmp_path: Path) -> None:
    table = pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    spec = _spec(
        {
            "uri": f"file://{tmp_path}/docs.parquet",
            "shape": "promptCompletion",
            "promptField": "question",
            "completionField": "answer",
        }
    )
    (records,), _ = _load(spec, tmp_path / "cache")
    assert records[1].fields == {"prompt": "q2", "completion": "a2"}


def test_a_prefix_source_reads_every_data_file_under_it(tmp_path: Path) -> None:
    _jsonl(tmp_path / "corpus/part-0.jsonl", [{"text": "a"}])
    _jsonl(tmp_path / "corpus/part-1.jsonl", [{"text": "b"}])
    (tmp_path / "corpus/README.md").write_text("not data")
    (records,), _ = _load(_spec({"uri": f"file://{tmp_path}/corpus/", "format": "jsonl"}), tmp_path / "cache")
    assert sorted(r.fields["text"] for r in records) == ["a", "b"]


def test_s3_sources_are_read_through_the_store(s3_env: Any, tmp_path: Path) -> None:
    bucket = s3_env.new_bucket()
    s3_env.client().put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"text": "from s3"}\n')
    (records,), _ = _load(_spec({"uri": f"s3://{bucket}/data/train.jsonl"}), tmp_path / "cache")
    assert records[0].fields == {"text": "from s3"}


def test_a_missing_source_is_data_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="not found"):
        _load(_spec({"uri": f"file://{tmp_path}/nope.jsonl"}), tmp_path / "cache")


def _records(n: int, source: str = "s") -> list[Record]:
    return [Record(id=f"{source}:{i}", source=source, fields={"text": str(i)}) for i in range(n)]


def test_the_split_is_deterministic_disjoint_and_near_the_fraction() -> None:
    records = _records(2000)
    train, validation = split(records, 0.1, seed=7)
    assert split(records, 0.1, seed=7) == (train, validation)
    assert not {r.id for r in train} & {r.id for r in validation}
    assert len(train) + len(validation) == 2000 and 150 < len(validation) < 250


def test_a_record_keeps_its_side_of_the_split_when_the_source_grows() -> None:
    _, before = split(_records(500), 0.1, seed=1)
    _, after = split(_records(1000), 0.1, seed=1)
    assert {r.id for r in before} <= {r.id for r in after}


def test_mixture_shares_follow_the_weights() -> None:
    epoch = mix([_records(100, "a"), _records(100, "b")], [3.0, 1.0], seed=0)
    counts = Counter(r.source for r in epoch)
    assert counts == {"a": 150, "b": 50}
    assert len({r.id for r in epoch if r.source == "b"}) == 50  # subsampled without repeats


def test_mixture_repeats_a_small_source_to_fill_its_share() -> None:
    epoch = mix([_records(10, "small"), _records(90, "big")], [1.0, 1.0], seed=0)
    assert Counter(r.source for r in epoch)["small"] == 50


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
    assert epoch_order(50, 0, seed=1, shuffle=True) != epoch_order(50, 1, seed=1, shuffle=True)
    assert epoch_order(50, 3, seed=1, shuffle=False) == list(range(50))
