"""Records to training examples: token ids plus labels in which everything the model should not be
trained to produce (prompts, user and system turns, padding) is masked with -100."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune_trainer.chat_labels import IGNORE_INDEX, chat_labels
from finetune_trainer.messages import Refused

if TYPE_CHECKING:  # records reads preference pairs with preferences.py, which builds on this module
    from finetune_trainer.records import Record

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "EncodingReport", "Example", "collate", "encode", "encode_all", "iter_encode"]


@dataclass(frozen=True)
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    segments: tuple[int, ...] = ()  # a packed window's parts' lengths (packing.py); () for one example

    @property
    def position_ids(self) -> list[int]:
        """Positions restarting at every part, as if each part were alone."""
        return [p for length in (self.segments or (len(self.input_ids),)) for p in range(length)]


@dataclass
class EncodingReport:
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_target: int = 0  # nothing left to learn after truncation (the prompt filled the window)
    unencodable: int = 0  # the chat template refused the record (roles out of order, say)
    split: int = 0  # overlength records split into windows (overlength split)
    system_merged: int = 0  # the template takes no system prompt: it went before the first user turn
    rewritten: int = 0  # the template rewrites content (drops reasoning): trained as written
    # per source: records encoded, and why they were lost (the mostly-dropped check reads these)
    records: dict[str, int] = field(default_factory=dict)
    lost: dict[str, dict[str, int]] = field(default_factory=dict)

    def lose(self, source: str, reason: str) -> None:
        reasons = self.lost.setdefault(source, {})
        reasons[reason] = reasons.get(reason, 0) + 1


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids


def _marked(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Assistant tokens as the template marks them with `{% generation %}` (transformers'
    `return_assistant_tokens_mask`): the template's author said what is learned."""
    encoded = tokenizer.apply_chat_template(
        record["messages"], tools=record.get("tools"), tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    ids = list(encoded["input_ids"])
    mask = encoded["assistant_masks"]
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def chat_layout(tokenizer: Any, prompt_format: str) -> bool:
    """Whether promptCompletion and alpaca records of a source go into the chat template."""
    return prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))


def encode(record: Record, tokenizer: Any, *, as_chat: bool = False, report: EncodingReport | None = None
           ) -> tuple[list[int], list[int]]:  # fmt: skip
    """Token ids and labels of a record; `Refused` with the reason when it cannot be labelled."""
    fields = record.fields
    if "chosen" in fields:  # a preference pair has a prompt too, and is not a prompt and completion
        raise ValueError(f"record {record.id} is a preference pair: preferences.encode_pair encodes it")
    if "text" in fields:
        ids = [*_ids(tokenizer, fields["text"], special=True), tokenizer.eos_token_id]
        return ids, list(ids)
    if "prompt" in fields and not as_chat:
        prompt = _ids(tokenizer, fields["prompt"], special=True)
        completion = [*_ids(tokenizer, fields["completion"], special=False), tokenizer.eos_token_id]
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    if "prompt" in fields:
        system = [{"role": "system", "content": fields["system"]}] if fields.get("system") else []
        user = {"role": "user", "content": fields.get("user", fields["prompt"])}
        fields = {"messages": [*system, user, {"role": "assistant", "content": fields["completion"]}]}
    if GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        return _marked(tokenizer, fields)
    ids, labels, rendered = chat_labels(tokenizer, fields)
    if report is not None:
        report.system_merged += rendered.system_merged
        report.rewritten += rendered.rewritten
    return ids, labels


def encode_all(records: Iterable[Record], tokenizer: Any, *, max_len: int, overlength: str,
               report: EncodingReport, chat_sources: frozenset[str] = frozenset()
               ) -> list[Example]:  # fmt: skip
    return list(iter_encode(records, tokenizer, max_len=max_len, overlength=overlength, report=report,
                            chat_sources=chat_sources))  # fmt: skip


