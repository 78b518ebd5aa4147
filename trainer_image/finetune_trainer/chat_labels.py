"""Labels for a conversation under any chat template: the whole conversation rendered once, each
assistant message's span located in the text, the text tokenized once.

Turn-by-turn differences need a template that renders a conversation's prefix as a prefix of the
whole, and real ones do not: Mistral v0.3 moves the system prompt into the last user turn, the first
Llama 3 release always appends an assistant header, DeepSeek-R1's drops earlier reasoning, and
tokens merge across a turn boundary (`</s>` + `▁[INST]` under Llama 2's tokenizer). So:

1. Every message's content is replaced by a sentinel and the conversation rendered: the sentinels
   show where the template puts each message, whatever it does around them.
2. The sentinels are replaced by the contents as the template itself renders them (as written or
   trimmed: whichever reproduces the template's own render); where the template rewrites content
   (DeepSeek-R1 drops the reasoning before `</think>`), the content as written is kept, so what the
   data says is what trains, and the record is counted as rewritten.
3. An assistant span is its content, any tool calls the template renders after the header, and the
   end-of-turn marker that follows (`<|eot_id|>`, `</s>`, `<|im_end|>`...); role headers, system,
   user and tool turns are never labels.
4. The text is tokenized once, with offsets; a token is a label when it overlaps an assistant span.

A record the template refuses (roles out of order, a tool call it cannot render) raises `Refused`
with the reason the encoding report counts; a template that refuses system prompts gets the system
prompt before the first user message instead (counted as systemMerged).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from finetune_trainer.messages import Refused

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips
SENTINEL = "\u27e6ftj{}\u27e7"  # ⟦ftjN⟧: text no template trims, escapes or tests for
SENTINELS = re.compile("\u27e6ftj(\\d+)\u27e7")
THINK_OPENING = re.compile(r"<think>\s*$")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character ranges that are labels
    system_merged: bool = False
    rewritten: bool = False


def chat_labels(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], Rendered]:
    rendered = render(tokenizer, record["messages"], record.get("tools"))
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if any(start < b and a < end for a, b in rendered.spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels, rendered


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Rendered:
    """The first of the conversation's forms the template renders whole: as given; with tool calls
    in OpenAI's wire form (arguments as JSON text, content null: what DeepSeek's template reads);
    with the system prompt before the first user message (templates that refuse or drop one)."""
    first: Refused | None = None
    for form in _forms(messages):
        try:
            rendered = _render(tokenizer, form, tools)
        except (_TemplateError, Refused) as exc:
            if first is None:
                first = exc if isinstance(exc, Refused) else Refused(f"the chat template refuses it: {exc}")
            continue
        rendered.system_merged = form[0]["role"] != messages[0]["role"]
        return rendered
    assert first is not None
    raise first


def _forms(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    forms = [messages]
    if any(m.get("tool_calls") for m in messages):
        forms.append([_wire(m) if m.get("tool_calls") else m for m in messages])
    if messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
        merged = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        forms += [[merged, *form[2:]] for form in list(forms)]
    return forms


def _wire(message: dict[str, Any]) -> dict[str, Any]:
    calls = []
    for call in message["tool_calls"]:
        arguments = json.dumps(call["function"]["arguments"], ensure_ascii=False)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "content": message["content"] or None, "tool_calls": calls}


class _TemplateError(Exception):
    pass


def _apply(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, **kwargs: Any) -> str:
    try:
        text: str = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs)
    except Exception as exc:  # the template's raise_exception, or a Jinja error on this record
        raise _TemplateError(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None
    return text


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any) -> Rendered:
    marked = [{**m, "content": SENTINEL.format(i)} if m["content"] else m for i, m in enumerate(messages)]
    skeleton = _apply(tokenizer, marked, tools)
    real = _apply(tokenizer, messages, tools)
    messages = [{**m, "content": m["content"] or ""} for m in messages]  # null (wire form) is no text
    pieces = SENTINELS.split(skeleton)  # text, index, text, index, ..., text
    gaps, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    missing = [i for i, m in enumerate(marked) if m["content"] != messages[i]["content"] and i not in order]
    if missing:
        raise Refused(f"the chat template drops the {messages[missing[0]]['role']} message at {missing[0]}")
    text, starts, rewritten, at = gaps[0], {}, False, len(gaps[0])
    for gap, index in zip(gaps[1:], order, strict=True):
        content = messages[index]["content"]
        choice = next((c for c in (content, content.strip()) if real.startswith(c + gap, at)), None)
        if choice is None:  # the template rewrote this content: keep it as written, resync after it
            choice, rewritten = content, True
            found = real.find(gap, at) if gap else -1
            at = found + len(gap) if found >= 0 else at
        else:
            at += len(choice) + len(gap)
        starts[index] = (len(text), len(text) + len(choice))
        text += choice + gap
    if not order:
        text = real
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    shape = template_shape(tokenizer, tools)
    spans = [_span(shape, text, messages, i, starts) for i in assistants]
    if tools:
        absent = [t["function"].get("name") for t in tools if str(t["function"].get("name")) not in text]
        if absent:
            raise Refused("the chat template does not render the tools column")
    return Rendered(text=text, spans=spans, rewritten=rewritten)


def _span(shape: TemplateShape, text: str, messages: list[dict[str, Any]], index: int,
          starts: dict[int, tuple[int, int]]) -> tuple[int, int]:  # fmt: skip
    """Assistant message `index`'s label range in `text`: from its content (or, for a tool call, the
    end of its header) through the end-of-turn marker after it."""
    after_previous = max((end for i, (_, end) in starts.items() if i < index), default=0)
    next_start = min((start for i, (start, _) in starts.items() if i > index), default=len(text))
    start, end = starts.get(index, (None, None))
    calls = messages[index].get("tool_calls")
    if calls:
        at = text.find(shape.header, after_previous, next_start) if shape.header else -1
        if at >= 0:
            call_start = at + len(shape.header)
        else:  # no generation prompt (Mistral): the call follows what closes a user turn ([/INST])
            call_start = after_previous + _common_prefix(shape.user_closing, text[after_previous:next_start])
        start = call_start if start is None else min(start, call_start)
        end = call_start if end is None else end
    assert start is not None and end is not None
    marker = shape.end_of_turn
    close = text.find(marker, end, next_start) if marker else -1
    if calls:
        region = text[start : close if close >= 0 else next_start]
        if not all(call["function"]["name"] in region for call in calls):
            raise Refused("the chat template does not render tool calls")
    # Only whitespace (or, after a call, the template's own syntax) may stand before the marker.
    if close >= 0 and (calls or not text[end:close].strip()):
        end = close + len(marker)
    return start, end


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class TemplateShape(NamedTuple):
    header: str  # the assistant header a generation prompt adds, before any `<think>` it opens
    end_of_turn: str  # the marker after an assistant's content
    user_closing: str  # what stands between a user's content and the assistant's


def template_shape(tokenizer: Any, tools: Any) -> TemplateShape:
    return _probe(tokenizer, tokenizer.chat_template or "", bool(tools))


@functools.lru_cache(maxsize=64)
def _probe(tokenizer: Any, template: str, with_tools: bool) -> TemplateShape:
    """A template's shape, from a one-turn probe; `template` is in the key because a tokenizer's
    template can be replaced (dataset.chatTemplate)."""
    tools = [{"type": "function", "function": {"name": "probe", "parameters": {}}}] if with_tools else None
    user = [{"role": "user", "content": "\u27e6ftjq\u27e7"}]
    try:
        bare = _apply(tokenizer, user, tools)
        prompt = _apply(tokenizer, user, tools, add_generation_prompt=True)
        turn = _apply(tokenizer, [*user, {"role": "assistant", "content": "\u27e6ftja\u27e7"}], tools)
    except _TemplateError:
        return TemplateShape("", "", "")
    header = prompt[len(bare) :] if prompt.startswith(bare) else ""
    # A generation prompt may open the reasoning (`<think>`, DeepSeek-R1): a tool call comes before it.
    header = THINK_OPENING.sub("", header) if header.strip() != "<think>" else header
    between, _, after = turn.partition("\u27e6ftjq\u27e7")[2].partition("\u27e6ftja\u27e7")
    return TemplateShape(header, _marker(tokenizer, after), between)


def _marker(tokenizer: Any, after: str) -> str:
    """The shortest start of `after` that ends with the eos token or another special token; else
    `after` without trailing whitespace (a template whose turns end in plain text)."""
    specials: Sequence[str] = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    specials = [*specials, *(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())]
    ends = [after.find(t) + len(t) for t in set(specials) if t and after.find(t) >= 0]
    return after[: min(ends)] if ends else after.rstrip()
