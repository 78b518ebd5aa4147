"""Preference pairs (shape preference, for training.objective dpo) as users keep them: a prompt, a
chosen answer and a rejected one, read into one shape; preferences.py encodes them.

Read (the source's promptField, messagesField, chosenField, rejectedField and toolsField name them):
- TRL, explicit prompt: `prompt`, `chosen` and `rejected` as text, or `prompt` as messages and `chosen`
  and `rejected` as lists of assistant messages. Text on one side and messages on the other is read
  as a chat (a text prompt is one user message, a text answer one assistant message).
- TRL, implicit prompt: no prompt; `chosen` and `rejected` are whole conversations, the prompt their
  longest common prefix of messages, which must end before the assistant turns that differ. Answers
  that are whole conversations are read so even beside a prompt column (UltraFeedback keeps both;
  TRL's `maybe_extract_prompt` does the same). Whole texts (Anthropic HH) share their opening words:
  the prompt ends before the whitespace that precedes the first word they differ in, and that
  whitespace opens each answer, as TRL's `extract_prompt` moves it (which, unlike here, may cut a
  word in two).
- LLaMA-Factory's ranking format: the prompt a conversation under messagesField (ShareGPT's
  `conversations` found by itself), `chosen` and `rejected` each one message (from/value or
  role/content).
- A `system` column and a tools column, as chat records read them; messages.py reads the messages
  (roles, ShareGPT keys, typed parts, tool calls, reasoning), which `dataset.reasoning` also applies to
  text answers.

Written (a record's fields in the data plan): `{"prompt": [messages], "chosen": [assistant messages],
"rejected": [assistant messages], "tools"?: [...]}`, or when the prompt and both answers are text and
there are no tools `{"prompt": str, "chosen": str, "rejected": str, "system"?: str}`, which the
source's promptFormat lays out as plain text or as a chat, like promptCompletion records.
"""

from __future__ import annotations

import re
from typing import Any

from finetune_operator.api.spec import DatasetSource

from finetune_trainer.messages import (
    Refused,
    link_tool_results,
    messages_under,
    tools_under,
    turns,
    with_reasoning,
)

Messages = list[dict[str, Any]]
SIDES = ("chosen", "rejected")
LAST_WORD = re.compile(r"\s*\S*\Z")  # a text's last word and the whitespace before it


def clean_pair(source: DatasetSource, row: dict[str, Any], reasoning: str) -> dict[str, Any]:
    """The record as a pair in the written shape; `Refused` with the reason, naming the field, otherwise."""
    names = {"chosen": source.chosen_field, "rejected": source.rejected_field}
    answers: dict[str, Any] = {side: _answer(source, row, side, names[side], reasoning) for side in SIDES}
    prompt, where = row.get(source.prompt_field), f"under {source.prompt_field}"
    if prompt is None:
        prompt = messages_under(source, row)
        where = f"under {source.messages_field if source.messages_field in row else 'conversations'}"
        if prompt is None:
            where = f"under {source.prompt_field} or {source.messages_field}"
    shared = f"shared by {names['chosen']} and {names['rejected']}"
    # A whole conversation holds its question; answers never hold a user turn.
    whole = [isinstance(row.get(names[s]), list) and any(m["role"] == "user" for m in answers[s])
             for s in SIDES]  # fmt: skip
    if all(whole) or (prompt is None and not any(isinstance(a, str) for a in answers.values())):
        return _chat(source, row, *_common_prefix(source, row, reasoning), where=shared)
    if prompt is None and all(isinstance(a, str) for a in answers.values()):
        prompt, answers, where = *_shared_words(answers["chosen"], answers["rejected"]), shared
    tools = tools_under(source, row)
    if isinstance(prompt, str) and tools is None and all(isinstance(a, str) for a in answers.values()):
        if not prompt.strip():
            raise Refused(f"no prompt {where}")
        for side in SIDES:
            if not answers[side].strip():
                raise Refused(f"no {side} answer under {names[side]}")
        _differ(answers, names)
        system = row.get("system")
        return {"prompt": prompt, **answers, **({"system": system} if _text(system) else {})}
    if isinstance(prompt, str):  # a chat after all: the text is the user's turn
        system = [{"role": "system", "content": row["system"]}] if _text(row.get("system")) else []
        messages = [*system, {"role": "user", "content": prompt}] if prompt.strip() else []
    elif isinstance(prompt, dict | list):
        messages = turns(source, _listed(prompt), reasoning, system=row.get("system"))
    else:
        raise Refused(f"no prompt {where}")
    chosen, rejected = (
        [{"role": "assistant", "content": a}] if isinstance(a, str) else a for a in answers.values()
    )
    return _chat(source, row, messages, chosen, rejected, where=where)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, dict) else value  # a single message (LLaMA-Factory's answers)