def iter_encode(records: Iterable[Record], tokenizer: Any, *, max_len: int, overlength: str,
                report: EncodingReport, chat_sources: frozenset[str] = frozenset()
                ) -> Iterator[Example]:  # fmt: skip
    """Records to examples, streamed; overlength ones truncated, dropped or split, counted in
    `report`. `chat_sources`: the sources whose prompt/completion records go into the chat template.
    A preference pair (preferences.py) is one example of its two sides, truncated or dropped whole."""
    from finetune_trainer import preferences  # it builds on this module

    for record in records:
        report.records[record.source] = report.records.get(record.source, 0) + 1
        as_chat, pair = record.source in chat_sources, "chosen" in record.fields
        try:
            if pair:
                sides = preferences.encode_pair(record.fields, tokenizer, as_chat=as_chat, report=report)
            else:
                ids, labels = encode(record, tokenizer, as_chat=as_chat, report=report)
        except Exception as exc:  # a record the template refuses is counted, never fatal
            reason = str(exc) if isinstance(exc, Refused) else f"{type(exc).__name__}: {exc}"
            reason = reason.splitlines()[0][:160]
            report.unencodable += 1
            report.lose(record.source, reason)
            if report.unencodable <= 3:
                log.warning("record %s not encodable, skipped: %s", record.id, reason)
            continue
        if pair:
            example = preferences.fitted(record, sides, max_len=max_len, overlength=overlength, report=report)
            if example is not None:
                yield example
            continue
        if len(ids) > max_len:
            if overlength == "drop":
                report.dropped_overlength += 1
                continue
            if overlength == "split":
                report.split += 1
                yield from _kept(record.source, _windows(record.id, ids, labels, max_len), report)
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            report.truncated += 1
        yield from _kept(record.source, [Example(id=record.id, input_ids=ids, labels=labels)], report)


def _windows(record_id: str, ids: list[int], labels: list[int], max_len: int) -> Iterator[Example]:
    """An overlength example as windows overlapping by one token: a window's first label is never a
    target (the loss shifts labels), so with a stride of max_len - 1 every token but the very first
    is still predicted exactly once. Window k > 0 is `<id>#k`."""
    stride = max_len - 1
    for k, start in enumerate(range(0, len(ids) - 1, stride)):
        window = slice(start, start + max_len)
        yield Example(id=f"{record_id}#{k}" if k else record_id, input_ids=ids[window], labels=labels[window])


def _kept(source: str, examples: Iterable[Example], report: EncodingReport) -> Iterator[Example]:
    for example in examples:
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            report.dropped_no_target += 1
            report.lose(source, "no target left in the window")
            continue
        yield example


def collate(
    batch: list[Example], pad_id: int, max_len: int, *, packed: bool = False, flatten: bool = False
) -> dict[str, list[list[int]]]:
    """A micro batch as model inputs; padding is neither attended to nor learned.

    - Plain: right-padded to the longest example, with an attention mask.
    - `packed`: right-padded, with position ids restarting per part and no attention mask. In the
      transformers we pin (5.24, `masking_utils._preprocess_mask_arguments`), position ids with no
      attention mask are read as packed sequences and sdpa and eager get a block-diagonal causal
      mask (`find_packed_sequence_indices`), so a part attends only to itself. The padding tail is a
      part of its own (positions from 0), which nothing real attends to.
    - `flatten` (flash_attention_2): the whole micro batch as one row without padding, parts
      delimited by the position ids; flash-attention's varlen kernel then keeps them apart
      (`modeling_flash_attention_utils._is_packed_sequence` requires exactly one row).
    """
    if flatten:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for e in batch:
            row["input_ids"] += e.input_ids[:max_len]
            row["labels"] += [IGNORE_INDEX, *e.labels[1:max_len]]  # never predict across examples
            row["position_ids"] += e.position_ids[:max_len]
        return {k: [v] for k, v in row.items()}
    width = min(max_len, max(len(e.input_ids) for e in batch))
    keys = ("input_ids", "labels", "position_ids") if packed else ("input_ids", "labels", "attention_mask")
    out: dict[str, list[list[int]]] = {k: [] for k in keys}
    for e in batch:
        pad = width - len(e.input_ids)
        out["input_ids"].append(e.input_ids + [pad_id] * pad)
        out["labels"].append(e.labels + [IGNORE_INDEX] * pad)
        if packed:
            out["position_ids"].append(e.position_ids + list(range(pad)))
        else:
            out["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
    return out


def model_inputs(columns: dict[str, list[list[int]]], device: Any = None) -> dict[str, Any]:
    """Collated columns as the model's keyword arguments. `use_cache=False`: Llama otherwise builds
    a KV cache even in training, and transformers reads packed position ids only without one
    (`masking_utils._preprocess_mask_arguments`), so packed parts would attend to each other."""
    import torch

    return {**{k: torch.tensor(v, device=device) for k, v in columns.items()}, "use_cache": False}
