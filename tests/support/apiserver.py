"""What the API server does to a custom resource on create and update, for tests without a cluster.

In the server's order: defaulting from the schema, strict field validation (unknown fields are
refused, as `kubectl apply` does by default), OpenAPI schema validation, then the CEL rules in
`x-kubernetes-validations`, evaluated with a real CEL engine (cel-python) on values typed by the
schema the way the server types them (`number` fields are doubles even when written as `1`).
Error strings follow the server's `<path>: <message>` shape.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

API_VERSION, KIND = (
    "finetune.dev/v1alpha1",
    "FineTuneJob",
)  # what the CRD serves, spelt as the server knows it
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # apimachinery's dns1123LabelFmt


@dataclass
class Admission:
    errors: list[str] = field(default_factory=list)
    object: dict[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        return not self.errors


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        for name, prop in props.items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name, item in value.items():
            if name in props:
                value[name] = apply_defaults(item, props[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused wherever the CRD does not preserve them."""
    out = {k: (strict(v) if isinstance(v, dict) else v) for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    if "anyOf" in out:
        out["anyOf"] = [strict(s) for s in out["anyOf"]]
    return out


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return celpy.json_to_cel(value)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", {})
        extra = extra if isinstance(extra, dict) else {}
        return celtypes.MapType(
            {celtypes.StringType(k): to_cel(v, props.get(k, extra)) for k, v in value.items()}
        )
    return celpy.json_to_cel(value)


class CelRules:
    """Compiles every rule of a schema once; evaluates the ones that apply to an object."""

    def __init__(self) -> None:
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self._env.program(self._env.compile(rule))
        return self._programs[rule]

    def evaluate(self, path: str, value: Any, old: Any, schema: dict[str, Any], errors: list[str]) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            transition = "oldSelf" in rule["rule"]
            if transition and old is None:
                continue  # transition rules only run on updates where the old value exists
            activation = {"self": to_cel(value, schema)}
            if transition:
                activation["oldSelf"] = to_cel(old, schema)
            result = self.program(rule["rule"]).evaluate(activation)
            if isinstance(result, Exception) or result is not True:
                where = (path + rule.get("fieldPath", "")).lstrip(".")
                if result is not True and not isinstance(result, celtypes.BoolType):
                    errors.append(f"{where}: rule could not be evaluated: {result}")
                elif not result:
                    errors.append(f"{where}: Invalid value: {rule['message']}")
        if isinstance(value, dict):
            props = schema.get("properties", {})
            for name, child in value.items():
                if name in props:
                    old_child = old.get(name) if isinstance(old, dict) else None
                    self.evaluate(f"{path}.{name}" if path else name, child, old_child, props[name], errors)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            # Kubernetes correlates list items for transition rules only in map lists; these are atomic.
            for index, item in enumerate(value):
                self.evaluate(f"{path}[{index}]", item, None, schema["items"], errors)


class FakeApiServer:
    """Admission of FineTuneJob objects against one CRD's openAPIV3Schema."""

    def __init__(self, crd: dict[str, Any]) -> None:
        self.schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        checked = strict(self.schema)
        # metadata is ObjectMeta, validated by the server itself; the CRD only narrows the name.
        checked["properties"]["metadata"].pop("additionalProperties", None)
        self._validator = jsonschema.Draft4Validator(checked)
        self._cel = CelRules()

    def admit(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> Admission:
        header = self._object_errors(obj)
        if header:
            return Admission(errors=header)
        obj = apply_defaults(copy.deepcopy(obj), self.schema)
        errors = [self._schema_error(e) for e in self._validator.iter_errors(obj)]
        if not errors:
            self._cel.evaluate("", obj, old, self.schema, errors)
        return Admission(errors=errors, object=obj if not errors else None)

    @staticmethod
    def _object_errors(obj: dict[str, Any]) -> list[str]:
        """What the server checks before the CRD's schema: the object names this resource (kubectl
        refuses an object without apiVersion or kind, and routes another kind elsewhere: "no matches
        for kind"), and its ObjectMeta's namespace is an RFC 1123 label (ValidateNamespaceName)."""
        errors = [f"{key}: Required value" for key in ("apiVersion", "kind") if key not in obj]
        if obj.get("apiVersion", API_VERSION) != API_VERSION:
            errors.append(f"apiVersion: Invalid value: {obj['apiVersion']!r}: no matches for this version")
        if obj.get("kind", KIND) != KIND:
            errors.append(f"kind: Invalid value: {obj['kind']!r}: no matches for kind in {API_VERSION}")
        meta = obj.get("metadata")
        namespace = meta.get("namespace") if isinstance(meta, dict) else None
        if isinstance(namespace, str) and not (len(namespace) <= 63 and re.fullmatch(DNS_LABEL, namespace)):
            errors.append(
                f"metadata.namespace: Invalid value: {namespace!r}: a lowercase RFC 1123 label must consist "
                "of lower case alphanumeric characters or '-'"
            )
        return errors

    @staticmethod
    def _schema_error(error: jsonschema.ValidationError) -> str:
        path = ""
        for part in error.absolute_path:
            path += f"[{part}]" if isinstance(part, int) else ("." if path else "") + str(part)
        if error.validator == "required":
            missing = [n for n in error.validator_value if n not in error.instance]
            return "; ".join(
                f"{path}.{name}: Required value" if path else f"{name}: Required value" for name in missing
            )
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            return "; ".join(
                f"{path}.{name}: unknown field" if path else f"{name}: unknown field" for name in unknown
            )
        return f"{path}: Invalid value: {error.message}"
