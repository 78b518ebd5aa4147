"""The data plan: every split's records in their final order, written by rank 0 in a memory that does
not grow with the dataset.

Cleaning, deduplication, the split and the mixture need every record once, and the mixture needs to
know how many records each source kept before it can choose any. So the plan is two streaming passes
over disk, not a list of records in memory:

1. Every source's rows are read, cleaned and deduplicated in order (data.py). A validation record
   goes straight to `validation.jsonl` (its final order is the reading order); a train record goes to
   a spill file, with its byte offset in a memory-mapped column.
2. The mixture and its shuffle are computed on record positions, 8 bytes each in a memory-mapped
   column, and `train.jsonl` is written by copying each chosen record's line from the spill.

Seen fields live in a SQLite table on the same disk, so deduplicating a billion records costs disk,
not memory. Same seed, same sources, same settings: the same plan, record for record, which is what
lets the tokenized cache key (prepared_data.py) name the examples and a checkpoint's data position
name the next unseen batch.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from finetune_operator.api import TrainerConfig

from finetune_trainer.records import DataReport, Record, in_validation, iter_records, mixture, shares

SPLITS = ("train", "validation")


def plan_file(split: str) -> str:
    """A split's file inside a plan's directory (and under the cache's `plan/` in the store)."""
    return f"{split}.jsonl"


@dataclass(frozen=True)
class PlanSummary:
    counts: dict[str, int]  # records per split
    report: DataReport


class SeenFields:
    """Digests of the records kept so far, in a SQLite table on disk: SQLite's page cache is bounded,
    so a rank's memory stays flat however many records it dedupes."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._db = sqlite3.connect(path)
        # A scratch table rebuilt from the sources on every run: no journal, no fsync.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (digest BLOB PRIMARY KEY) WITHOUT ROWID")
        self._cursor = self._db.cursor()

    def __call__(self, digest: bytes) -> bool:
        """Whether `digest` was seen before; remembers it."""
        self._cursor.execute("INSERT OR IGNORE INTO seen VALUES (?)", (digest,))
        return self._cursor.rowcount == 0

    def close(self) -> None:
        self._db.close()


def _line(record: Record) -> bytes:
    return (json.dumps({"id": record.id, "source": record.source, "fields": record.fields}) + "\n").encode()


def _column(path: Path, values: Iterator[np.ndarray[Any, Any]], count: int) -> np.memmap[Any, Any]:
    """A memory-mapped int64 column of `count` values, filled chunk by chunk."""
    column = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(count,))
    at = 0
    for chunk in values:
        column[at : at + len(chunk)] = chunk
        at += len(chunk)
    assert at == count, (at, count)
    return column


def write_plan(config: TrainerConfig, files: dict[int, list[Path]], directory: Path) -> PlanSummary:
    """Plan every split into `directory` (`plan_file`: `train.jsonl`, `validation.jsonl`), using
    `directory`.work for the spill and the columns (removed when done)."""
    work = directory.with_name(directory.name + ".work")
    for path in (work, directory):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    report = DataReport()
    try:
        kept_train, validation = _first_pass(config, files, directory, work, report)
        train = _second_pass(config, kept_train, directory, work)
    finally:  # the spill is as large as the dataset: never left on scratch, even by a bad source
        shutil.rmtree(work, ignore_errors=True)
    return PlanSummary(counts={"train": train, "validation": validation}, report=report)


def _first_pass(config: TrainerConfig, files: dict[int, list[Path]], directory: Path, work: Path,
                report: DataReport) -> tuple[list[int], int]:  # fmt: skip
    """Read, clean and dedupe every source in order: validation records into their plan, train
    records into the spill. How many train records each source kept, and the validation count."""
    spec, seed = config.dataset, config.training.seed
    seen = SeenFields(work / "seen.sqlite")
    kept_train, validation_count, spilled = [], 0, 0
    try:
        with (work / "train.spill").open("wb") as spill, (work / "offsets.bin").open("wb") as offsets, \
                (directory / plan_file("validation")).open("wb") as validation:  # fmt: skip
            for index in range(len(spec.sources)):
                count = 0
                for record in iter_records(spec, index, files[index], report, seen):
                    if in_validation(record.id, spec.validation_fraction, seed):
                        validation.write(_line(record))
                        validation_count += 1
                        continue
                    offsets.write(np.int64(spilled).tobytes())
                    spilled += spill.write(_line(record))
                    count += 1
                kept_train.append(count)
    finally:
        seen.close()
    return kept_train, validation_count


def _second_pass(config: TrainerConfig, kept_train: list[int], directory: Path, work: Path) -> int:
    """Mix and shuffle record positions, then copy the chosen records' lines from the spill into
    the train plan, in that order. How many it holds."""
    seed, weights = config.training.seed, [s.weight for s in config.dataset.sources]
    total = sum(shares(kept_train, weights))
    order = _column(work / "order.npy", mixture(kept_train, weights, seed), total)
    # Mixing lays sources out one after another; shuffling once before packing keeps packed windows
    # from being single-source (the per-epoch order is shuffled again when training). shuffle()
    # swaps by position, so it shuffles the memory-mapped column in place.
    random.Random(f"{seed}:mix").shuffle(order)  # type: ignore[arg-type]
    with (work / "train.spill").open("rb") as spill, (directory / plan_file("train")).open("wb") as train:
        if total:
            starts = np.memmap(work / "offsets.bin", dtype=np.int64, mode="r")
            for position in order:
                spill.seek(int(starts[position]))
                train.write(spill.readline())
    return total


def read_plan(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Record]:
    """Records `start` to `stop` of a plan's split, streamed."""
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if stop is not None and index >= stop:
                return
            if index >= start:
                row = json.loads(line)
                yield Record(id=row["id"], source=row["source"], fields=row["fields"])
