"""docs/api.md, generated from the CRD schema so the reference says exactly what the API server enforces."""

from __future__ import annotations

import json
from typing import Any

from finetune_operator.api.crd import PRINTER_COLUMNS, openapi_schema

INTRO = """# FineTuneJob API reference (`finetune.dev/v1alpha1`)

Generated from the pydantic models in `operator/finetune_operator/api` by `make docs`; a test fails
when this file is stale. A minimal manifest names `spec.model.source`, `spec.dataset.sources` and
`spec.checkpoint.uri`; everything else has a default that fits one node of 8 GPUs.

Rules marked *(CEL)* are checked by the API server when you `kubectl apply`, and by `ftjob validate`
and the local run with the same message. Rules marked *(server)* need the stored object and are only
checked by the API server.
"""


# Kubernetes' own types embedded in the API (api/kubernetes.py) are documented by Kubernetes: the
# reference names them instead of repeating their dozens of fields.
_KUBERNETES_TYPE = "Kubernetes core/v1 "


def _kubernetes_type(node: dict[str, Any]) -> str | None:
    description = str(node.get("description", ""))
    if not description.startswith(_KUBERNETES_TYPE):
        return None
    return " ".join(description.split()[:3]).rstrip(",.")


def _type(node: dict[str, Any]) -> str:
    kubernetes = _kubernetes_type(node)
    if kubernetes:
        return kubernetes
    if node.get("x-kubernetes-int-or-string"):
        return "int or string (quantity)"
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if node.get("format") == "date-time":
        return "timestamp"
    return str(kind)


def _limits(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ):
        if key in node:
            strict = node.get("exclusive" + key[0].upper() + key[1:]) is True
            parts.append(f"{label.replace('=', '') if strict else label} {node[key]}")
    if "pattern" in node and not node.get("x-kubernetes-int-or-string"):
        parts.append(f"pattern `{node['pattern']}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(path: str, node: dict[str, Any], out: list[str]) -> None:
    props: dict[str, Any] = node.get("properties", {})
    required = set(node.get("required", []))
    out += [f"## `{path}`", "", node.get("description", ""), ""]
    out += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    children: list[tuple[str, dict[str, Any]]] = []
    for name, prop in props.items():
        default = (
            "required"
            if name in required
            else ("" if "default" not in prop else f"`{json.dumps(prop['default'])}`")
        )
        limits = _limits(prop)
        desc = prop.get("description", "") + (f" ({limits})" if limits else "")
        out.append(f"| `{name}` | {_cell(_type(prop))} | {_cell(default)} | {_cell(desc)} |")
        item = prop.get("items", {}) if prop.get("type") == "array" else prop
        if item.get("type") == "object" and item.get("properties") and not _kubernetes_type(item):
            children.append((f"{path}.{name}{'[]' if prop.get('type') == 'array' else ''}", item))
    rules = node.get("x-kubernetes-validations", [])
    if rules:
        out += ["", "Rules:", ""]
        for rule in rules:
            kind = "server" if "oldSelf" in rule["rule"] else "CEL"
            out.append(f"- `{path}{rule['fieldPath']}`: {rule['message']} *({kind})*")
    out.append("")
    for child_path, child in children:
        _section(child_path, child, out)


def render_api_docs() -> str:
    schema = openapi_schema()
    out = [INTRO, "## `kubectl get ftj` columns", "", "| column | from | shown |", "| --- | --- | --- |"]
    for col in PRINTER_COLUMNS:
        out.append(
            f"| {col['name']} | `{_cell(col['jsonPath'])}` | {'-o wide' if col.get('priority') else 'always'} |"  # noqa: E501
        )
    out.append("")
    root_rules = schema.get("x-kubernetes-validations", [])
    if root_rules:
        out += ["## Changes to a started job", ""]
        for rule in root_rules:
            out.append(f"- `{rule['fieldPath'].lstrip('.')}`: {rule['message']} *(server)*")
        out.append("")
    _section("spec", schema["properties"]["spec"], out)
    _section("status", schema["properties"]["status"], out)
    return "\n".join(out).rstrip() + "\n"
