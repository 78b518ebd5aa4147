"""Admission refusals the emulator can answer a create with, shaped as the API server's own.

- ResourceQuota (staging/src/k8s.io/apiserver/pkg/admission/plugin/resourcequota/controller.go):
  403 Forbidden, `<resource> "<name>" is forbidden: exceeded quota: <quota>, requested: ..., used:
  ..., limited: ...` (admission.NewForbidden). Usage counts the namespace's pods that are not
  terminal, as the pod quota evaluator does (pkg/quota/v1/evaluator/core/pods.go).
- Field validation (pkg/apis/core/validation): 422 Invalid, `Pod "<name>" is invalid: <field>: ...`,
  what an `affinity` the CRD lets through (it is free-form) gets at pod creation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import kmock

from tests.support.cluster import PODS, ClusterEmulator


class Admission(Protocol):
    def __call__(
        self, cluster: ClusterEmulator, resource: kmock.resource, namespace: str, body: dict[str, Any]
    ) -> kmock.KubernetesError | None: ...


@dataclass
class PodQuota:
    """A ResourceQuota with `hard: {pods: N}` in one namespace."""

    namespace: str
    pods: int
    name: str = "compute"

    def __call__(
        self, cluster: ClusterEmulator, resource: kmock.resource, namespace: str, body: dict[str, Any]
    ) -> kmock.KubernetesError | None:
        if resource != PODS or namespace != self.namespace:
            return None
        used = sum(
            1
            for p in cluster.list(PODS)
            if p["metadata"].get("namespace") == namespace
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        )
        if used + 1 <= self.pods:
            return None
        name = body.get("metadata", {}).get("name", "")
        return kmock.KubernetesError(
            status=403,
            reason="Forbidden",
            message=f'pods "{name}" is forbidden: exceeded quota: {self.name}, requested: pods=1, '
            f"used: pods={used}, limited: pods={self.pods}",
        )


@dataclass
class InvalidAffinity:
    """Pods whose affinity uses an operator the API does not know are refused with 422."""

    def __call__(
        self, cluster: ClusterEmulator, resource: kmock.resource, namespace: str, body: dict[str, Any]
    ) -> kmock.KubernetesError | None:
        if resource != PODS or "affinity" not in (body.get("spec") or {}):
            return None
        name = body.get("metadata", {}).get("name", "")
        field = (
            "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
            "nodeSelectorTerms[0].matchExpressions[0].operator"
        )
        return kmock.KubernetesError(
            status=422,
            reason="Invalid",
            message=f'Pod "{name}" is invalid: {field}: Unsupported value: "Inn": supported values: '
            '"DoesNotExist", "Exists", "Gt", "In", "Lt", "NotIn"',
        )
