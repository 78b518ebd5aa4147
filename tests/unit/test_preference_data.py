"""Preference pairs (shape preference): every form users keep them in read to one shape, refused with a
reason the data report counts when malformed, and encoded as one example of two sides that begin with
the same prompt ids, the prompt never learned. The real LLaMA-Factory ranking file, Llama tokenizers
and template are read from ../shared/realworld (those tests skip, with that reason, without it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.spec import DatasetSource, DatasetSpec
from finetune_trainer import preferences
from finetune_trainer.encoding import IGNORE_INDEX, EncodingReport, Example, encode, encode_all
from finetune_trainer.example_table import ExampleTable, write_examples
from finetune_trainer.messages import Refused
from finetune_trainer.preference_records import clean_pair
from finetune_trainer.preferences import encode_pair, join_pair, pair_columns, split_pair
from finetune_trainer.records import DataReport, Record, iter_records
from finetune_trainer.tiny import tiny_tokenizer

from tests.unit.test_realworld_pipeline import REALWORLD

CORPUS = "what is two plus two four five be brief hello there how are you fine thanks bad long prompt"
needs_realworld = pytest.mark.skipif(
    not REALWORLD.is_dir(), reason=f"{REALWORLD} is not beside this checkout"
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer([CORPUS])


def _source(**fields: Any) -> DatasetSource:
    return DatasetSource.model_validate({"uri": "file:///pairs.jsonl", "shape": "preference", **fields})


def _clean(row: dict[str, Any], reasoning: str = "train", **source: Any) -> dict[str, Any]:
    return clean_pair(_source(**source), row, reasoning)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _pair(
    prompt: Any = "what is two plus two", chosen: Any = "four", rejected: Any = "five"
) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _learned(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def _prompt_length(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


# Reading: every form to the one shape


def test_a_trl_pair_of_texts_is_kept_as_text() -> None:
    assert _clean(_pair()) == _pair()


def test_a_trl_conversational_pair_is_kept_as_messages() -> None:
    row = _pair([_user("what is two plus two")], [_assistant("four")], [_assistant("five")])
    assert _clean(row) == row


def test_trl_implicit_conversations_split_at_their_longest_common_prefix() -> None:
    opening = [_user("hello there"), _assistant("hello"), _user("what is two plus two")]
    row = {"chosen": [*opening, _assistant("four")], "rejected": [*opening, _assistant("five")]}
    assert _clean(row) == _pair(opening, [_assistant("four")], [_assistant("five")])


def test_trl_implicit_texts_split_before_the_first_word_they_differ_in() -> None:
    row = {"chosen": "Human: what color is the sky? Assistant: It is blue.",
           "rejected": "Human: what color is the sky? Assistant: It is black."}  # fmt: skip
    assert _clean(row) == _pair("Human: what color is the sky? Assistant: It is", " blue.", " black.")


def test_answers_that_are_whole_conversations_carry_their_prompt_beside_a_prompt_column() -> None:
    """UltraFeedback's form: the prompt as a column and again at the start of each conversation."""
    row = _pair("what is two plus two", [_user("what is two plus two"), _assistant("four")],
                [_user("what is two plus two"), _assistant("five")])  # fmt: skip
    assert _clean(row) == _pair([_user("what is two plus two")], [_assistant("four")], [_assistant("five")])


