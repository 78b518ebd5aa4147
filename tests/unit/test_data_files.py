"""Dataset files in the forms users keep them, told apart by content; and the checks that stop a run
before it trains on a remnant of a source, or on chat data with no template to render it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api import FineTuneJob, resolve_trainer_config
from finetune_trainer.chat_templates import NoChatTemplate, choose
from finetune_trainer.data_files import Malformed, file_form, read_rows
from finetune_trainer.dropped import MostlyDropped, check_encoding, check_plan
from finetune_trainer.tiny import tiny_tokenizer

ROWS = [{"text": "one"}, {"text": "two"}, {"text": "three"}]


def _write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("name", "body", "form"),
    [
        ("a.jsonl", "\n".join(json.dumps(r) for r in ROWS), "jsonl"),
        ("a.json", json.dumps(ROWS, indent=2), "json-array"),
        ("a.json", json.dumps(ROWS), "json-array"),  # one line
        ("a.json", json.dumps({"version": 1, "data": ROWS}, indent=2), "json-object"),
        ("a.json", "\n".join(json.dumps(r) for r in ROWS), "jsonl"),  # JSON Lines named .json
        ("a.jsonl", json.dumps(ROWS, indent=2), "json-array"),  # an array named .jsonl
        ("a.json", "\ufeff" + json.dumps(ROWS), "json-array"),  # a byte order mark
    ],
)
def test_json_forms_are_told_apart_by_content_and_read_alike(
    tmp_path: Path, name: str, body: str, form: str
) -> None:
    path = _write(tmp_path / name, body)
    assert file_form(path, None) == form
    assert list(read_rows(path, None)) == ROWS


def test_a_json_object_reads_the_list_its_records_field_names(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", json.dumps({"other": [{"x": 1}], "rows": ROWS}, indent=1))
    assert list(read_rows(path, None)) == [{"x": 1}]  # the first list, without a name
    assert list(read_rows(path, None, records_field="rows")) == ROWS


def test_a_truncated_json_array_keeps_its_rows_and_counts_the_break(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", json.dumps(ROWS, indent=2)[:-10])
    rows = list(read_rows(path, None))
    assert rows[:2] == ROWS[:2] and rows[-1] == Malformed("truncated")


def test_items_that_are_not_objects_are_malformed_not_fatal(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.json", json.dumps([{"text": "a"}, 3, "x"]))
    not_object = Malformed("not a JSON object")
    assert list(read_rows(path, None)) == [{"text": "a"}, not_object, not_object]


def test_csv_is_read_by_name_or_format_with_quoted_line_breaks(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerow({"prompt": "two\nlines", "completion": "ok"})
    assert list(read_rows(path, None)) == [{"prompt": "two\nlines", "completion": "ok"}]
    renamed = path.rename(tmp_path / "a.data")
    assert list(read_rows(renamed, "csv")) == [{"prompt": "two\nlines", "completion": "ok"}]


def test_parquet_is_found_by_its_magic_whatever_its_name(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.json"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert file_form(path, "jsonl") == "parquet" and list(read_rows(path, None)) == ROWS


SOURCE = {"uri": "file:///d.jsonl", "shape": "chat", "name": "talk"}


def _config(tmp_path: Path, **dataset: Any) -> Any:
    job = FineTuneJob.model_validate({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "default"},
        "spec": {"model": {"source": "file:///m"}, "checkpoint": {"uri": "file:///c"},
                 "dataset": {"sources": [SOURCE], **dataset}},
    })  # fmt: skip
    return resolve_trainer_config(job)


def test_a_source_mostly_malformed_stops_the_run_naming_it_and_the_reasons(tmp_path: Path) -> None:
    config = _config(tmp_path)
    report = {"talk": {"read": 100, "malformed": 40, "malformedReasons": {"unknown role 'bot'": 40}}}
    with pytest.raises(MostlyDropped, match=r"dataset.sources\[0\] \(talk\): 40 of 100 .*unknown role 'bot'"):
        check_plan(config, report)
    check_plan(_config(tmp_path, maxDroppedFraction=0.5), report)  # a higher threshold lets it train


def test_a_source_the_template_mostly_cannot_label_stops_the_run_naming_chat_template(tmp_path: Path) -> None:
    lost = {"the chat template does not render tool calls": 30}
    encoding = {"records": {"talk": 40}, "lost": {"talk": lost}}
    with pytest.raises(MostlyDropped, match=r"dataset\.chatTemplate") as caught:
        check_encoding(_config(tmp_path), encoding)
    assert caught.value.exit_code == 2
    check_encoding(_config(tmp_path), {"records": {"talk": 100}, "lost": {"talk": {"x": 5}}})  # 5 % is fine


def test_chat_data_on_a_base_tokenizer_without_a_template_stops_naming_the_field(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(["hi there"])
    tokenizer.chat_template = None
    with pytest.raises(NoChatTemplate, match=r"dataset.chatTemplate: dataset.sources\[0\] is chat data"):
        choose(_config(tmp_path), tokenizer, str(tmp_path))


def test_a_named_template_is_set_on_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(["hi there"])
    tokenizer.chat_template = None
    choose(_config(tmp_path, chatTemplate={"name": "chatml"}), tokenizer, str(tmp_path))
    assert "<|im_start|>" in tokenizer.chat_template
