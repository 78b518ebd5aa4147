"""The record formats users bring (OpenAI messages, ShareGPT conversations, Alpaca), each on a small
hand-made file with malformed rows: bad rows are counted, never fatal, and only answers are learned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.spec import DatasetSpec
from finetune_trainer.encoding import IGNORE_INDEX, EncodingReport, encode, encode_all
from finetune_trainer.records import ALPACA_PROMPT, DataReport, Record, fetch_source, iter_records
from finetune_trainer.tiny import tiny_tokenizer

CORPUS = "hi hello how are you fine thanks be brief add two and three five it is what"


def _load(tmp_path: Path, rows: list[Any], **source: Any) -> tuple[list[Record], dict[str, int]]:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    spec = DatasetSpec.model_validate({"sources": [{"uri": f"file://{path}", "name": "s", **source}]})
    report, files = DataReport(), fetch_source(spec.sources[0], tmp_path / "cache")
    records = list(iter_records(spec, 0, files, report, seen=lambda digest: False))
    return records, report.as_dict()["s"]


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer([CORPUS])


def _learned(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_openai_messages_with_malformed_rows(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records, counts = _load(
        tmp_path,
        [
            good,
            "{not json",
            {"messages": "hi"},  # not a list
            {"messages": [{"role": "user", "content": 3}]},  # content not text
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # role
            {"messages": [{"role": "user", "content": "hi"}]},  # nothing to learn
            "",
        ],
        shape="chat",
    )
    assert [r.fields for r in records] == [good]
    assert counts == {
        "read": 7, "malformed": 4, "empty": 2, "duplicates": 0, "kept": 1,
        "malformedReasons": {
            "not JSON": 1,
            "no list of messages under messages": 1,
            "content that is neither text nor a list of parts": 1,
            "unknown role 'robot'": 1,
        },
    }  # fmt: skip


def test_sharegpt_conversations_map_their_roles_and_learn_only_gpt_turns(tmp_path: Path, tok: Any) -> None:
    conversation = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "how are you"},
        {"from": "gpt", "value": "fine thanks"},
    ]
    records, counts = _load(
        tmp_path,
        [{"conversations": conversation}, {"conversations": [{"from": "human"}]}],
        shape="chat",
        messagesField="conversations",
        roleField="from",
        contentField="value",
    )
    assert counts["kept"] == 1 and counts["malformed"] == 1
    assert [m["role"] for m in records[0].fields["messages"]] == ["system", "user", "assistant"]
    ids, labels = encode(records[0], tok)
    assert _learned(tok, ids, labels) == "fine thanks <|end|>"  # the answer and its end, no header


def test_custom_role_names_replace_the_defaults(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "customer", "content": "hi"}, {"role": "agent", "content": "hello"}]}]
    records, _ = _load(tmp_path, rows, shape="chat", userRoles=["customer"], assistantRoles=["agent"])
    assert [m["role"] for m in records[0].fields["messages"]] == ["user", "assistant"]


def test_alpaca_becomes_its_prompt_and_the_output_alone_is_learned(tmp_path: Path, tok: Any) -> None:
    rows = [
        {"instruction": "add two and three", "input": "", "output": "five"},
        {"instruction": "what is it", "input": "hi", "output": "hello"},
        {"instruction": "add", "output": 5},  # output not text
        {"instruction": 1, "input": "", "output": "x"},  # instruction not text
        {"instruction": "add", "input": "", "output": "  "},  # nothing to learn
        {"instruction": "what is it", "input": None, "output": "it"},  # a null input is no input
    ]
    records, counts = _load(tmp_path, rows, shape="alpaca")
    assert {k: v for k, v in counts.items() if k != "malformedReasons"} == {
        "read": 6, "malformed": 2, "empty": 1, "duplicates": 0, "kept": 3
    }  # fmt: skip
    assert records[0].fields["prompt"] == ALPACA_PROMPT.format(
        with_input="", instruction="add two and three", input=""
    )
    assert "### Input:\nhi\n\n### Response:\n" in records[1].fields["prompt"]
    ids, labels = encode(records[0], tok)
    assert _learned(tok, ids, labels) == "five </s>"


GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|> ' }}"
    "{% generation %}{{ m['content'] + ' <|end|> ' }}{% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
)


def test_a_template_that_marks_generation_gives_the_assistant_mask(tok: Any) -> None:
    """The template's own `{% generation %}` marks decide (here: the role header is not learned,
    which the turn-by-turn method, taking every token a turn adds, would learn)."""
    marked = tiny_tokenizer([CORPUS])
    marked.chat_template = GENERATION_TEMPLATE
    messages = [
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    ids, labels = encode(Record("s:0", "s", {"messages": messages}), marked)
    assert _learned(marked, ids, labels) == "fine thanks <|end|> hello <|end|>"


def test_a_record_the_template_refuses_is_counted_not_fatal(tok: Any) -> None:
    strict = tiny_tokenizer([CORPUS])
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] + ' ' }}{% endfor %}"
    )
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    report = EncodingReport()
    records = [Record("s:0", "s", {"messages": bad}), Record("s:1", "s", {"messages": good})]
    kept = encode_all(records, strict, max_len=64, overlength="truncate", report=report)
    assert [e.id for e in kept] == ["s:1"] and report.unencodable == 1
