"""Turn pydantic's JSON Schema into the structural OpenAPI v3 schema a CRD needs.

A CRD schema differs from JSON Schema in a few ways the API server enforces: no `$ref`, every node
typed, `nullable` instead of a null type, `exclusiveMinimum` as a flag, no `additionalProperties: false`
(unknown fields are refused by the server's strict field validation instead), and free-form maps
marked `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
from typing import Any

_DROP_KEYS = {"title", "examples", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **siblings}, defs)
    return {k: _resolve(v, defs) for k, v in node.items() if k not in _DROP_KEYS}


def _strip_null(node: dict[str, Any]) -> dict[str, Any]:
    """`X | None = None` is an optional field: omitting it is how a manifest says None."""
    options = node.get("anyOf")
    if not options:
        return node
    non_null = [o for o in options if o.get("type") != "null"]
    if len(non_null) == len(options):
        return node
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if rest.get("default", "absent") is None:
        del rest["default"]
    if len(non_null) == 1:
        return {**non_null[0], **rest}
    return {**rest, "anyOf": non_null}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = _strip_null(node)
    out: dict[str, Any] = {k: _structural(v) for k, v in node.items()}

    if "exclusiveMinimum" in out and not isinstance(out["exclusiveMinimum"], bool):
        out["minimum"], out["exclusiveMinimum"] = out["exclusiveMinimum"], True
    if "exclusiveMaximum" in out and not isinstance(out["exclusiveMaximum"], bool):
        out["maximum"], out["exclusiveMaximum"] = out["exclusiveMaximum"], True
    if "const" in out:
        out["enum"] = [out.pop("const")]

    if "enum" in out and "type" not in out:
        values = out["enum"]
        out["type"] = "integer" if all(isinstance(v, int) for v in values) else "string"

    if out.get("type") == "object":
        extra = out.get("additionalProperties")
        if extra is False:
            del out["additionalProperties"]
        elif extra is True or (extra == {} and "properties" not in out):
            del out["additionalProperties"]
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def to_structural(json_schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD-ready schema from pydantic's `model_json_schema(by_alias=True)`."""
    resolved = _resolve(json_schema, json_schema.get("$defs", {}))
    structural: dict[str, Any] = _structural(resolved)
    return structural
