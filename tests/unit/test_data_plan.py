"""Rank 0's data plan streams through disk: the same inputs give the same plan, record for record
(what the tokenized cache key and a checkpoint's data position rely on), in a memory that does not
grow with the dataset, and nothing but the plan is left on scratch."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import resolve_trainer_config
from finetune_trainer import records
from finetune_trainer.data_plan import SeenFields, read_plan, write_plan
from finetune_trainer.tiny import write_jsonl

from tests.support.factories import job


def _rows(prefix: str, count: int, repeats_after: int) -> list[dict[str, str]]:
    return [{"prompt": f"{prefix} q{i % repeats_after}", "completion": f"a{i % repeats_after}"}
            for i in range(count)]  # fmt: skip


def _two_sources(tmp_path: Path, a: int = 60, b: int = 25) -> tuple[Any, dict[int, list[Path]]]:
    """Source a (weight 1) subsampled, source b (weight 3) repeated; 5 duplicates in each."""
    paths = [
        write_jsonl(tmp_path / "a.jsonl", _rows("a", a, a - 5)),
        write_jsonl(tmp_path / "b.jsonl", _rows("b", b, b - 5)),
    ]
    config = resolve_trainer_config(job({
        "spec.dataset.sources": [
            {"uri": f"file://{paths[0]}", "shape": "promptCompletion", "name": "a", "weight": 1.0},
            {"uri": f"file://{paths[1]}", "shape": "promptCompletion", "name": "b", "weight": 3.0},
        ],
        "spec.dataset.validationFraction": 0.2, "spec.training.seed": 11,
    }))  # fmt: skip
    return config, {0: [paths[0]], 1: [paths[1]]}


def _ids(path: Path) -> list[str]:
    return [r.id for r in read_plan(path)]


def _plan(tmp_path: Path, config: Any, files: dict[int, list[Path]]) -> tuple[list[str], list[str]]:
    write_plan(config, files, tmp_path / "plan")
    return _ids(tmp_path / "plan/train.jsonl"), _ids(tmp_path / "plan/validation.jsonl")


def test_the_same_inputs_give_the_same_plan_record_for_record(tmp_path: Path) -> None:
    config, files = _two_sources(tmp_path)
    assert _plan(tmp_path / "first", config, files) == _plan(tmp_path / "second", config, files)


def test_the_plan_mixes_by_weight_and_shuffles_the_sources_together(tmp_path: Path) -> None:
    config, files = _two_sources(tmp_path)
    train, validation = _plan(tmp_path, config, files)
    from_a = [i for i in train if i.startswith("a:")]
    assert len(from_a) == len(set(from_a)) == round(len(train) / 4)  # weights 1 : 3, a subsampled
    assert not set(train) & set(validation)
    assert {i[0] for i in train[:10]} == {"a", "b"}


def test_the_report_counts_what_cleaning_did_per_source(tmp_path: Path) -> None:
    config, files = _two_sources(tmp_path)
    report = write_plan(config, files, tmp_path / "plan").report.as_dict()
    assert report["a"] == {"read": 60, "malformed": 0, "empty": 0, "duplicates": 5, "kept": 55}
    assert report["b"] == {"read": 25, "malformed": 0, "empty": 0, "duplicates": 5, "kept": 20}


def test_the_plan_leaves_only_its_two_splits(tmp_path: Path) -> None:
    config, files = _two_sources(tmp_path)
    write_plan(config, files, tmp_path / "plan")
    assert sorted(p.name for p in tmp_path.iterdir() if "plan" in p.name) == ["plan"]
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == ["train.jsonl", "validation.jsonl"]


def test_a_source_that_cannot_be_read_leaves_no_spill_behind(tmp_path: Path) -> None:
    config, files = _two_sources(tmp_path)
    (tmp_path / "b.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        write_plan(config, files, tmp_path / "plan")
    assert not (tmp_path / "plan.work").exists()


def test_a_record_with_fields_seen_before_is_a_duplicate(tmp_path: Path) -> None:
    seen = SeenFields(tmp_path / "seen.sqlite")
    assert [seen(b"x"), seen(b"y"), seen(b"x")] == [False, False, True]


def _python_peak(tmp_path: Path, records: int) -> int:
    config, files = _two_sources(tmp_path, a=records, b=records // 4)
    tracemalloc.start()
    try:
        write_plan(config, files, tmp_path / "plan")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_planning_memory_does_not_grow_with_the_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's peak heap while planning 16x the records (SQLite's bounded page cache and the
    memory-mapped columns are outside it, by design), with the mixture handed on 256 positions at a
    time so that its fixed-size chunks fill at both sizes. Holding the records grows it about 16x."""
    monkeypatch.setattr(records, "CHUNK", 256)
    small = _python_peak(tmp_path / "1x", 2_000)
    large = _python_peak(tmp_path / "16x", 32_000)
    assert large < 1.5 * small, (small, large)