def test_the_llamafactory_ranking_format_reads_sharegpt_prompt_and_single_message_answers() -> None:
    row = {
        "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}],
        "chosen": {"from": "gpt", "value": "hello"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    assert _clean(row) == _pair(
        [{"role": "system", "content": "be brief"}, _user("hi")], [_assistant("hello")], [_assistant("bad")]
    )


def test_the_llamafactory_ranking_format_reads_role_and_content_messages() -> None:
    row = {"messages": [_user("hi")], "chosen": _assistant("hello"), "rejected": _assistant("bad")}
    assert _clean(row) == _pair([_user("hi")], [_assistant("hello")], [_assistant("bad")])


def test_a_text_prompt_with_message_answers_is_a_chat_with_one_user_turn() -> None:
    row = _pair("hi", [_assistant("hello")], [_assistant("bad")])
    assert _clean(row) == _pair([_user("hi")], [_assistant("hello")], [_assistant("bad")])


def test_message_prompt_with_text_answers_is_a_chat_with_one_assistant_turn_each() -> None:
    row = _pair([_user("hi")], "hello", "bad")
    assert _clean(row) == _pair([_user("hi")], [_assistant("hello")], [_assistant("bad")])


def test_a_system_column_opens_a_chat_prompt() -> None:
    row = {**_pair([_user("hi")], "hello", "bad"), "system": "be brief"}
    assert _clean(row)["prompt"] == [{"role": "system", "content": "be brief"}, _user("hi")]


def test_a_system_column_stays_beside_a_pair_of_texts() -> None:
    """Orca DPO pairs' form: system, question, chosen, rejected."""
    row = {"system": "be brief", "question": "hi", "chosen": "hello", "rejected": "bad"}
    assert _clean(row, promptField="question") == {**_pair("hi", "hello", "bad"), "system": "be brief"}


def test_a_tools_column_makes_a_chat_with_openai_tools() -> None:
    row = {**_pair(), "tools": json.dumps([{"name": "add", "parameters": {}}])}
    fields = _clean(row)
    assert fields["prompt"] == [_user("what is two plus two")]
    assert fields["tools"] == [{"type": "function", "function": {"name": "add", "parameters": {}}}]


def test_field_names_come_from_the_source() -> None:
    row = {"q": "hi", "good": "hello", "worse": "bad"}
    assert _clean(row, promptField="q", chosenField="good", rejectedField="worse") == _pair(
        "hi", "hello", "bad"
    )


def test_reasoning_drop_removes_the_thinking_from_both_answers() -> None:
    row = _pair(
        [_user("hi")], [_assistant("<think>greet</think>hello")], [_assistant("<think>no</think>bad")]
    )
    fields = _clean(row, reasoning="drop")
    assert fields["chosen"] == [_assistant("hello")] and fields["rejected"] == [_assistant("bad")]


def test_tool_calls_in_the_prompt_have_the_same_ids_before_either_answer() -> None:
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "add", "arguments": {}}}],
    }
    prompt = [_user("two plus two"), call, {"role": "tool", "content": "4"}]
    fields = _clean(_pair(prompt, "four", "five"))
    call_id = fields["prompt"][1]["tool_calls"][0]["id"]
    assert fields["prompt"][2]["tool_call_id"] == call_id
    assert json.loads(json.dumps(fields)) == fields  # what the data plan writes and reads back


# Refusals: named and counted


def _refusals(tmp_path: Path, row: dict[str, Any]) -> dict[str, Any]:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = DatasetSpec.model_validate(
        {"sources": [{"uri": f"file://{path}", "shape": "preference", "name": "p"}]}
    )
    report = DataReport()
    assert list(iter_records(spec, 0, [path], report, lambda digest: False)) == []
    return report.as_dict()["p"]


def test_a_pair_without_its_rejected_answer_is_refused_naming_the_field(tmp_path: Path) -> None:
    counts = _refusals(tmp_path, {"prompt": "hi", "chosen": "hello"})
    assert counts["malformed"] == 1 and counts["malformedReasons"] == {"no rejected answer under rejected": 1}


def test_a_pair_whose_answers_are_the_same_is_refused_naming_the_fields(tmp_path: Path) -> None:
    counts = _refusals(tmp_path, _pair("hi", "hello", "hello"))
    assert counts["malformedReasons"] == {"chosen and rejected are the same: nothing to prefer": 1}


def test_a_prompt_that_ends_with_an_assistant_turn_is_refused_naming_the_field(tmp_path: Path) -> None:
    counts = _refusals(tmp_path, _pair([_user("hi"), _assistant("hello")], "fine", "bad"))
    assert counts["malformedReasons"] == {"the prompt under prompt ends with an assistant turn": 1}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"chosen": "hello", "rejected": "bad"}, "no prompt shared by chosen and rejected"),
        (_pair("  "), "no prompt under prompt"),
        (_pair([_user("hi")], [_user("hello")], "bad"), "a user turn in the chosen answer under chosen"),
        (_pair("hi", [_assistant("")], "bad"), "no chosen answer under chosen"),
    ],
    ids=["no-prompt", "empty-prompt", "answer-not-assistant", "empty-answer"],
)
def test_other_malformed_pairs_are_refused_with_their_reason(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refused, match=f"^{reason}"):
        _clean(row)


# Encoding


def test_a_plain_pair_learns_each_answer_and_its_end_of_sequence_after_one_prompt(tok: Any) -> None:
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(_pair(), tok, as_chat=False)
    prompt = tok("what is two plus two")["input_ids"]
    assert chosen[: len(prompt)] == rejected[: len(prompt)] == prompt
    assert tok.decode(_learned(chosen, chosen_labels)) == "four </s>"
    assert tok.decode(_learned(rejected, rejected_labels)) == "five </s>"
    assert _prompt_length(chosen_labels) == _prompt_length(rejected_labels) == len(prompt)


