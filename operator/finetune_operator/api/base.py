"""Building blocks shared by every FineTuneJob model: camelCase wire names, strictness, and
cross-field rules that exist once and are enforced twice (pydantic here, CEL in the CRD)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import ExtraValues


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once in both languages that enforce it.

    `cel` goes into the CRD's `x-kubernetes-validations`, so `kubectl apply` refuses the object;
    `check` runs in the pydantic model, so `ftjob validate`, the local run and the trainer refuse it
    with the same `message`. `field` is the offending field relative to the model the rule sits on.
    Tests run both sides over the same malformed manifests and require them to agree.
    """

    cel: str
    message: str
    field: str
    check: Callable[[Any], bool]

    def to_crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": "." + self.field}


@dataclass(frozen=True)
class ServerRule:
    """A rule only the API server enforces: transition rules compare the new object with the stored
    one (`oldSelf`), which only the server sees; metadata rules duplicate a pydantic field
    constraint on a part of the object the models keep loose."""

    cel: str
    message: str
    field: str

    def to_crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": "." + self.field}


class RuleViolation(ValueError):
    """Raised by a model whose cross-field rules fail; carries field paths for readable errors."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{field}: {message}" for field, message in violations))


def _crd_schema_extras(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """Carry into the schema what pydantic knows but JSON Schema leaves out: the CEL rules, and the
    defaults of default_factory fields. A section defaults to `{}` so the API server fills in its
    fields' own defaults, as pydantic does; lists and maps default to their empty value."""
    rules = [r.to_crd() for r in getattr(cls, "rules", ())]
    rules += [r.to_crd() for r in getattr(cls, "server_rules", ())]
    if rules:
        schema["x-kubernetes-validations"] = rules
    for name, field in cls.model_fields.items():
        if field.default_factory is None:
            continue
        prop = schema.get("properties", {}).get(field.alias or name)
        if prop is None:
            continue
        value = field.default_factory()  # type: ignore[call-arg]
        prop["default"] = {} if isinstance(value, BaseModel) else value


class ApiModel(BaseModel):
    """Base of every model in the FineTuneJob API."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        # Python code constructs models by field name (`ResourcesSpec(gpus_per_node=8)`); input
        # (model_validate, model_validate_json: manifests, stored objects, the trainer's config) is
        # read by its camelCase names only, as the API server reads it, below.
        populate_by_name=True,
        extra="forbid",
        # Strict like the API server: "4" is not an integer and "yes" is not a boolean, so a manifest
        # is refused or accepted by both layers alike. Timestamps and enums read from the API
        # arrive as strings and opt out per field.
        strict=True,
        validate_default=True,
        json_schema_extra=_crd_schema_extras,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    server_rules: ClassVar[tuple[ServerRule, ...]] = ()

    # A snake_case key in a manifest is an unknown field to the API server (the CRD drops it, so the
    # job would run at the default): it is one here too. by_name applies to nested models as well.
    @classmethod
    def model_validate(
        cls,
        obj: Any,
        *,
        strict: bool | None = None,
        extra: ExtraValues | None = None,
        from_attributes: bool | None = None,
        context: Any | None = None,
        by_alias: bool | None = None,
        by_name: bool | None = False,
    ) -> Self:
        return super().model_validate(
            obj, strict=strict, extra=extra, from_attributes=from_attributes, context=context,
            by_alias=by_alias, by_name=by_name,
        )  # fmt: skip

    @classmethod
    def model_validate_json(
        cls,
        json_data: str | bytes | bytearray,
        *,
        strict: bool | None = None,
        extra: ExtraValues | None = None,
        context: Any | None = None,
        by_alias: bool | None = None,
        by_name: bool | None = False,
    ) -> Self:
        return super().model_validate_json(
            json_data, strict=strict, extra=extra, context=context, by_alias=by_alias, by_name=by_name
        )

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        failed = [(r.field, r.message) for r in type(self).rules if not r.check(self)]
        if failed:
            raise RuleViolation(failed)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as it is written to the cluster: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Kubernetes resource quantities ("8", "16Gi", "500m", or a bare integer). Every quantity in this
# API is a size or an amount a pod asks for (memory, CPU, /dev/shm, scratch, a volume's size), where
# zero or less is never what the user meant and fails only later, at pod creation or in the kubelet:
# so the mantissa must have a non-zero digit and no sign ("+" aside). Otherwise the pattern is the
# one Kubernetes publishes for Quantity (its suffixes and exponents). RE2-compatible: no lookahead.
_POSITIVE_MANTISSA = r"(([0-9]*[1-9][0-9]*(\.[0-9]*)?)|([0-9]*\.[0-9]*[1-9][0-9]*))"
_QUANTITY_SUFFIX = r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?"
QUANTITY_PATTERN = rf"^\+?{_POSITIVE_MANTISSA}{_QUANTITY_SUFFIX}$"


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, int) and value <= 0:
        raise ValueError("a quantity must be greater than zero (examples: 8, 500m, 64Gi)")
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        if value.strip().startswith("-") or re.match(r"^\+?[0.]+([^0-9.].*)?$", value):
            raise ValueError(f"{value!r}: a quantity must be greater than zero (examples: 8, 500m, 64Gi)")
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 8, 500m, 64Gi)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "minimum": 1,  # for an integer, as the models check; the pattern covers strings
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# Names that end up as Kubernetes object names (Secrets, ServiceAccounts, classes): DNS-1123 subdomains.
# `[.]` rather than an escaped dot, so the text also goes into a CEL string unescaped; the schema's
# own pattern keeps the escaped dot it has always been published with.
DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS_SUBDOMAIN_PATTERN = "^" + DNS_SUBDOMAIN.replace("[.]", r"\.") + "$"
K8sName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]

# Storage locations. Bucket names follow S3's rules; file:// must be absolute (three slashes).
S3_URI_PATTERN = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
FILE_URI_PATTERN = r"file:///[^\s]*"
# The storage schemes the API accepts, each with its pattern: the one list the trainer's storage.py
# dispatches on (a test keeps the two in step).
STORAGE_SCHEMES: dict[str, str] = {"s3": S3_URI_PATTERN, "file": FILE_URI_PATTERN}
ANY_STORAGE_URI = "|".join(STORAGE_SCHEMES.values())  # an alternation, for patterns that accept more
STORAGE_URI_PATTERN = rf"^({ANY_STORAGE_URI})$"
StorageUri = Annotated[str, Field(pattern=STORAGE_URI_PATTERN, max_length=2048)]

# A model can also come from a hub id ("org/name"), for clusters that reach a model hub.
HUB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?"
MODEL_SOURCE_PATTERN = rf"^({ANY_STORAGE_URI}|{HUB_ID_PATTERN})$"
ModelSource = Annotated[str, Field(pattern=MODEL_SOURCE_PATTERN, max_length=2048)]

ShortString = Annotated[str, Field(min_length=1, max_length=253)]
