"""The Helm chart rendered by the real Helm engine (helm-python-sdk), and the value combinations the
chart tests cover."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator"
RELEASE, RELEASE_NAMESPACE = "ftjob", "finetune-system"

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cluster-wide": {"watchNamespaces": [], "trainer": {"image": "registry.example/trainer:1"}},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "two-replicas": {"replicaCount": 2},
    "two-replicas-namespaced": {"replicaCount": 2, "watchNamespaces": ["team-a"]},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        }
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ftjob-operator"}},
}


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart's templates render to (NOTES.txt aside), as an install would."""
    manifests = _chart().render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def notes(values: dict[str, Any] | None = None) -> str:
    manifests = _chart().render(values or {}, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def crds() -> list[dict[str, Any]]:
    return [doc for c in _chart().crds for doc in yaml.safe_load_all(c["data"]) if doc]
