"""Chat records as users have them, as one shape: OpenAI messages with plain-string content.

Read: OpenAI `messages` (string content or typed parts, `tool_calls`, `tool` messages, a `tools`
column), ShareGPT `conversations` of `from`/`value` (human, gpt, system, function_call,
observation), LLaMA-Factory v1's typed blocks (`{"type": "text", "value": ...}`, `reasoning`,
`tool_call`). ShareGPT's keys are found by themselves when the source keeps the default field names.

Written: `{"messages": [{"role": system|user|assistant|tool, "content": str, "tool_calls"?: [...]}],
"tools"?: [...]}` with tool calls as `{"type": "function", "function": {"name", "arguments": {...}}}`
(arguments as an object: what chat templates render with `tojson`) and tools as OpenAI's
`{"type": "function", "function": {...}}`. Reasoning becomes `<think>...</think>` before the answer
(the DeepSeek-R1 form) or is dropped, per `dataset.reasoning`.

A record that cannot take this shape is refused with a short reason the data report counts.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from finetune_operator.api.spec import DatasetSource

TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_PARTS = ("reasoning", "thinking")
TOOL_CALL_PARTS = ("tool_call", "function_call")
THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


class Refused(ValueError):
    """A record that cannot be read as a conversation; str(self) is the report's reason."""


def conversation(source: DatasetSource, row: dict[str, Any], reasoning: str) -> dict[str, Any]:
    """The record as messages (and tools); `Refused` with the reason otherwise."""
    messages = messages_under(source, row)
    if not isinstance(messages, list) or not messages:
        raise Refused(f"no list of messages under {source.messages_field}")
    out = turns(source, messages, reasoning, system=row.get("system"))
    link_tool_results(out)
    record: dict[str, Any] = {"messages": out}
    tools = tools_under(source, row)
    if tools is not None:
        record["tools"] = tools
    return record


def messages_under(source: DatasetSource, row: dict[str, Any]) -> Any:
    """What the row holds under messagesField, or ShareGPT's `conversations` when that is the default."""
    messages = row.get(source.messages_field)
    if messages is None and source.messages_field == "messages" and "conversations" in row:
        messages = row["conversations"]  # ShareGPT
    return messages


def turns(source: DatasetSource, messages: list[Any], reasoning: str, *, system: Any = None
          ) -> list[dict[str, Any]]:  # fmt: skip
    """Messages as users write them in the one shape, tool call ids not yet linked; `system` (a
    record's system column) first unless the first message is a system message already."""
    roles = _roles(source)
    out: list[dict[str, Any]] = []
    if isinstance(system, str) and system.strip() and \
            not (messages and _is_system(messages[0], source, roles)):  # fmt: skip
        out.append({"role": "system", "content": system})
    for raw in messages:
        message = _message(source, raw, roles, reasoning)
        if out and message["role"] == "assistant" and out[-1]["role"] == "assistant" and \
                not out[-1].get("tool_calls") and not message["content"]:  # fmt: skip
            out[-1]["tool_calls"] = message["tool_calls"]  # an answer, then its call (ShareGPT)
            continue
        out.append(message)
    return out


