"""Readable validation errors: one line per problem, naming the field by its manifest path."""

from __future__ import annotations

import difflib
import functools
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from finetune_operator.api.base import RuleViolation

# The header fields a manifest must name, with the only value each may have.
_HEADER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob"}


@functools.cache
def _known_names() -> frozenset[str]:
    """Every field name a FineTuneJob manifest can hold, at any depth."""
    from finetune_operator.api.job import FineTuneJob

    names: set[str] = set()
    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(field.alias or name)
            for kind in _model_types(field.annotation):
                walk(kind)

    walk(FineTuneJob)
    return frozenset(names)


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def _unknown_field(key: object) -> str:
    """Why a key is unknown, with the name it was probably meant to be."""
    if isinstance(key, str):
        if "_" in key and to_camel(key) in _known_names():
            return f"unknown field; manifests use camelCase: did you mean {to_camel(key)}?"
        close = difflib.get_close_matches(key, sorted(_known_names()), n=1, cutoff=0.8)
        if close:
            return f"unknown field; did you mean {close[0]}?"
    return "unknown field; check its spelling and nesting against docs/api.md"


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
            lines.append(f"{base}: {_unknown_field(error['loc'][-1] if error['loc'] else None)}")
        elif error["type"] == "missing" and base in _HEADER:
            lines.append(f"{base}: required field is missing; set {base}: {_HEADER[base]}")
        elif error["type"] == "missing":
            lines.append(f"{base}: required field is missing")
        elif error["type"] == "literal_error" and base in _HEADER:
            lines.append(f"{base}: must be {_HEADER[base]}{_input_hint(error)}")
        else:
            lines.append(f"{base}: {error['msg']}{_input_hint(error)}")
    return lines
