"""Readable validation errors: one line per problem, naming the field by its manifest path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from finetune_operator.api.base import RuleViolation


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _input_hint(error: Any) -> str:
    value = error.get("input")
    # Env values may hold tokens a user pasted in; never echo them.
    if (
        error["type"] in {"missing", "extra_forbidden"}
        or isinstance(value, dict | list)
        or "env" in error["loc"]
    ):
        return ""
    text = repr(value)
    return f" (got {text[:60]}{'...' if len(text) > 60 else ''})"


def describe(exc: ValidationError) -> list[str]:
    """`field.path: what is wrong` lines, in manifest (camelCase) terms."""
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        base = _path(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolation):
            for field, message in cause.violations:
                lines.append(f"{base + '.' if base else ''}{field}: {message}")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{base}: unknown field; check its spelling and nesting against docs/api.md")
        elif error["type"] == "missing":
            lines.append(f"{base}: required field is missing")
        else:
            lines.append(f"{base}: {error['msg']}{_input_hint(error)}")
    return lines
