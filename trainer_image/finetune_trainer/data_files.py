"""A dataset file's rows, streamed, in whichever of the forms users keep data in.

- JSON Lines: a first line that is a whole JSON object; one `json.loads` a line.
- A JSON array (`[{...}, ...]`, Alpaca's and LLaMA-Factory's form): first character `[`; ijson, an
  item at a time.
- A JSON object holding the list (`{"data": [...]}`): a first line that is not a whole object; ijson,
  under `recordsField` or the first key whose value is a list.
- Parquet: the `PAR1` magic; pyarrow, a record batch at a time.
- CSV: `format: csv` or a `.csv` name (CSV has no magic to read); the csv module, a row at a time.

The content decides among the JSON forms and parquet, whatever the name says: a `.json` file holding
JSON Lines, or a `.jsonl` file holding an array, reads as what it is. Nothing here holds a file
whole: a 10 GB JSON array costs one record of memory at a time.

A row is a dict; `None` for a blank line; a `Malformed` for a line or item that is not a JSON object
(its reason is counted in the data report). A JSON document that breaks off (truncated, bad syntax)
ends its file with one `Malformed("truncated")`: the rows before it still count.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

PARQUET_MAGIC = b"PAR1"
CSV_EXTENSIONS = (".csv",)
# Longer than any one JSON Lines record; a first line past it is a document (array or object).
FIRST_LINE_LIMIT = 64 << 20


@dataclass(frozen=True)
class Malformed:
    reason: str


Row = dict[str, Any] | Malformed | None


def file_form(path: Path, declared: str | None) -> str:
    """jsonl, json-array, json-object, parquet or csv: by content, with `declared` (the source's
    format) or the name deciding only what content cannot (CSV)."""
    with path.open("rb") as f:
        head = f.read(4)
        if head == PARQUET_MAGIC:
            return "parquet"
        if declared == "csv" or (declared is None and path.name.endswith(CSV_EXTENSIONS)):
            return "csv"
        f.seek(0)
        first = _first_meaningful_line(f)
    stripped = first.lstrip(b"\xef\xbb\xbf").strip()  # a UTF-8 byte order mark is not content
    if stripped.startswith(b"["):
        return "json-array"
    if stripped.startswith(b"{"):
        try:
            json.loads(stripped)
        except ValueError:
            return "json-object"  # an object spread over lines: one document, not lines
        return "jsonl"
    return "jsonl"  # anything else: lines, each counted malformed if it is not JSON


def _first_meaningful_line(f: BinaryIO) -> bytes:
    """The first line that is not blank, at most FIRST_LINE_LIMIT of it: a minified JSON document is
    one line as large as the file, and must not be read whole to learn its form."""
    while line := f.readline(FIRST_LINE_LIMIT):
        if line.strip():
            return line
    return b""


def read_rows(path: Path, declared: str | None, records_field: str | None = None) -> Iterator[Row]:
    form = file_form(path, declared)
    if form == "parquet":
        yield from _parquet(path)
    elif form == "csv":
        yield from _csv(path)
    elif form == "jsonl":
        yield from _lines(path)
    else:
        yield from _json_document(path, form, records_field)


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _csv(path: Path) -> Iterator[Row]:
    # newline="" lets the csv module read quoted cells holding line breaks as one cell.
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            if None in row:  # more cells than the header names
                yield Malformed("csv row longer than its header")
            elif not any((v or "").strip() for v in row.values()):
                yield None
            else:
                yield {k: v for k, v in row.items() if v is not None}


def _lines(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if not line.strip():
                yield None
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                yield Malformed("not JSON")
                continue
            yield value if isinstance(value, dict) else Malformed("not a JSON object")


def _json_document(path: Path, form: str, records_field: str | None) -> Iterator[Row]:
    import ijson

    with path.open("rb") as f:
        prefix = "item" if form == "json-array" else _list_key(f, records_field, path)
        if prefix is None:
            yield Malformed("a JSON object with no list of records")
            return
        _skip_bom(f)
        try:
            # use_float: numbers as floats, not Decimal, like json.loads.
            for value in ijson.items(f, prefix, use_float=True):
                yield value if isinstance(value, dict) else Malformed("not a JSON object")
        except ijson.JSONError:
            yield Malformed("truncated")


def _skip_bom(f: BinaryIO) -> None:
    f.seek(0)
    if f.read(3) != b"\xef\xbb\xbf":
        f.seek(0)


def _list_key(f: BinaryIO, records_field: str | None, path: Path) -> str | None:
    """ijson's prefix of the records in a top-level object: `recordsField`'s list, or the first
    key whose value is a list (found by streaming, without reading the list)."""
    import ijson

    if records_field is not None:
        return f"{records_field}.item"
    _skip_bom(f)
    try:
        for prefix, event, _ in ijson.parse(f):
            if event == "start_array" and prefix and "." not in prefix:
                return f"{prefix}.item"
    except ijson.JSONError:
        return None
    return None