def test_a_chat_pair_never_learns_the_prompt_not_even_its_assistant_turns(tok: Any) -> None:
    prompt = [
        {"role": "system", "content": "be brief"},
        _user("hello there"),
        _assistant("hello"),
        _user("how are you"),
    ]
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(
        _pair(prompt, [_assistant("fine thanks")], [_assistant("bad")]), tok, as_chat=True
    )
    expected = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chosen[: len(expected)] == rejected[: len(expected)] == list(expected)
    assert _prompt_length(chosen_labels) == _prompt_length(rejected_labels) == len(expected)
    assert tok.decode(_learned(chosen, chosen_labels)) == "fine thanks <|end|>"
    assert tok.decode(_learned(rejected, rejected_labels)) == "bad <|end|>"


def test_a_pair_of_texts_goes_into_the_chat_template_with_its_system_prompt(tok: Any) -> None:
    chosen, chosen_labels, _, _ = encode_pair({**_pair(), "system": "be brief"}, tok, as_chat=True)
    assert tok.decode(chosen).startswith("<|system|> be brief <|end|> <|user|> what is two plus two")
    assert tok.decode(_learned(chosen, chosen_labels)) == "four <|end|>"


def test_a_generation_marked_template_learns_what_it_marks_after_the_prompt() -> None:
    marked = tiny_tokenizer([CORPUS])
    marked.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|> ' }}{% generation %}"
        "{{ m['content'] + ' <|end|> ' }}{% endgeneration %}{% else %}{{ '<|' + m['role'] + '|> ' + "
        "m['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    )
    prompt = [_user("hello there"), _assistant("hello"), _user("how are you")]
    chosen, chosen_labels, _, _ = encode_pair(
        _clean(_pair(prompt, "fine thanks", "bad")), marked, as_chat=True
    )
    assert marked.decode(_learned(chosen, chosen_labels)) == "fine thanks <|end|>"


@pytest.fixture
def thinking(tok: Any) -> Any:
    """A DeepSeek-R1-like template: its generation prompt opens a thought that the answers do not hold."""
    tokenizer = tiny_tokenizer([CORPUS])
    tokenizer.chat_template = tok.chat_template.replace("'<|assistant|> '", "'<|assistant|> hello '")
    return tokenizer


def test_without_a_generation_prompt_to_share_the_sides_share_their_common_prefix(thinking: Any) -> None:
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(
        _clean(_pair([_user("what is two plus two")], "four", "five")), thinking, as_chat=True
    )
    n = _prompt_length(chosen_labels)
    assert n == _prompt_length(rejected_labels) and chosen[:n] == rejected[:n]
    assert thinking.decode(chosen[:n]) == "<|user|> what is two plus two <|end|> <|assistant|>"
    assert thinking.decode(_learned(chosen, chosen_labels)) == "four <|end|>"
    assert thinking.decode(_learned(rejected, rejected_labels)) == "five <|end|>"


def test_the_common_prefix_stops_where_the_answers_begin_even_when_they_open_alike(thinking: Any) -> None:
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(
        _clean(_pair([_user("hi")], "four five", "four")), thinking, as_chat=True
    )
    assert thinking.decode(_learned(chosen, chosen_labels)) == "four five <|end|>"
    assert thinking.decode(_learned(rejected, rejected_labels)) == "four <|end|>"


def test_the_common_prefix_never_learns_the_prompts_own_assistant_turns(thinking: Any) -> None:
    prompt = [_user("hello there"), _assistant("hello"), _user("how are you")]
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(
        _clean(_pair(prompt, "fine thanks", "bad")), thinking, as_chat=True
    )
    assert thinking.decode(_learned(chosen, chosen_labels)) == "fine thanks <|end|>"
    assert thinking.decode(_learned(rejected, rejected_labels)) == "bad <|end|>"


def test_the_common_prefix_is_logged_once_naming_what_the_template_does(
    thinking: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preferences, "_shared_prompt_logged", False)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.preferences"):
        for answer in ("four", "five"):
            encode_pair(_clean(_pair([_user("hi")], answer, "bad")), thinking, as_chat=True)
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "finetune_trainer.preferences"]
    assert logged.startswith("the chat template's generation prompt is not how it starts the answers")


