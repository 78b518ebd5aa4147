"""Kubernetes' own object shapes inside the FineTuneJob API: core/v1 Volume and VolumeMount as pydantic
models built from the OpenAPI snapshot in `kubernetes_schema.json` (written by `tools/k8s_schema.py`
from the schemas kubernetes-validate ships). Nothing here is a hand-made copy of a Kubernetes type:
the models refuse what the API server's OpenAPI refuses (unknown fields, wrong types, missing
required fields), and the CRD generated from them carries the same structure.

The OpenAPI does not carry every check of the server's own validation (pkg/apis/core/validation);
the few the FineTuneJob rules depend on are added in `_SERVER_CHECKS`, each with its origin. The
rest (a PVC's access modes, a CSI driver's attributes...) is checked when the pod is created, and a
refusal there is reported on the job like any other admission failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model

from finetune_operator.api.base import Quantity

_SNAPSHOT: dict[str, Any] = json.loads((Path(__file__).parent / "kubernetes_schema.json").read_text())
_DEFS: dict[str, Any] = _SNAPSHOT["definitions"]
VOLUME = "io.k8s.api.core.v1.Volume"
VOLUME_MOUNT = "io.k8s.api.core.v1.VolumeMount"

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Checks of the server's validation that the OpenAPI leaves out and the FineTuneJob rules build on.
_SERVER_CHECKS: dict[tuple[str, str], dict[str, Any]] = {
    # ValidateVolumes: a volume's name is a DNS-1123 label (IsDNS1123Label).
    (VOLUME, "name"): {"pattern": DNS_LABEL_PATTERN, "max_length": 63},
    (VOLUME_MOUNT, "name"): {"pattern": DNS_LABEL_PATTERN, "max_length": 63},
    # The server only requires a mount path; the container runtime refuses a relative one when the
    # pod starts (runc: "mount destination ... not absolute"), which is too late to be useful.
    (VOLUME_MOUNT, "mountPath"): {"pattern": r"^/", "max_length": 4096},
}

# Types the OpenAPI expresses as oneOf, which a structural schema expresses as int-or-string.
IntOrString = Annotated[
    int | str,
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]
_SPECIAL: dict[str, Any] = {
    "io.k8s.apimachinery.pkg.api.resource.Quantity": Quantity,
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": IntOrString,
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time": str,
    "io.k8s.apimachinery.pkg.apis.meta.v1.FieldsV1": dict[str, Any],
}
_SCALARS: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool}
_CONFIG = ConfigDict(strict=True, extra="forbid")  # fields are filled by their Kubernetes names only
_DESCRIPTIONS = {
    VOLUME: "Kubernetes core/v1 Volume, exactly as in a Pod's spec.volumes (persistentVolumeClaim, "
    "ephemeral, nfs, csi, configMap, secret, hostPath, emptyDir...).",
    VOLUME_MOUNT: "Kubernetes core/v1 VolumeMount, exactly as in a container's volumeMounts.",
}


class _ModelBuilder:
    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.models: dict[str, type[BaseModel]] = {}

    def model(self, ref: str) -> type[BaseModel]:
        if ref not in self.models:
            schema = self.defs[ref]
            required = set(schema.get("required", []))
            fields: dict[str, Any] = {}
            for name, prop in schema.get("properties", {}).items():
                kind = self.type_of(prop)
                checks = _SERVER_CHECKS.get((ref, name))
                if checks:
                    kind = Annotated[kind, Field(**checks)]
                # Python names are prefixed: Kubernetes field names may shadow BaseModel attributes.
                if name in required:
                    fields[f"k_{name}"] = (kind, Field(alias=name))
                else:
                    fields[f"k_{name}"] = (kind | None, Field(None, alias=name))
            self.models[ref] = create_model(
                ref.rsplit(".", 1)[-1], __config__=_CONFIG, __doc__=_DESCRIPTIONS.get(ref), **fields
            )
        return self.models[ref]

    def type_of(self, prop: dict[str, Any]) -> Any:
        ref = prop.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            return _SPECIAL.get(name) or self.model(name)
        kinds = prop["type"]
        kind: str = next(k for k in kinds if k != "null") if isinstance(kinds, list) else kinds
        if kind == "array":
            return list[self.type_of(prop["items"])]  # type: ignore[misc]
        if kind == "object":
            extra = prop.get("additionalProperties")
            return dict[str, self.type_of(extra)] if isinstance(extra, dict) else dict[str, Any]  # type: ignore[misc]
        return _SCALARS[kind]


_builder = _ModelBuilder(_DEFS)

if TYPE_CHECKING:
    KubernetesVolume = BaseModel
    KubernetesVolumeMount = BaseModel
else:
    KubernetesVolume = _builder.model(VOLUME)
    KubernetesVolumeMount = _builder.model(VOLUME_MOUNT)

# Every kind of volume source a Volume may name (each volume names at most one; none is emptyDir).
VOLUME_SOURCES: tuple[str, ...] = tuple(p for p in _DEFS[VOLUME]["properties"] if p != "name")
SCHEMA_SOURCE: str = _SNAPSHOT["source"]


def wire(obj: BaseModel) -> dict[str, Any]:
    """A Kubernetes object as the API takes it: its own field names, unset fields left out."""
    return obj.model_dump(mode="json", by_alias=True, exclude_none=True)


def k8s_field(obj: BaseModel, name: str) -> Any:
    """A field of a Kubernetes object model by its Kubernetes name."""
    return getattr(obj, f"k_{name}")
