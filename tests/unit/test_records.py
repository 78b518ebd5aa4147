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
from finetune_trainer.data_plan import SeenFields
from finetune_trainer.records import (
    DataNotFound,
    DataReport,
    Record,
    fetch_source,
    in_validation,
    iter_records,
    mixture,
)


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _spec(*sources: dict[str, Any], **settings: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"sources": list(sources), **settings})


def _load(spec: DatasetSpec, cache: Path) -> tuple[list[list[Record]], DataReport]:
    report, seen = DataReport(), SeenFields(cache.with_name("seen.sqlite"))
    files = {i: fetch_source(s, cache) for i, s in enumerate(spec.sources)}
    records = [list(iter_records(spec, i, files[i], report, seen)) for i in files]
    seen.close()
    return records, report


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
    assert report.as_dict()["qa"] == {
        "read": 7, "malformed": 2, "empty": 2, "duplicates": 1, "kept": 2,
        "malformedReasons": {"no text under prompt and completion": 1, "not JSON": 1},
    }  # fmt: skip
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


def _validation(ids: list[str], seed: int) -> set[str]:
    return {i for i in ids if in_validation(i, 0.1, seed)}


def test_the_split_is_deterministic_and_near_the_fraction() -> None:
    ids = [f"s:{i}" for i in range(2000)]
    validation = _validation(ids, seed=7)
    assert _validation(ids, seed=7) == validation and 150 < len(validation) < 250
    assert _validation(ids, seed=8) != validation


def test_a_record_keeps_its_side_of_the_split_when_the_source_grows() -> None:
    before = _validation([f"s:{i}" for i in range(500)], seed=1)
    after = _validation([f"s:{i}" for i in range(1000)], seed=1)
    assert before <= after


def _epoch(counts: list[int], weights: list[float]) -> list[int]:
    return [int(p) for chunk in mixture(counts, weights, seed=0) for p in chunk]


def test_mixture_shares_follow_the_weights() -> None:
    epoch = _epoch([100, 100], [3.0, 1.0])  # positions 0-99 are source a's, 100-199 source b's
    assert sum(p < 100 for p in epoch) == 150 and sum(p >= 100 for p in epoch) == 50
    assert len({p for p in epoch if p >= 100}) == 50  # subsampled without repeats


def test_mixture_repeats_a_small_source_to_fill_its_share() -> None:
    epoch = _epoch([10, 90], [1.0, 1.0])
    assert sum(p < 10 for p in epoch) == 50 and set(epoch[:50]) == set(range(10))


def test_a_source_that_kept_nothing_takes_no_share() -> None:
    assert sorted(_epoch([0, 30], [5.0, 1.0])) == list(range(30))  # the other source's whole weight


def test_a_subsample_draws_every_subset_alike() -> None:
    """2 of 4 records under 6000 seeds: each of the 6 subsets about 1000 times (selection sampling)."""
    drawn = Counter(tuple(_subsample_of(seed)) for seed in range(6000))
    assert len(drawn) == 6 and all(850 < n < 1150 for n in drawn.values()), drawn


def _subsample_of(seed: int) -> list[int]:
    return [int(p) for chunk in mixture([4, 4], [1.0, 3.0], seed) for p in chunk if p < 4]
