"""Preference pairs encoded: the shape preference_records.py reads (a prompt with a chosen and a
rejected answer, as text or messages) as one example of two parts, and a micro batch of pairs as
model rows.

Encoded: one `Example`, the chosen sequence then the rejected one, `segments` their two lengths (so
the example table stores a pair as it is). Both sequences begin with the same prompt ids, never labels
(assistant turns inside the prompt included): the DPO loss compares the two answers under one prompt.
That prompt is the template's generation prompt where it is a token prefix of both sequences; where it
is not (DeepSeek-R1's opens a `<think>` the answers do not hold; Mistral v0.1's `[/INST]` merges with
an answer's first token), it is the longest common token prefix of the two sequences, ending at or
before where each answer's labels begin, and each side learns its answer's labels (`_shared_prompt`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from finetune_trainer.chat_labels import _forms, chat_labels
from finetune_trainer.encoding import (
    GENERATION_BLOCK,
    IGNORE_INDEX,
    EncodingReport,
    Example,
    _ids,
    _marked,
    collate,
)
from finetune_trainer.messages import Refused
from finetune_trainer.preference_records import SIDES, Messages

if TYPE_CHECKING:
    from finetune_trainer.records import Record

Pair = tuple[list[int], list[int], list[int], list[int]]  # chosen ids, labels; rejected ids, labels

log = logging.getLogger(__name__)
_shared_prompt_logged = False  # the fallback is logged once per process


def encode_pair(fields: dict[str, Any], tokenizer: Any, *, as_chat: bool, report: EncodingReport | None = None
                ) -> Pair:  # fmt: skip
    """Chosen ids and labels, rejected ids and labels; `Refused` with the reason when the pair cannot be
    labelled. `as_chat`: a pair of texts goes into the chat template (the source's promptFormat), its
    system prompt with it; laid out as plain text, it has none (as alpaca's plain layout)."""
    if isinstance(fields["prompt"], str) and not as_chat:
        prompt = _ids(tokenizer, fields["prompt"], special=True)
        out: list[list[int]] = []
        for side in SIDES:  # as encoding's prompt and completion: the answer, then end of sequence
            answer = [*_ids(tokenizer, fields[side], special=False), tokenizer.eos_token_id]
            out += [prompt + answer, [IGNORE_INDEX] * len(prompt) + answer]
        return out[0], out[1], out[2], out[3]
    if isinstance(fields["prompt"], str):
        system = [{"role": "system", "content": fields["system"]}] if fields.get("system") else []
        fields = {"prompt": [*system, {"role": "user", "content": fields["prompt"]}],
                  **{side: [{"role": "assistant", "content": fields[side]}] for side in SIDES}}  # fmt: skip
    return _chat_pair(fields, tokenizer, report)


def _chat_pair(fields: dict[str, Any], tokenizer: Any, report: EncodingReport | None) -> Pair:
    tools = fields.get("tools")
    records = [{"messages": [*fields["prompt"], *fields[side]], **({"tools": tools} if tools else {})}
               for side in SIDES]  # fmt: skip
    if GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        sides = [_marked(tokenizer, record) for record in records]
        texts: list[str] = []
        prompts = [_generation_prompt(tokenizer, fields["prompt"], tools)]
    else:
        labelled = [chat_labels(tokenizer, record) for record in records]
        sides = [(ids, labels) for ids, labels, _ in labelled]
        texts = [rendered.text for _, _, rendered in labelled]
        # In whichever of chat_labels' forms the conversations rendered (tool calls as wire text, the
        # system prompt merged into the first user turn), so the prompt is rendered in each.
        prompts = [_generation_prompt(tokenizer, form, tools) for form in _forms(fields["prompt"])]
        if report is not None:
            report.system_merged += any(rendered.system_merged for _, _, rendered in labelled)
            report.rewritten += any(rendered.rewritten for _, _, rendered in labelled)
    prompt = next((ids for _, ids in prompts if ids and all(s[: len(ids)] == ids for s, _ in sides)), None)
    if prompt is None:
        if texts and any(text and all(t.startswith(text) for t in texts) for text, _ in prompts):
            behaviour = ("the prompt's last token merges with the answer's first (the template puts nothing "
                         "between them)")  # fmt: skip
        else:
            behaviour = "the chat template's generation prompt is not how it starts the answers"
        return _shared_prompt(fields, tokenizer, sides, behaviour)
    (chosen, chosen_labels), (rejected, rejected_labels) = sides
    masked = [IGNORE_INDEX] * len(prompt)  # the prompt's own assistant turns are context, never learned
    return chosen, masked + chosen_labels[len(prompt) :], rejected, masked + rejected_labels[len(prompt) :]


def _shared_prompt(fields: dict[str, Any], tokenizer: Any, sides: list[tuple[list[int], list[int]]],
                   behaviour: str) -> Pair:  # fmt: skip
    """The pair when the generation prompt is not a token prefix of both sides (`behaviour` says why):
    the prompt is the longest common token prefix of the two sequences, but never past where either
    answer's labels begin (the labels of the conversation's assistant turns after the prompt's own);
    before that every token is masked on both sides, and each side learns its answer's labels, the
    prompt's own assistant turns never. `Refused` when a side has no answer label to learn.

    Sound for the sigmoid DPO loss: a token equal on both sides, in equal context, has the same
    log-probability there under any model (policy or reference), so whether a common leading piece is
    learned or masked, its term cancels in the chosen-minus-rejected log-ratio; what both sides share
    is the prompt. It is the boundary TRL draws for implicit prompts (the longest common prefix)."""
    global _shared_prompt_logged
    tools = fields.get("tools")
    before = 0  # label runs of the prompt's own assistant turns, rendered alone as the sides are
    if any(m["role"] == "assistant" for m in fields["prompt"]):
        record = {"messages": fields["prompt"], **({"tools": tools} if tools else {})}
        if GENERATION_BLOCK.search(tokenizer.chat_template or ""):
            _, labels = _marked(tokenizer, record)
        else:
            _, labels, _ = chat_labels(tokenizer, record)
        before = len(_runs(labels))
    starts: list[int] = []
    for side, (_, labels) in zip(SIDES, sides, strict=True):
        runs = _runs(labels)
        if len(runs) <= before:
            raise Refused(f"no {side} answer tokens to learn: {behaviour}")
        starts.append(runs[before])
    (chosen, chosen_labels), (rejected, rejected_labels) = sides
    common = next((i for i, (c, r) in enumerate(zip(chosen, rejected, strict=False)) if c != r),
                  min(len(chosen), len(rejected)))  # fmt: skip
    shared = min(common, *starts)  # chosen[:shared] == rejected[:shared]: the prompt, never learned
    if not _shared_prompt_logged:
        _shared_prompt_logged = True
        log.info("%s: pairs take the longest common token prefix of chosen and rejected, up to where the "
                 "answers' labels begin, as their prompt (first: %d shared tokens); logged once", behaviour,
                 shared)  # fmt: skip
    # Tokens between the shared prompt and a side's answer (the template's, or one merged with the
    # answer's first) are context on that side, not labels, as chat_labels has them.
    chosen_start, rejected_start = starts
    return (chosen, [IGNORE_INDEX] * chosen_start + chosen_labels[chosen_start:],
            rejected, [IGNORE_INDEX] * rejected_start + rejected_labels[rejected_start:])  # fmt: skip


def _runs(labels: list[int]) -> list[int]:
    """Where each run of labels begins."""
    pairs = zip([IGNORE_INDEX, *labels], labels, strict=False)  # each label after the one before it
    return [i for i, (previous, label) in enumerate(pairs) if previous == IGNORE_INDEX != label]


def _generation_prompt(tokenizer: Any, messages: Messages, tools: Any) -> tuple[str, list[int]]:
    """The prompt as the model is given it to answer (`add_generation_prompt`) and its ids, tokenized as
    the conversations are (no special tokens beyond the template's); ("", []) when the template
    refuses this form."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
    except Exception:  # the template's raise_exception: another form may render
        return "", []
    return text, _ids(tokenizer, text, special=False)


def fitted(
    record: Record, pair: Pair, *, max_len: int, overlength: str, report: EncodingReport
) -> Example | None:
    """The pair as one example within `max_len` a side, or None when it is dropped (counted): longer
    than `max_len` under overlength drop, or a side with no target left once truncated. Split (which
    the API refuses with dpo) truncates: a window without its prompt is no preference."""
    chosen, chosen_labels, rejected, rejected_labels = pair
    if max(len(chosen), len(rejected)) > max_len:
        if overlength == "drop":
            report.dropped_overlength += 1
            return None
        chosen, chosen_labels = chosen[:max_len], chosen_labels[:max_len]
        rejected, rejected_labels = rejected[:max_len], rejected_labels[:max_len]
        report.truncated += 1
    if any(all(label == IGNORE_INDEX for label in labels[1:]) for labels in (chosen_labels, rejected_labels)):
        report.dropped_no_target += 1
        report.lose(record.source, "no target left in the window")
        return None
    return join_pair(Example(record.id, chosen, chosen_labels), Example(record.id, rejected, rejected_labels))


def join_pair(chosen: Example, rejected: Example) -> Example:
    """Two sides as the one example stored: chosen then rejected, `segments` their lengths."""
    return Example(
        id=chosen.id,
        input_ids=chosen.input_ids + rejected.input_ids,
        labels=chosen.labels + rejected.labels,
        segments=(len(chosen.input_ids), len(rejected.input_ids)),
    )


def split_pair(example: Example) -> tuple[Example, Example]:
    """A stored pair as its chosen and rejected sides (each with the pair's id)."""
    if len(example.segments) != 2:
        raise ValueError(f"example {example.id} is not a preference pair (segments {example.segments})")
    n = example.segments[0]
    return (Example(example.id, example.input_ids[:n], example.labels[:n]),
            Example(example.id, example.input_ids[n:], example.labels[n:]))  # fmt: skip


def pair_columns(examples: Sequence[Example], pad_id: int) -> dict[str, list[list[int]]]:
    """A micro batch of B pairs as 2B right-padded rows, every chosen side first and then every
    rejected side (TRL's concatenated order): input_ids, labels and attention_mask, padding neither
    attended to nor learned."""
    sides = [split_pair(example) for example in examples]
    rows = [chosen for chosen, _ in sides] + [rejected for _, rejected in sides]
    return collate(rows, pad_id, max(len(row.input_ids) for row in rows))