def tools_under(source: DatasetSource, row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row's tools column as OpenAI tools; None when it has none."""
    tools = row.get(source.tools_field)
    return None if tools in (None, "", [], "[]") else _tools(tools)


def link_tool_results(messages: list[dict[str, Any]]) -> None:
    """Give calls without an id one (9 letters and digits: the form Mistral's template demands),
    and a tool result without tool_call_id the id of the call it answers, in order."""
    pending: list[str] = []
    for at, message in enumerate(messages):
        for n, call in enumerate(message.get("tool_calls", [])):
            seed = f"{at}:{n}:{call['function']['name']}".encode()
            call.setdefault("id", hashlib.sha256(seed).hexdigest()[:9])
            pending.append(call["id"])
        if message["role"] == "tool" and pending:
            message.setdefault("tool_call_id", pending.pop(0))


def has_target(record: dict[str, Any]) -> bool:
    return any(
        m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in record["messages"]
    )


def _roles(source: DatasetSource) -> dict[str, str]:
    roles = {name: "system" for name in source.system_roles}
    roles |= {name: "user" for name in source.user_roles}
    roles |= {name: "tool" for name in source.tool_roles}
    roles |= {name: "tool_call" for name in source.tool_call_roles}
    roles |= {name: "assistant" for name in source.assistant_roles}
    return roles


def _key(message: dict[str, Any], configured: str, default: str, sharegpt: str) -> str:
    if configured == default and default not in message and sharegpt in message:
        return sharegpt
    return configured


def _is_system(message: Any, source: DatasetSource, roles: dict[str, str]) -> bool:
    if not isinstance(message, dict):
        return False
    return roles.get(message.get(_key(message, source.role_field, "role", "from"))) == "system"


def _message(source: DatasetSource, raw: Any, roles: dict[str, str], reasoning: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise Refused("a message that is not an object")
    name = raw.get(_key(raw, source.role_field, "role", "from"))
    role = roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise Refused(f"unknown role {str(name)[:40]!r}")
    content = raw.get(_key(raw, source.content_field, "content", "value"))
    if content is None and not (role == "assistant" and raw.get("tool_calls")):
        raise Refused(f"a {role} message without content")  # only a tool call may have none (OpenAI)
    text, thought, calls = _content(content)
    if role == "tool_call":
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(text)]}
    calls += [_tool_call(c) for c in raw.get("tool_calls") or []]
    if role != "assistant" and (calls or thought):
        raise Refused(f"tool calls or reasoning in a {role} message")
    message: dict[str, Any] = {"role": role, "content": text}
    if role == "assistant":
        thought = thought or raw.get("reasoning_content") or ""
        message["content"] = with_reasoning(text, thought, reasoning)
        if calls:
            message["tool_calls"] = calls
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(raw.get(key), str):
                message[key] = raw[key]
    return message


def _content(content: Any) -> tuple[str, str, list[dict[str, Any]]]:
    """(text, reasoning, tool calls) of a message's content: a string, or a list of typed parts
    whose text parts are joined (as chat templates join them); any other part is refused by name."""
    if content is None:
        return "", "", []
    if isinstance(content, str):
        return content, "", []
    if isinstance(content, dict):
        return json.dumps(content, ensure_ascii=False), "", []  # a tool result given as an object
    if not isinstance(content, list):
        raise Refused("content that is neither text nor a list of parts")
    text, thought, calls = [], [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        value = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(value, str):
            text.append(value)
        elif kind in REASONING_PARTS and isinstance(value, str):
            thought.append(value)
        elif kind in TOOL_CALL_PARTS and value is not None:
            calls.append(_tool_call(value))
        else:
            raise Refused(f"content part {str(kind)[:40]!r} (only text, reasoning and tool calls train)")
    return "".join(text), "\n".join(thought), calls


def with_reasoning(text: str, thought: str, reasoning: str) -> str:
    """An answer's text with its reasoning before it (`dataset.reasoning` train) or without (drop)."""
    if reasoning == "drop":
        return THINK_BLOCK.sub("", text, count=1)
    if thought.strip() and "<think>" not in text:
        return f"<think>\n{thought.strip()}\n</think>\n\n{text.lstrip()}"
    return text


def _tool_call(value: Any) -> dict[str, Any]:
    """OpenAI's `{"id", "type", "function": {"name", "arguments"}}` or a bare `{"name", "arguments"}`
    (ShareGPT, LLaMA-Factory), either as an object or its JSON text."""
    call = _json(value, "a tool call")
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise Refused("a tool call without a name")
    arguments = function.get("arguments", function.get("parameters", {}))
    arguments = _json(arguments, "tool call arguments") if isinstance(arguments, str) else arguments
    out: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = _json(value, "the tools column") if isinstance(value, str) else value
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise Refused("a tools column that is not a list of tools")
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]  # fmt: skip


def _json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise Refused(f"{what} that is not JSON") from None
