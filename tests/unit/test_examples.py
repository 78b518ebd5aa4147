"""The manifests users copy are valid for both layers and become valid cluster objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from finetune_operator.api import parse_manifest
from finetune_operator.builders import BuildContext, build_attempt

from tests.support.apiserver import FakeApiServer

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_the_three_promised_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "tiny-cpu.yaml",
        "llama-3.1-8b-lora.yaml",
        "llama-3.1-70b-zero3.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_admitted_by_the_crd_schema_and_cel_rules(path: Path, apiserver: FakeApiServer) -> None:
    admission = apiserver.admit(_load(path))
    assert admission.allowed, admission.errors


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_models(path: Path) -> None:
    parse_manifest(_load(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_builds_objects_valid_for_kubernetes(path: Path) -> None:
    data = _load(path)
    data["metadata"]["uid"] = "00000000-0000-4000-8000-000000000000"
    job = parse_manifest(data)
    for obj in build_attempt(job, 1, BuildContext(default_image="trainer:test")):
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_tiny_cpu_runs_two_ranks_without_gpus() -> None:
    spec = parse_manifest(_load(Path(EXAMPLES[0].parent / "tiny-cpu.yaml"))).spec
    assert (
        spec.resources.nodes == 2 and spec.resources.gpus_per_node == 0 and spec.training.precision == "fp32"
    )


def test_the_70b_example_is_multi_node_zero3_with_offload() -> None:
    spec = parse_manifest(_load(Path(EXAMPLES[0].parent / "llama-3.1-70b-zero3.yaml"))).spec
    assert spec.resources.nodes > 1 and spec.deepspeed.zero_stage == 3 and spec.deepspeed.offload_optimizer
