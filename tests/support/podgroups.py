"""The gang schedulers' PodGroup schemas, for validating what the operator builds: kubernetes-validate
knows only built-in kinds, so PodGroups are checked against the CRDs' own openAPIV3Schema, reduced to
the spec fields and types and made strict (an unknown field is an error, as `kubectl apply
--validate=strict` makes it against a structural schema).

- Volcano: volcano-sh/volcano config/crd/volcano/bases/scheduling.volcano.sh_podgroups.yaml (v1beta1).
- Coscheduling: kubernetes-sigs/scheduler-plugins apis/scheduling/v1alpha1/types.go (PodGroupSpec:
  minMember int32, minResources ResourceList, scheduleTimeoutSeconds *int32), from which its CRD
  config/crd/bases/scheduling.x-k8s.io_podgroups.yaml is generated.
"""

from __future__ import annotations

from typing import Any

import jsonschema

QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",  # noqa: E501
}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}


def _object(spec: dict[str, Any], group: str, version: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": f"{group}/{version}"},
            "kind": {"const": "PodGroup"},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {
                    "name": {"type": "string", "maxLength": 253},
                    "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
                },
            },
            "spec": {"type": "object", "additionalProperties": False, "properties": spec},
        },
    }


VOLCANO = _object(
    {
        "minMember": INT32,
        "minResources": {"type": "object", "additionalProperties": QUANTITY},
        "minTaskMember": {"type": "object", "additionalProperties": INT32},
        "networkTopology": {"type": "object"},
        "priorityClassName": {"type": "string"},
        "queue": {"type": "string"},
        "preemptable": {"type": "boolean"},
    },
    "scheduling.volcano.sh",
    "v1beta1",
)
COSCHEDULING = _object(
    {
        "minMember": INT32,
        "minResources": {"type": "object", "additionalProperties": QUANTITY},
        "scheduleTimeoutSeconds": INT32,
    },
    "scheduling.x-k8s.io",
    "v1alpha1",
)
SCHEMAS = {"scheduling.volcano.sh/v1beta1": VOLCANO, "scheduling.x-k8s.io/v1alpha1": COSCHEDULING}


def validate_pod_group(obj: dict[str, Any]) -> None:
    jsonschema.validate(obj, SCHEMAS[obj["apiVersion"]])
