"""Records to training examples: token ids plus labels in which everything the model should not be
trained to produce (prompts, user and system turns, padding) is masked with -100."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from finetune_trainer.data import Record

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


@dataclass(frozen=True)
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodingReport:
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_target: int = 0  # nothing left to learn after truncation (the prompt filled the window)


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not messages:
        return []
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    ids: list[int] = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Template the conversation turn by turn: the tokens each turn adds are labels only when the
    turn is the assistant's. Chat templates render a conversation's prefix as a prefix of the
    whole, which is what makes the per-turn difference well defined; a template that does not is
    refused rather than trained on wrongly aligned labels."""
    ids: list[int] = []
    labels: list[int] = []
    for turn in range(1, len(messages) + 1):
        current = _chat_ids(tokenizer, messages[:turn])
        if current[: len(ids)] != ids:
            raise ValueError(
                "the tokenizer's chat template does not render a conversation prefix as a prefix"
            )
        added = current[len(ids) :]
        labels += added if messages[turn - 1]["role"] == "assistant" else [IGNORE_INDEX] * len(added)
        ids = current
    return ids, labels


def encode(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    fields = record.fields
    if "text" in fields:
        ids = [*_ids(tokenizer, fields["text"], special=True), tokenizer.eos_token_id]
        return ids, list(ids)
    if "prompt" in fields:
        prompt = _ids(tokenizer, fields["prompt"], special=True)
        completion = [*_ids(tokenizer, fields["completion"], special=False), tokenizer.eos_token_id]
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    return _chat(tokenizer, fields["messages"])


def encode_all(
    records: Iterable[Record], tokenizer: Any, *, max_len: int, overlength: str, report: EncodingReport
) -> list[Example]:
    return list(iter_encode(records, tokenizer, max_len=max_len, overlength=overlength, report=report))


def iter_encode(
    records: Iterable[Record], tokenizer: Any, *, max_len: int, overlength: str, report: EncodingReport
) -> Iterator[Example]:
    """Records to examples, streamed; overlength ones truncated or dropped, counted in `report`."""
    for record in records:
        ids, labels = encode(record, tokenizer)
        if len(ids) > max_len:
            if overlength == "drop":
                report.dropped_overlength += 1
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            report.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            report.dropped_no_target += 1
            continue
        yield Example(id=record.id, input_ids=ids, labels=labels)


def pack(examples: Iterable[Example], max_len: int) -> list[Example]:
    return list(iter_pack(examples, max_len))


def iter_pack(examples: Iterable[Example], max_len: int) -> Iterator[Example]:
    """Concatenate examples into full windows of max_len; the remainder shorter than a window is
    kept as the last (padded) block so no labelled token is lost. A packed block's id lists its
    parts. Streamed: only the window being filled is held."""
    ids: list[int] = []
    labels: list[int] = []
    parts: list[str] = []
    for example in examples:
        ids += example.input_ids
        labels += example.labels
        parts.append(example.id)
        while len(ids) >= max_len:
            yield Example(id="+".join(parts), input_ids=ids[:max_len], labels=labels[:max_len])
            ids, labels = ids[max_len:], labels[max_len:]
            parts = [example.id] if ids else []
    if ids:
        yield Example(id="+".join(parts), input_ids=ids, labels=labels)


def collate(batch: list[Example], pad_id: int, max_len: int) -> dict[str, list[list[int]]]:
    """Right-pad a micro batch to its longest example; padding is neither attended to nor learned."""
    width = min(max_len, max(len(e.input_ids) for e in batch))
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for e in batch:
        pad = width - len(e.input_ids)
        out["input_ids"].append(e.input_ids + [pad_id] * pad)
        out["labels"].append(e.labels + [IGNORE_INDEX] * pad)
        out["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
    return out
