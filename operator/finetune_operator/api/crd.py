"""The FineTuneJob CustomResourceDefinition, generated from the pydantic models (`make crds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune_operator import contract
from finetune_operator.api.job import JOB_NAME_PATTERN, MAX_JOB_NAME_LENGTH, FineTuneJob
from finetune_operator.api.schema import to_structural

CRD_FILE_NAME = f"{contract.API_GROUP}_{contract.PLURAL}.yaml"
HEADER = (
    "# Generated from operator/finetune_operator/api by `make crds`. Do not edit by hand:\n"
    "# change the pydantic models and regenerate (a test fails when this file is stale).\n"
)


def _column(name: str, type_: str, path: str, description: str, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


PRINTER_COLUMNS = [
    _column("Phase", "string", ".status.phase", "Lifecycle phase"),
    _column("Nodes", "integer", ".spec.resources.nodes", "Node ranks"),
    _column("Step", "integer", ".status.progress.step", "Optimizer steps done"),
    _column("Progress", "number", ".status.progress.percent", "Percent of all steps"),
    _column("Loss", "number", ".status.progress.loss", "Training loss"),
    _column("Restarts", "integer", ".status.restarts", "Gang restarts counted toward maxRestarts"),
    _column(
        "Infra-Restarts",
        "integer",
        ".status.infraRestarts",
        "Gang restarts after evictions, preemptions and lost nodes (toward maxInfrastructureRestarts)",
    ),
    _column(
        "Checkpoint", "integer", ".status.latestCheckpoint.step", "Step of the latest committed checkpoint"
    ),
    _column("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    _column("Attempt", "integer", ".status.attempt", "Current gang attempt", priority=1),
    _column("Goodput", "number", ".status.goodput.percent", "Percent of the job's time spent training", 1),
    _column("ETA", "integer", ".status.progress.etaSeconds", "Seconds to the end of training", 1),
    _column("Tokens/s", "number", ".status.progress.tokensPerSecond", "Training throughput", 1),
    _column("Micro-Batch", "integer", ".status.microBatch.size", "Micro batch in effect, see status", 1),
    _column("Reason", "string", '.status.conditions[?(@.type=="Failed")].reason', "Why the job failed", 1),
]


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema."""
    full = FineTuneJob.model_json_schema(by_alias=True, mode="validation")
    structural = to_structural(full)
    props = structural["properties"]
    return {
        "type": "object",
        "description": structural.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "finetune.dev/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            # Only name and generateName may be constrained under metadata; the name feeds pod
            # hostnames, which are DNS labels.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": MAX_JOB_NAME_LENGTH, "pattern": JOB_NAME_PATTERN}
                },
            },
            "spec": props["spec"],
            "status": props["status"],
        },
        "x-kubernetes-validations": structural["x-kubernetes-validations"],
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{contract.PLURAL}.{contract.API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "finetune-operator",
                "app.kubernetes.io/part-of": "finetune-operator",
            },
        },
        "spec": {
            "group": contract.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": contract.KIND,
                "listKind": f"{contract.KIND}List",
                "plural": contract.PLURAL,
                "singular": contract.SINGULAR,
                "shortNames": list(contract.SHORT_NAMES),
                "categories": list(contract.CATEGORIES),
            },
            "versions": [
                {
                    "name": contract.API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def write_crd(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CRD_FILE_NAME
    path.write_text(render_crd_yaml())
    return path
