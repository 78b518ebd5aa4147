"""The manifests users copy are valid for both layers and become valid cluster objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from finetune_operator import contract
from finetune_operator.api import parse_manifest
from finetune_operator.builders import BuildContext, build_attempt, build_rank_pod

from tests.support.apiserver import FakeApiServer
from tests.support.podgroups import validate_pod_group
from tests.support.versions import KUBERNETES_VERSIONS

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def test_the_promised_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "tiny-cpu.yaml",
        "llama-3.1-8b-lora.yaml",
        "llama-3.1-70b-zero3.yaml",
        "llama-3.1-8b-pvc.yaml",
        "llama-3.1-8b-dpo.yaml",
        "llama-3.1-70b-to-8b-distill.yaml",
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
        if obj["kind"] == "PodGroup":  # a CRD kubernetes-validate does not know
            validate_pod_group(obj)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_70b_example_is_a_kueue_gang_kept_in_one_topology_domain() -> None:
    data = _load(Path(EXAMPLES[0].parent / "llama-3.1-70b-zero3.yaml"))
    pod = build_rank_pod(parse_manifest(data), 1, 3, BuildContext(default_image="trainer:test"))
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert labels[contract.KUEUE_QUEUE_LABEL] == "gpu-h100"
    assert annotations[contract.KUEUE_TOTAL_COUNT_ANNOTATION] == "4"
    assert annotations[contract.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION] == "topology.kubernetes.io/zone"


def test_tiny_cpu_runs_two_ranks_without_gpus() -> None:
    spec = parse_manifest(_load(Path(EXAMPLES[0].parent / "tiny-cpu.yaml"))).spec
    assert (
        spec.resources.nodes == 2 and spec.resources.gpus_per_node == 0 and spec.training.precision == "fp32"
    )


def test_the_70b_example_is_multi_node_zero3_with_offload() -> None:
    spec = parse_manifest(_load(Path(EXAMPLES[0].parent / "llama-3.1-70b-zero3.yaml"))).spec
    assert spec.resources.nodes > 1 and spec.deepspeed.zero_stage == 3 and spec.deepspeed.offload_optimizer


def _example(name: str) -> Any:
    return parse_manifest(_load(EXAMPLES[0].parent / name))


def test_the_70b_example_reaches_the_fabric_over_rdma() -> None:
    """The example sets NCCL_IB_HCA; without an RDMA device in the pod and memory it may pin, NCCL
    would find no IB device and fall back to TCP sockets without failing."""
    job = _example("llama-3.1-70b-zero3.yaml")
    resources = job.spec.resources
    assert any(name.startswith("rdma/") for name in resources.extended_resources)
    assert resources.ipc_lock and "NCCL_IB_HCA" in {e.name for e in resources.env}
    assert job.spec.placement.topology_key and job.spec.placement.topology_policy == "Required"
    pod = build_attempt(job, 1, BuildContext(default_image="trainer:test"))[-1]
    container = pod["spec"]["containers"][0]
    assert "rdma/rdma_shared_device_a" in container["resources"]["limits"]
    assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]


def test_the_pvc_example_reads_and_writes_only_under_its_mounts() -> None:
    """Every file:// location the job names must be inside a volume it mounts, or the ranks would
    look for the model, data and checkpoints on their own container filesystem."""
    job = _example("llama-3.1-8b-pvc.yaml")
    mounts = [m.k_mountPath for m in job.spec.resources.volume_mounts]
    uris = [job.spec.model.source, job.spec.checkpoint.uri, *(s.uri for s in job.spec.dataset.sources)]
    for uri in uris:
        assert uri.startswith("file:///"), uri
        path = uri[len("file://") :]
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (uri, mounts)
    claims = {v.k_name: v.k_persistentVolumeClaim for v in job.spec.resources.volumes}
    assert all(claim is not None for claim in claims.values())
    assert claims["models"].k_readOnly and claims["datasets"].k_readOnly


def test_the_dpo_example_tunes_what_the_sft_example_exports() -> None:
    """The SFT -> DPO pipeline: stage two's model is stage one's output."""
    folder = EXAMPLES[0].parent
    sft, dpo = _load(folder / "llama-3.1-8b-lora.yaml"), _load(folder / "llama-3.1-8b-dpo.yaml")
    assert dpo["spec"]["model"]["source"] == sft["spec"]["output"]["uri"]
    assert dpo["spec"]["training"]["objective"] == "dpo"
