"""The rank pod's settings beyond the trainer's own: tolerations, extra environment, scratch
volume, pod metadata, the hub token's Secret, and the cross-field rules that keep user volumes,
mounts, metadata and extended resources from colliding with what the operator puts into every pod
(finetune_operator.contract)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from finetune_operator import contract
from finetune_operator.api.base import DNS_SUBDOMAIN, ApiModel, K8sName, Quantity, Rule, ShortString
from finetune_operator.api.kubernetes import VOLUME_SOURCES, k8s_field, wire

# A Kubernetes qualified name (label and annotation keys, extended resource names): an optional DNS
# subdomain prefix and "/", then a name of at most 63 characters (apimachinery IsQualifiedName).
# The same text is a Python and a CEL (RE2) pattern.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME_PATTERN = rf"^({DNS_SUBDOMAIN}/)?{_NAME}$"
PREFIXED_NAME_PATTERN = rf"^{DNS_SUBDOMAIN}/{_NAME}$"
MAX_QUALIFIED_NAME = 253 + 1 + 63
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

LabelKey = Annotated[str, Field(pattern=QUALIFIED_NAME_PATTERN, max_length=MAX_QUALIFIED_NAME)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]


def _qualified(key: str) -> bool:
    return len(key) <= MAX_QUALIFIED_NAME and re.match(QUALIFIED_NAME_PATTERN, key) is not None


def _cel_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _qualified_keys(field: str, start: str) -> Rule:
    """Every key of the map `field` is a Kubernetes qualified name, in both layers."""
    return Rule(
        cel=f"self.{field}.all(k, size(k) <= {MAX_QUALIFIED_NAME} && k.matches('{QUALIFIED_NAME_PATTERN}'))",
        message=f"{start}[prefix/]name: an optional DNS subdomain, then at most 63 letters, digits, '-', "
        "'_' or '.', starting and ending with a letter or digit",
        field=field,
        check=lambda s: all(_qualified(k) for k in getattr(s, field)),
    )


class Toleration(ApiModel):
    """A Kubernetes toleration, copied to every rank pod."""

    key: ShortString | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: Annotated[str, Field(max_length=253)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


EnvName = Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=253)]


class EnvVar(ApiModel):
    """An extra environment variable for the trainer container."""

    name: EnvName
    value: Annotated[str, Field(max_length=32768)] | None = None
    value_from: dict[str, Any] | None = Field(
        None, description="A Kubernetes EnvVarSource (secretKeyRef, configMapKeyRef, fieldRef...)."
    )

    rules = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="set value or valueFrom, not both",
            field="valueFrom",
            check=lambda s: s.value is None or s.value_from is None,
        ),
    )


class SecretKeySelector(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: K8sName = Field(description="The Secret's name.")
    key: Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)] = Field(
        contract.DEFAULT_TOKEN_SECRET_KEY, description="The key holding the value."
    )


class ScratchSpec(ApiModel):
    """The rank's working disk: Hugging Face and model cache, checkpoint staging before upload (up to
    two checkpoints' shards of this node), the tokenized data cache."""

    size: Quantity = Field(
        "500Gi",
        description="Largest size: an emptyDir's sizeLimit (the kubelet evicts a pod that writes "
        "more), or the storage a PVC of storageClassName requests.",
    )
    storage_class_name: K8sName | None = Field(
        None,
        description="Set: scratch is an ephemeral PVC of this storage class (e.g. local NVMe), created "
        "and deleted with each rank pod. Left out: an emptyDir on the node's disk.",
    )


_OPERATOR_KEYS = _cel_list(contract.OPERATOR_LABEL_KEYS)
_OPERATOR_ANNOTATIONS = _cel_list(contract.OPERATOR_ANNOTATION_KEYS)
_PREFIX = contract.RESERVED_METADATA_PREFIX


class PodMetadata(ApiModel):
    """Labels and annotations added to every rank pod."""

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=64, description="Pod labels.")
    annotations: dict[str, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, max_length=64, description="Pod annotations."
    )

    rules = (
        _qualified_keys("labels", "label keys are "),
        _qualified_keys("annotations", "annotation keys are "),
        Rule(
            cel=f"self.labels.all(k, !k.startsWith('{_PREFIX}') && !(k in {_OPERATOR_KEYS}))",
            message=f"labels under {_PREFIX} and the operator's own labels "
            f"({', '.join(contract.OPERATOR_LABEL_KEYS[3:])}) are set by the operator; choose a gang "
            "scheduler's queue and group through spec.gang",
            field="labels",
            check=lambda s: all(
                not k.startswith(_PREFIX) and k not in contract.OPERATOR_LABEL_KEYS for k in s.labels
            ),
        ),
        Rule(
            cel=f"self.annotations.all(k, !k.startsWith('{_PREFIX}') && !(k in {_OPERATOR_ANNOTATIONS}))",
            message=f"annotations under {_PREFIX} and the gang schedulers' group annotations "
            f"({', '.join(contract.OPERATOR_ANNOTATION_KEYS)}) are set by the operator: use spec.gang",
            field="annotations",
            check=lambda s: all(
                not k.startswith(_PREFIX) and k not in contract.OPERATOR_ANNOTATION_KEYS
                for k in s.annotations
            ),
        ),
    )