def test_a_pair_is_refused_when_even_the_common_prefix_leaves_a_side_nothing_to_learn() -> None:
    """A generation-marked template that marks no answer after a prompt it does not open them with."""
    unmarked = tiny_tokenizer([CORPUS])
    unmarked.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{% generation %}"
        "{{ '<|assistant|> ' + m['content'] + ' <|end|> ' }}{% endgeneration %}{% else %}"
        "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> hello ' }}{% endif %}"
    )
    with pytest.raises(Refused, match="no chosen answer tokens to learn: the chat template's generation"):
        encode_pair(_clean(_pair([_user("hi")], "four", "five")), unmarked, as_chat=True)


def test_a_refused_pair_is_counted_as_unencodable_for_its_source() -> None:
    broken = tiny_tokenizer([CORPUS])
    broken.chat_template = "{{ raise_exception('no') }}"
    report = EncodingReport()
    record = Record("p:0", "p", _clean(_pair([_user("hi")], "four", "five")))
    assert encode_all([record], broken, max_len=64, overlength="truncate", report=report) == []
    assert (
        report.unencodable == 1
        and report.records == {"p": 1}
        and list(report.lost["p"]) == ["the chat template refuses it: no"]
    )


def test_a_pair_is_never_encoded_as_a_prompt_and_completion(tok: Any) -> None:
    with pytest.raises(ValueError, match="preference pair"):
        encode(Record("p:0", "p", _pair()), tok)


def _encoded(tok: Any, *records: dict[str, Any], max_len: int, overlength: str) -> tuple[list[Example], Any]:
    report = EncodingReport()
    pairs = [Record(f"p:{i}", "p", fields) for i, fields in enumerate(records)]
    return encode_all(pairs, tok, max_len=max_len, overlength=overlength, report=report), report


def test_a_pair_is_one_example_of_its_chosen_then_rejected_sides(tok: Any) -> None:
    (example,), _ = _encoded(tok, _pair(), max_len=64, overlength="truncate")
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(_pair(), tok, as_chat=False)
    assert example == Example(
        "p:0", chosen + rejected, chosen_labels + rejected_labels, (len(chosen), len(rejected))
    )


def test_an_overlength_pair_is_truncated_side_by_side_and_counted(tok: Any) -> None:
    (example,), report = _encoded(tok, _pair(chosen="four " * 20), max_len=10, overlength="truncate")
    chosen, rejected = split_pair(example)
    assert len(chosen.input_ids) == 10 and len(rejected.input_ids) == 7  # only the long side is cut
    assert chosen.input_ids[:5] == rejected.input_ids[:5] and report.truncated == 1


def test_split_truncates_a_pair_since_a_window_without_its_prompt_is_no_preference(tok: Any) -> None:
    (example,), report = _encoded(tok, _pair(chosen="four " * 20), max_len=10, overlength="split")
    assert example.segments == (10, 7) and report.truncated == 1 and report.split == 0


def test_an_overlength_pair_is_dropped_whole_and_counted(tok: Any) -> None:
    kept, report = _encoded(tok, _pair(rejected="five " * 20), _pair(), max_len=10, overlength="drop")
    assert [e.id for e in kept] == ["p:1"] and report.dropped_overlength == 1


def test_a_pair_whose_prompt_fills_the_window_is_dropped_as_without_target(tok: Any) -> None:
    kept, report = _encoded(tok, _pair(prompt="long prompt " * 10), max_len=10, overlength="truncate")
    assert kept == [] and report.dropped_no_target == 1
    assert report.lost == {"p": {"no target left in the window": 1}}


# Storage and batches


PAIR = Example(
    "p:0", [1, 2, 3, 4, 1, 2, 5], [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 5], (4, 3)
)


def test_split_and_join_are_inverse() -> None:
    chosen, rejected = split_pair(PAIR)
    assert chosen == Example("p:0", [1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])
    assert rejected == Example("p:0", [1, 2, 5], [IGNORE_INDEX, IGNORE_INDEX, 5])
    assert join_pair(chosen, rejected) == PAIR


def test_an_example_that_is_not_a_pair_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="not a preference pair"):
        split_pair(Example("s:0", [1, 2], [1, 2]))