def _answer(source: DatasetSource, row: dict[str, Any], side: str, field: str, reasoning: str
            ) -> str | Messages:  # fmt: skip
    """One answer as text (reasoning applied) or messages; whether those say anything is judged once
    the prompt is known (whole conversations hold it)."""
    value = row.get(field)
    if isinstance(value, str):
        text = with_reasoning(value, "", reasoning)
        if text.strip():
            return text
    elif isinstance(value, dict | list) and value:
        return turns(source, _listed(value), reasoning)
    raise Refused(f"no {side} answer under {field}")


def _common_prefix(source: DatasetSource, row: dict[str, Any], reasoning: str) -> tuple[Messages, ...]:
    """Whole conversations as (prompt, chosen answer, rejected answer): the prompt is the messages
    both open with, a system column first in each as in a chat record."""
    chosen, rejected = (turns(source, _listed(row[field]), reasoning, system=row.get("system"))
                        for field in (source.chosen_field, source.rejected_field))  # fmt: skip
    pairs = zip(chosen, rejected, strict=False)
    n = next((i for i, (c, r) in enumerate(pairs) if c != r), min(len(chosen), len(rejected)))
    return chosen[:n], chosen[n:], rejected[n:]


def _shared_words(chosen: str, rejected: str) -> tuple[str, dict[str, str]]:
    """Whole texts as the prompt and the two answers: the prompt ends at a word boundary of both, and
    the whitespace before the first word they differ in opens each answer (as a prompt and its
    completion are tokenized: the answer's first token carries its leading space)."""
    n = next((i for i, (c, r) in enumerate(zip(chosen, rejected, strict=False)) if c != r),
             min(len(chosen), len(rejected)))  # fmt: skip
    common = chosen[:n]
    if all(n == len(text) or text[n].isspace() for text in (chosen, rejected)):
        cut = len(common.rstrip())  # the last shared word is whole in both
    else:
        cut = LAST_WORD.search(common).start()  # type: ignore[union-attr]  # matches every string
    return chosen[:cut], {"chosen": chosen[cut:], "rejected": rejected[cut:]}


def _chat(source: DatasetSource, row: dict[str, Any], prompt: Messages, chosen: Messages, rejected: Messages,
          *, where: str) -> dict[str, Any]:  # fmt: skip
    names = {"chosen": source.chosen_field, "rejected": source.rejected_field}
    answers = {"chosen": chosen, "rejected": rejected}
    for side, answer in answers.items():
        other = next((m["role"] for m in answer if m["role"] != "assistant"), None)
        if other:
            raise Refused(
                f"a {other} turn in the {side} answer under {names[side]}: answers are assistant turns"
            )
        if not any(m["content"].strip() or m.get("tool_calls") for m in answer):
            raise Refused(f"no {side} answer under {names[side]}")
    if all(m["role"] == "system" for m in prompt):
        raise Refused(f"no prompt {where}")
    if prompt[-1]["role"] == "assistant":  # DPO compares answers to one question: the last turn asks it
        raise Refused(f"the prompt {where} ends with an assistant turn")
    _differ(answers, names)
    for answer in (chosen, rejected):
        link_tool_results([*prompt, *answer])  # the prompt's calls get the same ids before either answer
    record: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    tools = tools_under(source, row)
    if tools is not None:
        record["tools"] = tools
    return record


def _differ(answers: dict[str, Any], names: dict[str, str]) -> None:
    if answers["chosen"] == answers["rejected"]:
        raise Refused(f"{names['chosen']} and {names['rejected']} are the same: nothing to prefer")
