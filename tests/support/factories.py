"""Factories for FineTuneJob manifests and objects: tests state only what they change."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from finetune_operator.api import FineTuneJob, parse_manifest

_MISSING = object()


def minimal_manifest(name: str = "demo", namespace: str = "team-a") -> dict[str, Any]:
    """The smallest valid manifest: model, dataset and checkpoint uri."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "s3://models/llama-3.1-8b"},
            "dataset": {"sources": [{"uri": "s3://data/train.jsonl"}]},
            "checkpoint": {"uri": "s3://checkpoints/runs"},
        },
    }


def _walk(obj: Any, path: str) -> tuple[Any, str | int]:
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in path.split(".")]
    for part in parts[:-1]:
        obj = obj[part] if isinstance(part, int) else obj.setdefault(part, {})
    return obj, parts[-1]


def manifest(
    changes: dict[str, Any] | None = None, *, drop: tuple[str, ...] = (), **kw: Any
) -> dict[str, Any]:
    """A minimal manifest with dotted-path changes ("spec.training.maxSteps": 10) and removals."""
    out = copy.deepcopy(minimal_manifest(**kw))
    for path, value in (changes or {}).items():
        parent, key = _walk(out, path)
        parent[key] = value
    for path in drop:
        parent, key = _walk(out, path)
        del parent[key]
    return out


def job(
    changes: dict[str, Any] | None = None,
    *,
    uid: str | None = "3f1c2d4e-0000-4000-8000-000000000001",
    **kw: Any,
) -> FineTuneJob:
    data = manifest(changes, **kw)
    if uid:
        data["metadata"]["uid"] = uid
    return parse_manifest(data)


def started(obj: dict[str, Any], attempt: int = 1, phase: str = "Running") -> dict[str, Any]:
    """The stored object of a job whose gang has started."""
    out = copy.deepcopy(obj)
    out["status"] = {"phase": phase, "attempt": attempt}
    return out


def kubeconfig(directory: Path, server: str, token: str = "not-a-secret") -> Path:
    """A kubeconfig naming one cluster at `server`, reached with a bearer token."""
    path = directory / "kubeconfig"
    path.write_text(
        yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        })
    )  # fmt: skip
    return path