def test_a_pair_survives_the_example_table_unchanged(tmp_path: Path) -> None:
    write_examples([PAIR, Example("p:1", [7, 8], [IGNORE_INDEX, 8], (1, 1))], tmp_path, "train")
    table = ExampleTable(tmp_path, "train")
    assert table[0] == PAIR and split_pair(table[1]) == (
        Example("p:1", [7], [IGNORE_INDEX]),
        Example("p:1", [8], [8]),
    )


def test_pair_columns_put_every_chosen_row_before_every_rejected_row_right_padded() -> None:
    other = Example("p:1", [6, 7, 8], [IGNORE_INDEX, 7, 8], (2, 1))
    columns = pair_columns([PAIR, other], pad_id=0)
    assert columns["input_ids"] == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [8, 0, 0, 0]]
    assert columns["attention_mask"] == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert columns["labels"][1] == [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert columns["labels"][3] == [8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


# The real ranking file, tokenizers and template


@pytest.fixture(scope="module")
def dpo_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Record], dict[str, Any]]:
    if not REALWORLD.is_dir():
        pytest.skip(f"{REALWORLD} is not beside this checkout")
    data = REALWORLD / "datasets" / "dpo_en_demo.json"
    spec = DatasetSpec.model_validate(
        {"sources": [{"uri": f"file://{data}", "shape": "preference", "name": "dpo"}], "dedupe": False}
    )
    report = DataReport()
    records = list(iter_records(spec, 0, [data], report, lambda digest: False))
    return records, report.as_dict()["dpo"]


@pytest.fixture(scope="module")
def llama3_instruct() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REALWORLD / "tokenizers" / "llama3-base")
    tokenizer.chat_template = (REALWORLD / "templates" / "llama-3-instruct.jinja").read_text()
    return tokenizer


