"""Tokenized examples on disk, memory-mapped: every rank of a node maps the same files, so the page
cache holds one copy per node and a rank's own memory does not grow with the dataset.

One split (`train`, `validation`) is five flat files, written in one streaming pass:

    <split>.tokens.bin   int32  every example's input ids, one after another
    <split>.labels.bin   int32  the labels, aligned with the tokens (-100 where nothing is learned)
    <split>.ends.bin     int64  where each example's tokens end
    <split>.ids.bin      utf-8  every example's id (`<source>:<row>`, `+`-joined when packed)
    <split>.id_ends.bin  int64  where each id ends
    <split>.segments.bin int32  the lengths of each example's parts (one part unless packed)
    <split>.segment_ends.bin int64 where each example's parts end

Example `i` is read on demand (two slices and an id), so training touches only the pages of the
examples it trains on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from finetune_trainer.encoding import IGNORE_INDEX, Example

COLUMNS = {
    "tokens": np.int32,
    "labels": np.int32,
    "ends": np.int64,
    "ids": np.uint8,
    "id_ends": np.int64,
    "segments": np.int32,
    "segment_ends": np.int64,
}


def _path(directory: Path, split: str, column: str) -> Path:
    return directory / f"{split}.{column}.bin"


def write_examples(examples: Iterable[Example], directory: Path, split: str) -> int:
    """Stream `examples` into the split's files; how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, IO[bytes]] = {c: _path(directory, split, c).open("wb") for c in COLUMNS}
    count = token_end = id_end = segment_end = 0
    try:
        for example in examples:
            files["tokens"].write(np.asarray(example.input_ids, dtype=np.int32).tobytes())
            files["labels"].write(np.asarray(example.labels, dtype=np.int32).tobytes())
            token_end += len(example.input_ids)
            files["ends"].write(np.int64(token_end).tobytes())
            encoded = example.id.encode()
            files["ids"].write(encoded)
            id_end += len(encoded)
            files["id_ends"].write(np.int64(id_end).tobytes())
            segments = example.segments or (len(example.input_ids),)
            files["segments"].write(np.asarray(segments, dtype=np.int32).tobytes())
            segment_end += len(segments)
            files["segment_ends"].write(np.int64(segment_end).tobytes())
            count += 1
    finally:
        for f in files.values():
            f.close()
    return count


def _map(path: Path, dtype: Any) -> np.ndarray[Any, Any]:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class ExampleTable:
    """A read-only sequence of Examples backed by the split's memory-mapped files."""

    def __init__(self, directory: Path, split: str) -> None:
        self._columns = {c: _map(_path(directory, split, c), dtype) for c, dtype in COLUMNS.items()}

    def __len__(self) -> int:
        return len(self._columns["ends"])

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < len(self):
            raise IndexError(index)
        c = self._columns
        start = int(c["ends"][index - 1]) if index else 0
        end = int(c["ends"][index])
        id_start = int(c["id_ends"][index - 1]) if index else 0
        segment_start = int(c["segment_ends"][index - 1]) if index else 0
        segments = tuple(c["segments"][segment_start : int(c["segment_ends"][index])].tolist())
        return Example(
            id=bytes(c["ids"][id_start : int(c["id_ends"][index])]).decode(),
            input_ids=c["tokens"][start:end].tolist(),
            labels=c["labels"][start:end].tolist(),
            segments=segments if len(segments) > 1 else (),
        )

    def lengths(self) -> np.ndarray[Any, Any]:
        """Every example's token count, from the mapped ends alone."""
        return np.diff(self._columns["ends"], prepend=0)

    def token_count(self, indices: Iterable[int]) -> int:
        """How many tokens the examples at `indices` hold, from the mapped ends alone."""
        ends = self._columns["ends"]
        return sum(int(ends[i]) - (int(ends[i - 1]) if i else 0) for i in indices)

    def targets(self, indices: Iterable[int]) -> int:
        """How many tokens the examples at `indices` are trained to predict (token_loss.targets_of),
        counted on the mapped labels without copying them."""
        ends, labels = self._columns["ends"], self._columns["labels"]
        total = 0
        for index in indices:
            start = int(ends[index - 1]) if index else 0
            total += int(np.count_nonzero(labels[start + 1 : int(ends[index])] != IGNORE_INDEX))
        return total

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))