def _source_count_cel(var: str) -> str:
    return " + ".join(f"(has({var}.{source}) ? 1 : 0)" for source in VOLUME_SOURCES)


def _clashes(path: str) -> bool:
    """A mount at, under or above one of the pod's own paths would hide it or be hidden by it."""
    parent = path if path.endswith("/") else path + "/"
    return path == "/" or any(
        path == own or path.startswith(own + "/") or own.startswith(parent) for own in contract.RESERVED_PATHS
    )


_RESERVED_PATHS = _cel_list(contract.RESERVED_PATHS)


def volume_rules() -> tuple[Rule, ...]:
    """Rules over resources.volumes and resources.volumeMounts (they sit on ResourcesSpec)."""

    def sources(volume: Any) -> int:
        return sum(1 for key in wire(volume) if key != "name")

    def names(objects: list[Any]) -> list[str]:
        return [k8s_field(o, "name") for o in objects]

    return (
        Rule(
            # ValidateVolumeSource: "may not specify more than 1 volume type"; none is an emptyDir.
            cel=f"self.volumes.all(v, {_source_count_cel('v')} <= 1)",
            message="each volume names one source (persistentVolumeClaim, nfs, csi, ephemeral, "
            "configMap, secret, hostPath, emptyDir...), not several",
            field="volumes",
            check=lambda s: all(sources(v) <= 1 for v in s.volumes),
        ),
        Rule(
            cel="self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))",
            message="volume names must be unique",
            field="volumes",
            check=lambda s: len(set(names(s.volumes))) == len(s.volumes),
        ),
        Rule(
            cel=f"self.volumes.all(v, !v.name.startsWith('{contract.RESERVED_VOLUME_PREFIX}'))",
            message=f"volume names starting with {contract.RESERVED_VOLUME_PREFIX} are the operator's "
            "(config, shared memory, scratch)",
            field="volumes",
            check=lambda s: not any(n.startswith(contract.RESERVED_VOLUME_PREFIX) for n in names(s.volumes)),
        ),
        Rule(
            cel="self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
            message="each volumeMount must name a volume declared in resources.volumes",
            field="volumeMounts",
            check=lambda s: set(names(s.volume_mounts)) <= set(names(s.volumes)),
        ),
        Rule(
            cel="self.volumeMounts.all(m, self.volumeMounts.exists_one(n, n.mountPath == m.mountPath))",
            message="each volumeMount needs its own mountPath",
            field="volumeMounts",
            check=lambda s: len({k8s_field(m, "mountPath") for m in s.volume_mounts}) == len(s.volume_mounts),
        ),
        Rule(
            cel="self.volumeMounts.all(m, m.mountPath != '/' && "
            f"{_RESERVED_PATHS}.all(p, m.mountPath != p && !m.mountPath.startsWith(p + '/') "
            "&& !p.startsWith(m.mountPath.endsWith('/') ? m.mountPath : m.mountPath + '/')))",
            message=f"a volumeMount may not be at, under or above {', '.join(contract.RESERVED_PATHS)} "
            "(the operator mounts the trainer config, shared memory, scratch and termination log there)",
            field="volumeMounts",
            check=lambda s: not any(_clashes(k8s_field(m, "mountPath")) for m in s.volume_mounts),
        ),
    )


EXTENDED_RESOURCE_RULES = (
    Rule(
        cel=f"self.extendedResources.all(k, size(k) <= {MAX_QUALIFIED_NAME} "
        f"&& k.matches('{PREFIXED_NAME_PATTERN}'))",
        message="extendedResources keys are resource names with a domain, e.g. rdma/ib or nvidia.com/hostdev",
        field="extendedResources",
        check=lambda s: all(
            len(k) <= MAX_QUALIFIED_NAME and re.match(PREFIXED_NAME_PATTERN, k) for k in s.extended_resources
        ),
    ),
    Rule(
        # IsNativeResource (pkg/apis/core/helper): a name in the kubernetes.io domain is not extended.
        cel="self.extendedResources.all(k, !k.contains('kubernetes.io/') && k != self.gpuResourceName)",
        message="extendedResources may not name a kubernetes.io resource or the GPU resource "
        "(set gpusPerNode and gpuResourceName for GPUs)",
        field="extendedResources",
        check=lambda s: all(
            "kubernetes.io/" not in k and k != s.gpu_resource_name for k in s.extended_resources
        ),
    ),
)