def _answer_text(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"] for m in messages)


@needs_realworld
def test_the_llamafactory_ranking_demo_is_read_whole(dpo_demo: Any) -> None:
    records, counts = dpo_demo
    assert counts == {"read": 200, "malformed": 0, "empty": 0, "duplicates": 0, "kept": 200}
    assert all(r.fields["prompt"][-1]["role"] == "user" for r in records)
    assert sum(r.fields["prompt"][0]["role"] == "system" for r in records) == 50  # ShareGPT's system turns
    assert all(len(r.fields[side]) == 1 for r in records for side in ("chosen", "rejected"))


@needs_realworld
def test_the_ranking_demo_under_llama3_learns_only_each_answer_and_its_end_of_turn(
    dpo_demo: Any, llama3_instruct: Any
) -> None:
    records, _ = dpo_demo
    report = EncodingReport()
    examples = encode_all(records, llama3_instruct, max_len=8192, overlength="truncate", report=report)
    assert len(examples) == 200 and report.unencodable == 0 and report.truncated == 0
    for record, example in zip(records, examples, strict=True):
        chosen, rejected = split_pair(example)
        prompt = llama3_instruct.apply_chat_template(record.fields["prompt"], add_generation_prompt=True)
        prompt = list(prompt["input_ids"])
        for side, encoded in (("chosen", chosen), ("rejected", rejected)):
            assert encoded.input_ids[: len(prompt)] == prompt  # one prompt, tokenized once, for both
            assert _prompt_length(encoded.labels) == len(prompt)  # prompt tokens are never labels
            answer = _answer_text(record.fields[side]).strip() + "<|eot_id|>"  # the template trims
            assert (
                _learned(encoded.input_ids, encoded.labels)
                == llama3_instruct(answer, add_special_tokens=False)["input_ids"]
            )


@needs_realworld
def test_a_generation_marked_llama3_template_labels_the_ranking_demo_alike(
    dpo_demo: Any, llama3_instruct: Any
) -> None:
    """TRL's training variant marks the answers with {% generation %}: the same tokens are learned."""
    records, _ = dpo_demo
    plain = encode_all(
        records[:40], llama3_instruct, max_len=8192, overlength="truncate", report=EncodingReport()
    )
    llama3_instruct.chat_template = (
        REALWORLD / "templates" / "llama-3-instruct.trl-training.jinja"
    ).read_text()
    try:
        marked = encode_all(
            records[:40], llama3_instruct, max_len=8192, overlength="truncate", report=EncodingReport()
        )
    finally:
        llama3_instruct.chat_template = (REALWORLD / "templates" / "llama-3-instruct.jinja").read_text()
    assert marked == plain


@needs_realworld
def test_text_pairs_under_llama2_learn_each_answer_and_end_of_sequence(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REALWORLD / "tokenizers" / "llama2-base")
    row = _pair("Q: What is the capital of France?\nA:", " Paris.", " London, I think.")
    chosen, chosen_labels, rejected, rejected_labels = encode_pair(_clean(row), tokenizer, as_chat=False)
    prompt = tokenizer(row["prompt"])["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id and chosen[: len(prompt)] == rejected[: len(prompt)] == prompt
    for ids, labels, answer in (
        (chosen, chosen_labels, " Paris."),
        (rejected, rejected_labels, " London, I think."),
    ):
        assert _prompt_length(labels) == len(prompt)
        assert _learned(ids, labels) == [
            *tokenizer(answer, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]


# Templates whose generation prompt is no token prefix of the answers: DeepSeek-R1-Distill's opens a
# `<think>` the answers do not hold; Mistral v0.1's `[/INST]` runs into the answer, and for 7 of the
# demo's pairs its `]` merges with the answer's first character (`](`) under the Llama 2 tokenizer.
SHARED_PREFIX_TEMPLATES = {  # template: the tokenizer of its models, its end of turn
    "deepseek-r1-distill-llama-8b.jinja": ("llama3-base", "<\uff5cend\u2581of\u2581sentence\uff5c>"),
    "mistral-7b-instruct-v0.1.jinja": ("llama2-base", "</s>"),
}


@pytest.fixture(scope="module", params=sorted(SHARED_PREFIX_TEMPLATES))
def shared_prefix_demo(request: pytest.FixtureRequest, dpo_demo: Any) -> dict[str, Any]:
    """The ranking demo encoded under one of those templates, with its model family's real tokenizer."""
    from transformers import AutoTokenizer

    records, _ = dpo_demo
    tokenizer_name, end_of_turn = SHARED_PREFIX_TEMPLATES[request.param]
    tokenizer = AutoTokenizer.from_pretrained(REALWORLD / "tokenizers" / tokenizer_name)
    tokenizer.chat_template = (REALWORLD / "templates" / request.param).read_text()
    report = EncodingReport()
    examples = encode_all(records, tokenizer, max_len=8192, overlength="truncate", report=report)
    return {"records": records, "tokenizer": tokenizer, "end_of_turn": end_of_turn, "report": report,
            "pairs": [split_pair(example) for example in examples]}  # fmt: skip


@needs_realworld
def test_the_ranking_demo_encodes_whole_where_the_generation_prompt_starts_no_answer(
    shared_prefix_demo: dict[str, Any],
) -> None:
    report = shared_prefix_demo["report"]
    assert len(shared_prefix_demo["pairs"]) == 200 and report.unencodable == 0 and report.lost == {}


@needs_realworld
def test_the_ranking_demo_sides_share_a_prompt_that_holds_the_question_and_is_never_learned(
    shared_prefix_demo: dict[str, Any],
) -> None:
    tokenizer, records = shared_prefix_demo["tokenizer"], shared_prefix_demo["records"]
    for record, (chosen, rejected) in zip(records, shared_prefix_demo["pairs"], strict=True):
        n = min(_prompt_length(chosen.labels), _prompt_length(rejected.labels))
        assert chosen.input_ids[:n] == rejected.input_ids[:n]
        assert record.fields["prompt"][-1]["content"].strip() in tokenizer.decode(chosen.input_ids[:n])


@needs_realworld
def test_the_ranking_demo_sides_learn_exactly_their_answer_and_its_end_of_turn(
    shared_prefix_demo: dict[str, Any],
) -> None:
    """Only a first learned token may reach back into the template: one merged with the answer's
    first character (Mistral v0.1's `](`), as chat_labels labels it."""
    tokenizer, end_of_turn = shared_prefix_demo["tokenizer"], shared_prefix_demo["end_of_turn"]
    for record, sides in zip(shared_prefix_demo["records"], shared_prefix_demo["pairs"], strict=True):
        for side, encoded in zip(("chosen", "rejected"), sides, strict=True):
            answer = _answer_text(record.fields[side]).strip() + end_of_turn
            learned = _learned(encoded.input_ids, encoded.labels)
            assert tokenizer.decode(learned).endswith(answer)
            assert answer.endswith(tokenizer.decode(learned[1:]))


@needs_realworld
def test_the_ranking_demo_sides_learn_different_tokens(shared_prefix_demo: dict[str, Any]) -> None:
    for chosen, rejected in shared_prefix_demo["pairs"]:
        assert _learned(chosen.input_ids, chosen.labels) != _learned(rejected.input_ids, rejected.labels)
